"""SAN training throughput: our fastai training vs a plain-PyTorch loop of the original recipe.

    nice python benchmarks/train_throughput.py [--resolutions 64 112 224] [--variants original equal default]
        [--steps 20] [--warmup 3] [--threads 0] [--device auto] [--check] [--out FILE]

Both train the library's SAN on real aligned faces of the embedded sample (resized to each
resolution as the data stage does) with the REAL auxiliary networks in the loss: the face-api
matcher (`load_matcher("faceapi")`) and an auxiliary gender CNN of the original design at that
resolution (its weights do not change the cost, so it is freshly initialised and frozen).

Variants (`impl:precision:batch[:option...]`, or one of the names in VARIANTS):
- original  plain PyTorch, written from SCIENCE.md: fp32, batch 8, torch Adam 2e-4, per-sample
            random crop + flip in a Dataset, J_D = L1 vs the input, J_M = 8 x sum over batch and
            dims of (mean of M(I'_sm), M(I'_op) - M(I))^2 with M(I) recomputed every step (as the
            original did), J_G = two 2-class cross-entropies, loss.item() every step.
            The SAN runs layer by layer (`SAN.reference_forward`), as the original network did.
- equal     our training path (`flow.train_san`: fastai Learner, SanLoss, our callbacks) at the
            original's settings: fp32, batch 8, the same model and weights. What differs is how
            the same values are computed: descriptors of the originals cached (computed once, not
            every step); the SAN's phase-conv forward (`SAN.forward`: 2.25x fewer MACs in its big
            conv); one matcher and one G call on cat(I'_sm, I'_op); frozen networks channels-last
            (`flow.frozen_for_loss`); no per-sample transform.
- default   our training path at our defaults (SanParams: precision and batch size).
Options (what-if speed knobs on top of either path):
- `cl`: the frozen matcher and G in channels-last memory format (ours has it already); `clsan`:
  the SAN too; `compile`: SAN, matcher and G wrapped in torch.compile (compilation time is not in
  the steps timed).

Each (resolution, variant) runs in a fresh process so that its peak memory is its own; the time
of `--steps` training steps after `--warmup` steps gives images/s (from the median step time;
the mean is reported too) and images per CPU-second (the process's CPU time per step: with
`--threads 1` the cost on one core, much less inflated than wall time when other jobs share the
machine). `--check` first compares each option and bf16 with fp32 eager (SAN
outputs, loss, SAN gradients) on one real batch; `--check-only` does only that (exit 1 on a miss).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import common
import torch
from torch.nn import functional as F

from flowsan_lib.core.config import SanParams
from flowsan_lib.method.losses import SanLoss, gender_logit, gender_loss, match_loss, pixel_loss
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN

DEFAULTS = SanParams()
VARIANTS = {"original": "plain:fp32:8", "equal": "fastai:fp32:8",
            "default": f"fastai:{DEFAULTS.precision}:{DEFAULTS.batch_size}"}
TOLERANCE = {  # max |difference| of SAN outputs in [0,1], relative difference of loss and SAN gradients
    "bf16": {"out": 3e-2, "loss": 3e-2, "grad": 0.1},
    "cl": {"out": 1e-4, "loss": 1e-4, "grad": 1e-3},
    "clsan": {"out": 1e-4, "loss": 1e-4, "grad": 1e-3},
    "compile": {"out": 1e-4, "loss": 1e-4, "grad": 1e-3},
    "ours": {"out": 1e-5, "loss": 1e-4, "grad": 1e-3},  # J_M sums 8 x B x 128 squares: it amplifies rounding
}
OPTIONS = ("cl", "clsan", "compile")
MIN_STEPS = 3  # timed steps kept even when the time budget runs out


def parse_variant(spec: str) -> dict:
    """'fastai:bf16:32:cl:cat' -> {"impl", "precision", "batch", "options": [...]}."""
    parts = VARIANTS.get(spec, spec).split(":")
    if len(parts) < 3 or parts[0] not in ("plain", "fastai") or parts[1] not in ("fp32", "bf16", "auto"):
        raise SystemExit(f"bad variant {spec!r}: use {', '.join(VARIANTS)} or impl:precision:batch[:option...]")
    bad = set(parts[3:]) - set(OPTIONS)
    if bad:
        raise SystemExit(f"bad variant option(s) {sorted(bad)} in {spec!r}; options: {', '.join(OPTIONS)}")
    return {"impl": parts[0], "precision": parts[1], "batch": int(parts[2]), "options": sorted(set(parts[3:]))}


# --- the networks ----------------------------------------------------------------------------

def networks(resolution: int, device, options=(), layered: bool = False):
    """(SAN, frozen aux CNN, frozen face-api matcher) on device, with the speed options applied."""
    from flowsan_lib.models import load_matcher
    torch.manual_seed(0)
    san = SAN(resolution, 3).to(device)
    if layered:
        san = common.layered(san)
    aux = freeze(AuxGenderCNN(resolution, "original", name="G01")).to(device)
    matcher = load_matcher("faceapi", device)
    for m in (aux, matcher) if "cl" in options else ():
        m.to(memory_format=torch.channels_last)
    if "clsan" in options:
        san.to(memory_format=torch.channels_last)
    if "compile" in options:
        san = torch.compile(san)
        aux.net = torch.compile(aux.net)
        matcher = torch.compile(matcher)
    return san, aux, matcher


# --- the original recipe in plain PyTorch ----------------------------------------------------

class OriginalDataset(torch.utils.data.Dataset):
    """Gray faces with the original train transform: random crop (from a padded image) and h-flip."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad_frac: float = 0.06):
        self.x, self.y, self.pad = x, y.long(), max(1, round(pad_frac * x.shape[-1]))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        r, s = self.x.shape[-1], self.pad
        img = F.pad(self.x[i:i + 1], (s, s, s, s), mode="replicate")[0]
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        img = img[:, dy:dy + r, dx:dx + r]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img.contiguous(), self.y[i]


