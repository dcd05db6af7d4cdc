"""FLOPs per image of the real modules (SAN, auxiliary gender CNN, face-api matcher), counted by torch.

    python benchmarks/flops.py [--resolutions 64 112 224] [--aux-arch original] [--out FILE]

Counts with torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions, forward and
backward; element-wise work is not counted), batch 2 divided by 2. A training step is one SAN
forward of both outputs, J_M (matcher on I'_sm and I'_op), J_G (G on both) and the backward pass
(weight gradients of the SAN only: G and M are frozen, their inputs still get gradients). The
original recipe runs the SAN layer by layer (`SAN.reference_forward`) and recomputes the matcher
descriptor of the original image every step (one more matcher forward, no backward); ours uses the
phase-conv forward (`SAN.forward`, the same function) and reads the descriptor from a cache. The
optimizer's element-wise update is not counted. `train_throughput.py` divides measured throughput by these numbers.
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the project root on sys.path)
import torch
from torch.utils.flop_counter import FlopCounterMode

from flowsan_lib.method.losses import SanLoss
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN


def count_flops(fn) -> int:
    """FLOPs of everything `fn()` runs (forward and, if it calls backward, backward)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def model_flops(resolution: int, matcher, aux_arch: str = "original", width: float = 1.0) -> dict:
    """GFLOP per image of each module and of a training step, at one resolution (fp32 graph)."""
    b, r = 2, resolution
    torch.manual_seed(0)
    san = SAN(r, 3, width)
    aux = freeze(AuxGenderCNN(r, aux_arch))
    x, p = torch.rand(b, 1, r, r), torch.rand(b, 3, r, r)
    y = torch.tensor([0.0, 1.0])
    loss = SanLoss(aux, matcher)
    desc = matcher(x).detach()

    def step(forward):
        loss(forward(x, p, p), x, desc, y).backward()

    g = {"san_forward": count_flops(lambda: san(x, p, p)),
         "san_forward_layered": count_flops(lambda: san.reference_forward(x, p, p)),
         "san_perturb": count_flops(lambda: san.perturb(x, p, p)),
         "aux_forward": count_flops(lambda: aux(x)),
         "matcher_forward": count_flops(lambda: matcher(x)),
         "train_step_ours": count_flops(lambda: step(san))}
    g["train_step_original"] = count_flops(lambda: step(san.reference_forward)) + g["matcher_forward"]
    out = {k: v / b / 1e9 for k, v in g.items()}
    out["san_params"] = sum(q.numel() for q in san.parameters())
    out["san_share_of_step"] = count_flops(lambda: san(x, p, p)[0].sum().backward()) / b / 1e9 / out["train_step_ours"]
    return out


def flops_table(resolutions, aux_arch: str = "original") -> list[dict]:
    """One row per resolution: GFLOP per image of each module and training step."""
    from flowsan_lib.models import load_matcher
    matcher = load_matcher("faceapi")
    rows = []
    for r in resolutions:
        rows.append({"resolution": r, **model_flops(r, matcher, aux_arch)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 112, 224])
    ap.add_argument("--aux-arch", default="original")
    ap.add_argument("--out", default="", help="JSON file (default benchmarks/results/flops.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = flops_table(args.resolutions, args.aux_arch)
    cols = ["resolution", "san_forward_layered", "san_forward", "san_perturb", "aux_forward", "matcher_forward", "train_step_ours",
            "train_step_original", "san_share_of_step"]
    print("GFLOP per image (FlopCounterMode; matcher input is always 150 px)")
    print(common.markdown_table(rows, cols))
    path = common.write_json("flops", {"unit": "GFLOP per image", "aux_arch": args.aux_arch, "rows": rows}, args.out)
    print(f"wrote {path.relative_to(common.ROOT) if path.is_relative_to(common.ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
