"""Per-image optimisation (`pio`, flowsan_lib.method.pio) images per second at each k, on the CPU by default.

    OMP_NUM_THREADS=2 nice python benchmarks/pio_speed.py [--resolution 64] [--images 64] [--batch 64]
        [--steps 10 50 200] [--n-aux 3] [--seen-classifiers] [--device cpu] [--out FILE]

J is the default recipe's (SanParams defaults: w_match 8 with the faceapi matcher, w_gender 1), against
n-aux freshly initialised auxiliary CNNs of the original design (the cost of a step does not depend on
the weights) plus, with --seen-classifiers, the pretrained hse_gender; input diversity on. Images are
the embedded sample's faces (gray, resized), repeated to --images. One run to the largest k yields
every smaller k (Adam's trajectory is the same), so the time to k is read on the way; images per
second at k = images / seconds to reach k (the descriptors of the originals included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flowsan_lib.core.config import SanParams
from flowsan_lib.method.frozen import loss_matcher
from flowsan_lib.method.pio import PioSetup, freeze, pio, seen_gender
from flowsan_lib.models.aux_cnn import AuxGenderCNN


def sample_faces(resolution: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n gray crops [n,1,R,R] of the embedded sample (repeated) and their gender labels."""
    from PIL import Image

    from flowsan_lib.data.adapters import SAMPLE_ROOT, load_utkface
    t = load_utkface(SAMPLE_ROOT / "utkface")
    t = t[t.gender >= 0].sort_values("path").reset_index(drop=True)
    gray = np.stack([np.asarray(Image.open(p).convert("L").resize((resolution, resolution), Image.BILINEAR))
                     for p in t.path])
    idx = np.arange(n) % len(gray)
    return torch.from_numpy(gray[idx]).unsqueeze(1), torch.from_numpy(t.gender.to_numpy()[idx]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--n-aux", type=int, default=3)
    ap.add_argument("--seen-classifiers", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pio_speed.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    sp = dataclasses.replace(SanParams(), output="residual", eps=8.0, center_edit=True, input_diversity=True,
                             seen_classifiers=["hse_gender"] if a.seen_classifiers else [])
    torch.manual_seed(0)
    aux = [freeze(AuxGenderCNN(a.resolution, "original").to(device)) for _ in range(a.n_aux)]
    setup = PioSetup(seen_gender(aux, sp, device), freeze(loss_matcher(sp, device)), sp, 0, 0.1, a.batch)
    x, y = sample_faces(a.resolution, a.images)
    t0 = time.perf_counter()
    res = pio(x, y, setup, a.steps, device)
    wall = time.perf_counter() - t0
    rows = [{"k": k, "seconds_per_image": res.seconds[k], "images_per_second": 1 / res.seconds[k],
             "objective": res.objective[k]} for k in sorted(a.steps)]
    info = {"resolution": a.resolution, "images": a.images, "batch": a.batch, "device": str(device),
            "threads": torch.get_num_threads(), "seen_gender": setup.gender.name, "matcher": sp.matcher,
            "objective_start": res.objective[0], "wall_seconds": wall, "torch": torch.__version__}
    print(f"pio at {a.resolution} px on {device} ({torch.get_num_threads()} threads), {a.images} images in batches "
          f"of {a.batch}; J against {setup.gender.name} + {sp.matcher}\n")
    print("| k | s / image | images / s | J (start " f"{res.objective[0]:.3f}) |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['k']} | {r['seconds_per_image']:.3f} | {r['images_per_second']:.2f} | {r['objective']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"setup": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