def original_loss(san, aux, matcher, x, y, protos):
    """J = J_D + 8 J_M + J_G as the original code computed it (M(I) recomputed, not cached)."""
    p_sm, p_op = protos[y], protos[1 - y]
    out_sm, out_op = san(x, p_sm, p_op)
    with torch.no_grad():
        d_orig = matcher(x)
    j_d = (out_sm - x).abs().mean()
    d_mean = (matcher(out_sm) + matcher(out_op)) / 2
    j_m = (d_mean - d_orig).pow(2).sum()
    j_g = F.cross_entropy(aux.logits(out_sm), y) + F.cross_entropy(aux.logits(out_op), 1 - y)
    return j_d + 8.0 * j_m + j_g


def stamp() -> tuple[float, float]:
    """(wall clock, CPU time of this process, all threads) at the end of a step."""
    return time.perf_counter(), time.process_time()


def done(times: list[tuple], steps: int, warmup: int, budget_s: float) -> bool:
    """Enough steps timed: all of them, or at least MIN_STEPS once the time budget is spent."""
    timed = len(times) - warmup - 1
    return timed >= steps or (timed >= MIN_STEPS and budget_s > 0 and times[-1][0] - times[warmup][0] > budget_s)


def time_plain(v: dict, faces: common.Faces, san, aux, matcher, device, steps: int, warmup: int,
               budget_s: float = 0.0) -> list[tuple[float, float]]:
    """Step end times of the plain loop (original recipe); data loading is inside the timed steps."""
    n = (steps + warmup + 1) * v["batch"]
    f = faces.tiled(n)
    loader = torch.utils.data.DataLoader(OriginalDataset(f.x, f.y), batch_size=v["batch"], shuffle=True,
                                         drop_last=True, num_workers=0)
    protos = f.protos["rgb"].to(device)
    opt = torch.optim.Adam(san.parameters(), lr=2e-4)
    san.train()
    times = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=v["precision"] == "bf16"):
            loss = original_loss(san, aux, matcher, x, y, protos)
        opt.zero_grad()
        loss.backward()
        opt.step()
        float(loss)  # the original printed the running loss: one host sync per step
        common.sync(device)
        times.append(stamp())
        if done(times, steps, warmup, budget_s):
            break
    return times


# --- our fastai training path ----------------------------------------------------------------

def time_fastai(v: dict, faces: common.Faces, san, aux, matcher, device, steps: int, warmup: int,
                budget_s: float = 0.0) -> list[tuple[float, float]]:
    """Step end times of `flow.train_san` (the path 04_flowsan uses), cancelled after the last step."""
    from fastai.callback.core import Callback, CancelFitException

    from flowsan_lib.method.fit import FitFiles
    from flowsan_lib.method.prototypes import make_bank
    from flowsan_lib.method.san_training import SanFit, StageData, descriptors, train_san

    class StepTimer(Callback):
        order = 100  # after every other after_batch callback (history, NaN guard, progress)

        def __init__(self):
            self.times = []

        def after_batch(self):
            if not self.training:
                return
            common.sync(device)
            self.times.append(stamp())
            if done(self.times, steps, warmup, budget_s):
                raise CancelFitException()

    bs = v["batch"]
    f = faces.tiled((steps + warmup + 2) * bs)
    desc = descriptors(matcher, f.x, device=device)  # cached before training, as 04_flowsan does
    bank = make_bank(f.protos, 3, False)
    train = StageData(f.x, f.x, desc, f.y, bank).to(device)   # the training set lives on the device, as in 04
    sp = dataclasses.replace(DEFAULTS, batch_size=bs, precision=v["precision"], epochs=1, match_warmup_epochs=0)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        valid = StageData(f.x[:bs], f.x[:bs], desc[:bs], f.y[:bs], bank).to(device)
        files = FitFiles("bench", Path(tmp) / "ckpt", Path(tmp) / "history.csv", {})
        train_san(san, train, valid, aux, matcher, SanFit(sp, 0, files, torch.device(device), extra_cbs=(timer,)))
    return timer.times


