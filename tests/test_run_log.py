"""The run log and the console stay quiet when nothing went wrong, and say so when a stage fails.

A tiny real pipeline (toy notebooks, as in test_pipeline) runs in a child process with the CLI's
console handler, so the kernel's own stderr (inherited by the kernel process) is captured too. What a
stage prints is its progress (INFO lines in the run log); what it writes to stderr, a warning (WARNING).
"""
import re
import subprocess
import sys
import textwrap

import pytest

from .test_pipeline import BOOM, READ_A, WRITE_A, _notebook

WARN = """import json, warnings
warnings.warn("a real problem in stage w")
(io.out / "metrics.json").write_text(json.dumps({"warned": 1}))
"""
NOISE = re.compile(r"WARNING|ERROR|without encryption|KeyboardInterrupt|Unable to parse|unknown parameter")
RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from flowsan_lib import cli
    from flowsan_lib.run import pipeline
    from flowsan_lib.core.layout import Input, Stage
    cli._console_log()
    root = Path(sys.argv[1])
    a, b = Stage("a", ("data",)), Stage("b", ("aux",), {"a_metrics": Input("a", "metrics.json")})
    stages = {"ok": (a, b), "warn": (a, b, Stage("w", ("san",), {"b": Input("b")})),
              "fail": (a, b, Stage("c", ("san",), {"b": Input("b")}))}[sys.argv[2]]
    try:
        pipeline.run(pipeline.RunRequest("smoke", force=True),
                     pipeline.RunOptions(stages=stages, notebook_dir=root / "notebooks", output_dir=root / "outputs",
                                         fetch_models=False, report=False))
    except pipeline.RunError as e:
        print("flowsan: error:", e, file=sys.stderr)
        sys.exit(2)
""")


def _toy(tmp_path):
    nb = tmp_path / "notebooks"
    nb.mkdir()
    for name, body in (("a", WRITE_A), ("b", READ_A), ("c", BOOM), ("w", WARN)):
        _notebook(nb / f"{name}.ipynb", body)
    # the notebooks' real parameters cell: papermill must parse every line of it
    import nbformat

    from flowsan_lib.core.layout import NOTEBOOK_DIR
    real = nbformat.read(NOTEBOOK_DIR / "06_explore.ipynb", as_version=4)
    cell = next(c for c in real.cells if "parameters" in c.metadata.get("tags", []))
    for name in ("a", "b", "c", "w"):
        toy = nbformat.read(nb / f"{name}.ipynb", as_version=4)
        toy.cells[0].source = cell.source.replace("report = True", "report_unused = True")
        nbformat.write(toy, nb / f"{name}.ipynb")


def _run(tmp_path, which):
    return subprocess.run([sys.executable, "-c", RUN, str(tmp_path), which], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_quiet_log_when_nothing_fails_and_errors_when_a_stage_fails(tmp_path):
    _toy(tmp_path)
    ok = _run(tmp_path, "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    run_log = tmp_path / "outputs" / "smoke" / "logs" / "run.log"
    log = run_log.read_text()
    for text, where in ((ok.stderr, "console"), (log, "logs/run.log")):
        assert not NOISE.findall(text), f"{where}:\n{text}"
    assert re.search(r"a: running .*\n.*a: stage a wrote a.partial\n.*a: done in", log), log   # progress forwarded
    assert "b: done in" in log and "a: stage a wrote" in ok.stderr
    assert all(" INFO " in line for line in log.splitlines()), log

    warned = _run(tmp_path, "warn")
    assert warned.returncode == 0, warned.stderr[-3000:]
    log = run_log.read_text()
    assert re.search(r"WARNING w: .*UserWarning: a real problem in stage w", log), log
    assert "a real problem in stage w" in warned.stderr

    bad = _run(tmp_path, "fail")
    assert bad.returncode == 2
    log = run_log.read_text()
    assert re.search(r"ERROR.*c: FAILED in cell \d+: ValueError: boom", log), log
    assert "c: FAILED" in bad.stderr