# --- one measurement (child process) ---------------------------------------------------------

def measure(job: dict) -> dict:
    """images/s and peak memory of one (resolution, variant), in this process."""
    threads = common.set_threads(job["threads"])
    device = common.pick_device(job["device"])
    v = parse_variant(job["variant"])
    from flowsan_lib.core.device import resolve_precision
    v["precision"] = resolve_precision(v["precision"], device)   # default: auto -> bf16 on a GPU, fp32 on the CPU
    r = job["resolution"]
    faces = common.real_faces(r, 64)
    san, aux, matcher = networks(r, device, v["options"], layered=v["impl"] == "plain")
    rss0 = common.rss_mib()
    common.reset_peak_memory(device)
    t0 = time.perf_counter()
    timer = time_plain if v["impl"] == "plain" else time_fastai
    times = timer(v, faces, san, aux, matcher, device, job["steps"], job["warmup"], job.get("budget_s", 0.0))
    wall = time.perf_counter() - t0
    mem = common.peak_memory_mib(device)
    steps_t = times[job["warmup"]:]
    dt = [b[0] - a[0] for a, b in zip(steps_t, steps_t[1:])]
    cpu = [b[1] - a[1] for a, b in zip(steps_t, steps_t[1:])]
    if len(dt) < min(job["steps"], MIN_STEPS):
        raise RuntimeError(f"only {len(dt)} timed steps (wanted {job['steps']})")
    med, mean = statistics.median(dt), statistics.fmean(dt)
    return {**job, **v, "threads": threads, "device": str(device), "timed_steps": len(dt),
            "step_s_median": med, "step_s_mean": mean, "images_per_s": v["batch"] / med,
            "images_per_s_mean": v["batch"] / mean, "cpu_s_per_step": statistics.median(cpu),
            "images_per_cpu_s": v["batch"] / statistics.median(cpu), "peak_mib": mem["peak_mib"], "memory_kind": mem["kind"],
            "rss_before_mib": rss0, "wall_s": wall, "load_average_1min": common.load_average(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else ""}


# --- equality checks of the speed options ----------------------------------------------------

def separate_calls_loss(aux, matcher, out, x, desc, y):
    """SanLoss's value with two matcher and two G calls (one per output), as before the batched call."""
    out_sm, out_op = out
    j_m = match_loss(matcher(out_sm), matcher(out_op), desc)
    j_g = gender_loss(gender_logit(aux, out_sm), gender_logit(aux, out_op), y)
    return pixel_loss(out_sm, x) + 8.0 * j_m + j_g


def check_options(resolution: int, device, batch: int = 8, options=OPTIONS) -> list[dict]:
    """Outputs, loss and SAN gradients of our path and each option vs the original computation.

    Reference: fp32, SAN layer by layer, two matcher and two G calls, contiguous weights. "ours":
    the library's SAN forward, SanLoss and `frozen_for_loss`; the options and bf16 are on top of it.
    """
    from flowsan_lib.method.san_training import frozen_for_loss
    faces = common.real_faces(resolution, batch)
    x, y = faces.x.to(device), faces.y.to(device)
    protos = faces.protos["rgb"].to(device)
    p_sm, p_op = protos[y.long()], protos[1 - y.long()]

    def run(precision="fp32", options=(), ours=True):
        san, aux, matcher = networks(resolution, device, options, layered=not ours)
        desc = matcher(x).detach().float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = san(x, p_sm, p_op)
            if ours:
                loss = SanLoss(frozen_for_loss(aux, device), frozen_for_loss(matcher, device))(out, x, desc, y)
            else:
                loss = separate_calls_loss(aux, matcher, out, x, desc, y)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in san.parameters()])
        return [o.detach().float() for o in out], float(loss.detach()), grads

    ref_out, ref_loss, ref_grad = run(ours=False)
    rows = []
    for name in ("ours", "bf16", *options):
        kw = {"precision": "bf16"} if name == "bf16" else {} if name == "ours" else {"options": (name,)}
        try:
            out, loss, grad = run(**kw)
        except Exception as e:  # noqa: BLE001  (a backend that cannot compile here is reported, not fatal)
            rows.append({"option": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        d_out = max(float((a - b).abs().max()) for a, b in zip(out, ref_out))
        d_loss = abs(loss - ref_loss) / abs(ref_loss)
        d_grad = float((grad - ref_grad).norm() / ref_grad.norm())
        tol = TOLERANCE[name]
        rows.append({"option": name, "max_abs_out": d_out, "rel_loss": d_loss, "rel_grad": d_grad,
                     "grad_cosine": float(F.cosine_similarity(grad, ref_grad, 0)),
                     "ok": d_out <= tol["out"] and d_loss <= tol["loss"] and d_grad <= tol["grad"],
                     "tolerance": tol})
    return rows


# --- report ----------------------------------------------------------------------------------

def add_ratios_and_flops(rows: list[dict], flops: dict, peak) -> None:
    """Ratio to the original recipe at the same resolution, achieved GFLOP/s and share of peak."""
    base = {r["resolution"]: r for r in rows if r.get("variant") == "original" and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        g = flops[r["resolution"]]["train_step_original" if r["impl"] == "plain" else "train_step_ours"]
        r["gflop_per_image"] = g
        r["gflop_per_s"] = r["images_per_s"] * g
        r["peak_gflop_per_s"] = peak(r["precision"])
        r["share_of_peak"] = r["gflop_per_s"] / r["peak_gflop_per_s"]
        b = base.get(r["resolution"])
        r["ratio_to_original"] = r["images_per_s"] / b["images_per_s"] if b else None
        r["cpu_ratio_to_original"] = r["images_per_cpu_s"] / b["images_per_cpu_s"] if b else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 112, 224])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop timing a variant after this many seconds (at least 3 steps); 0 = no limit")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all variants; the best round is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = one per core")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device peak (TFLOP/s)")
    ap.add_argument("--check", action="store_true", help="first compare bf16/channels-last/compile with fp32")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--check-options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    ap.add_argument("--out", default="", help="JSON file (default benchmarks/results/train_throughput.json)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child)), default=common._json_default))
        return 0
    for v in args.variants:
        parse_variant(v)
    threads = common.set_threads(args.threads)
    device = common.pick_device(args.device)
    info = common.machine_info(device, threads)
    print(f"machine: {json.dumps(info)}", flush=True)
    checks = []
    if args.check or args.check_only:
        checks = check_options(min(args.resolutions), device, options=args.check_options)
        print(common.markdown_table(checks, ["option", "max_abs_out", "rel_loss", "rel_grad", "grad_cosine", "ok",
                                             "error"]))
        if args.check_only:
            common.write_json("train_options_check", {"machine": info, "checks": checks}, args.out)
            return 0 if all(c["ok"] for c in checks) else 1
    import flops as flops_mod

    from flowsan_lib.models import load_matcher
    matcher = load_matcher("faceapi")
    flops = {r: flops_mod.model_flops(r, matcher) for r in args.resolutions}
    peak = lambda precision: common.device_peak_gflops(device, precision, threads, args.peak_tflops)
    best: dict = {}
    for rep in range(args.repeats):
        for r in args.resolutions:
            for v in args.variants:
                job = {"resolution": r, "variant": v, "steps": args.steps, "warmup": args.warmup,
                       "budget_s": args.budget_s,
                       "threads": args.threads, "device": args.device}
                res = common.run_child(Path(__file__), ["--child", json.dumps(job)])
                res.setdefault("variant", v)
                res.setdefault("resolution", r)
                key = (r, v)
                if key not in best or res.get("images_per_s", -1) > best[key].get("images_per_s", -1):
                    best[key] = res
                shown = res.get("error", "")[-300:] or f"{res['images_per_s']:.2f} img/s, peak {res['peak_mib']:.0f} MiB"
                print(f"[round {rep + 1}] {r} px {v}: {shown} (load {common.load_average():.1f})", flush=True)
    rows = [best[(r, v)] for r in args.resolutions for v in args.variants]
    add_ratios_and_flops(rows, flops, peak)
    cols = ["resolution", "variant", "impl", "precision", "batch", "timed_steps", "images_per_s",
            "images_per_s_mean", "ratio_to_original", "images_per_cpu_s", "cpu_ratio_to_original", "peak_mib", "rss_before_mib", "gflop_per_image", "gflop_per_s", "share_of_peak", "load_average_1min"]
    print(common.markdown_table(rows, cols))
    path = common.write_json("train_throughput", {"machine": info, "args": vars(args), "checks": checks,
                                                  "flops": flops, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
