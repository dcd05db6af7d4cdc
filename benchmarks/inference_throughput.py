"""FlowSAN-n inference throughput for n = 1..5: tensor in to tensor out, and folder in to folder out.

    nice python benchmarks/inference_throughput.py [--resolutions 64 112 224] [--stages 5] [--images 128]
        [--folder-images 48] [--folder-resolution 64] [--options fp32 bf16 cl] [--device auto] [--out FILE]

A FlowSAN model folder with 5 stages is written for each resolution (stages freshly initialised
and seeded: the cost of a SAN does not depend on its weights; prototypes are the mean faces of the
real sample faces), through the library's `save_model` / `load_model`.
- tensor: `methods.flow_sequence(stages[:n], x, bank, y)` on real gray crops [N,1,R,R] (the transform
  between training stages and the inside of `FlowModel.anonymize`), batches of 128, no gradients.
  Options: `bf16` (autocast), `cl` (channels-last SANs), `layered` (the SANs computed layer by
  layer, `SAN.reference_forward`, as before the phase-conv forward: shows what that saves); each is
  compared with fp32 on the same images (max |difference| in uint8 grey levels after rounding).
- folder: `anonymize.anonymize_folder` on a folder of real sample photos with a labels CSV: model
  loading with checksum verification, dlib detection and alignment, FlowSAN-n, PNG writing. The
  alignment-only time of the same photos is reported so that the SAN's share is visible.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import common
import torch

from flowsan_lib.method import apply as methods
from flowsan_lib.method import modelio
from flowsan_lib.method.prototypes import make_bank, save_prototypes
from flowsan_lib.models.san import SAN

TOLERANCE_LEVELS = {"bf16": 8, "cl": 1, "layered": 1}  # max |difference| in grey levels (0..255) vs fp32


def make_model_folder(folder: Path, faces: common.Faces, n_stages: int) -> Path:
    """A FlowSAN model folder of n freshly initialised (seeded) SANs and the faces' mean-face prototypes."""
    folder.mkdir(parents=True, exist_ok=True)
    protos_file = folder.parent / f"{folder.name}_prototypes.safetensors"
    save_prototypes(faces.protos, protos_file)
    r = faces.x.shape[-1]
    stages = []
    for i in range(n_stages):
        torch.manual_seed(i)
        stages.append(SAN(r, 3))
    modelio.save_model(folder, "flowsan", stages, protos_file, {"benchmark": True}, {"name": "none"})
    return folder


def run_sequence(stages, x, bank, y, device, option: str) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds of FlowSAN over all images (tensor in, tensor out on the host), last output."""
    if option == "cl":
        stages = [s.to(device, memory_format=torch.channels_last) for s in stages]
    if option == "layered":
        stages = [common.layered(s) for s in stages]
    common.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    # the library's own precision switch (bf16: autocast inside apply_san); x on the device: tensor in/out there
    out = methods.flow_sequence(stages, x, bank, y, device=device, precision="bf16" if option == "bf16" else "fp32")[-1]
    common.sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def tensor_rows(resolution: int, n_stages: int, n_images: int, options, device, repeats: int, tmp: Path) -> list[dict]:
    """images/s of FlowSAN-n (n = 1..n_stages) on real crops, per option, with the fp32 difference."""
    faces = common.real_faces(resolution, 64)
    model = modelio.load_model(make_model_folder(tmp / f"flowsan_{resolution}", faces, n_stages), device)
    f = faces.tiled(n_images)
    x, y = f.x.to(device), f.y.to(device)
    bank = make_bank(model.protos, model.channels, model.warp).to(device)
    run_sequence(model.stages[:1], x[:8], bank, y[:8], device, "fp32")  # warm-up (allocator, kernels)
    import flops as flops_mod
    with torch.no_grad():                              # GFLOP of one SAN on one image
        g_perturb = flops_mod.count_flops(lambda: model.stages[0].perturb(x[:1], *bank.pair(torch.arange(1), y[:1]))) / 1e9
    rows, ref = [], {}
    for n in range(1, n_stages + 1):
        for opt in options:
            stages = [s.to(device, memory_format=torch.contiguous_format) for s in model.stages[:n]]
            secs, cpus = [], []
            common.reset_peak_memory(device)
            for _ in range(repeats):
                s, c, out = run_sequence(stages, x, bank, y, device, opt)
                secs.append(s)
                cpus.append(c)
            levels = methods.to_uint8(out.float()).astype(int)
            if opt == "fp32":
                ref[n] = levels
            diff = int(abs(levels - ref[n]).max()) if n in ref else None
            best = min(secs)
            peak = common.device_peak_gflops(device, "bf16" if opt == "bf16" else "fp32", torch.get_num_threads())
            rows.append({"mode": "tensor", "resolution": resolution, "n": n, "option": opt, "images": n_images,
                         "seconds": best, "images_per_s": n_images / best, "images_per_cpu_s": n_images / min(cpus),
                         "gflop_per_image": n * g_perturb, "share_of_peak": n_images / best * n * g_perturb / peak,
                         "peak_mib": common.peak_memory_mib(device)["peak_mib"],
                         "max_level_diff_vs_fp32": diff,
                         "ok": diff is None or diff <= TOLERANCE_LEVELS.get(opt, 0),
                         "load_average_1min": common.load_average()})
            print(f"tensor {resolution} px FlowSAN-{n} {opt}: {n_images / best:.1f} img/s", flush=True)
    return rows


def sample_folder(dest: Path, n_images: int) -> tuple[Path, Path]:
    """Copy n labelled sample photos (both genders) into dest/images; write dest/labels.csv."""
    faces = common.real_faces(64, n_images)  # the same photos the throughput faces come from
    root = common.ROOT / "flowsan_lib" / "sample_data"
    images = dest / "images"
    lines = ["file,gender"]
    for rel, g in zip(faces.files, faces.y.long().tolist()):
        target = images / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
        lines.append(f"{rel},{g}")
    (dest / "labels.csv").write_text("\n".join(lines) + "\n")
    return images, dest / "labels.csv"


def folder_rows(resolution: int, n_stages: int, n_images: int, tmp: Path) -> list[dict]:
    """images/s of `anonymize_folder` (photos in, PNG crops out) for n = 1..n_stages, plus alignment only."""
    from flowsan_lib.anonymize import AnonymizeJob, anonymize_folder, list_images
    from flowsan_lib.data import align_image
    images, labels = sample_folder(tmp / "folder_in", n_images)
    files = list_images(images)
    align_image(images / files[0], 1)  # loads dlib's models once, as anonymize_folder's first image does
    t0, c0 = time.perf_counter(), time.process_time()
    for rel in files:
        align_image(images / rel, 1)
    align_s, align_cpu = time.perf_counter() - t0, time.process_time() - c0
    faces = common.real_faces(resolution, 64)
    model = make_model_folder(tmp / f"flowsan_folder_{resolution}", faces, n_stages)
    rows = [{"mode": "align only", "resolution": resolution, "n": 0, "images": len(files), "seconds": align_s,
             "images_per_s": len(files) / align_s, "images_per_cpu_s": len(files) / align_cpu,
             "load_average_1min": common.load_average()}]
    for n in range(1, n_stages + 1):
        out = tmp / f"folder_out_{n}"
        t0, c0 = time.perf_counter(), time.process_time()
        summary = anonymize_folder(AnonymizeJob(model, images, out, stages=n, labels_csv=labels))
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"mode": "folder", "resolution": resolution, "n": n, "images": len(files), "ok": summary["ok"],
                     "seconds": secs, "images_per_s": len(files) / secs, "images_per_cpu_s": len(files) / cpu,
                     "load_average_1min": common.load_average()})
        print(f"folder {resolution} px FlowSAN-{n}: {len(files) / secs:.2f} img/s ({summary['ok']} faces)", flush=True)
        shutil.rmtree(out)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 112, 224])
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--images", type=int, default=128, help="crops per tensor measurement")
    ap.add_argument("--options", nargs="+", default=["fp32", "bf16", "cl"], choices=["fp32", "bf16", "cl", "layered"])
    ap.add_argument("--repeats", type=int, default=1, help="tensor runs per (n, option); the fastest is kept")
    ap.add_argument("--folder-images", type=int, default=48, help="photos in the folder measurement; 0 = skip")
    ap.add_argument("--folder-resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="", help="JSON file (default benchmarks/results/inference_throughput.json)")
    args = ap.parse_args(argv)
    if "fp32" not in args.options:
        args.options = ["fp32", *args.options]  # the reference the other options are checked against
    threads = common.set_threads(args.threads)
    device = common.pick_device(args.device)
    info = common.machine_info(device, threads)
    print(f"machine: {json.dumps(info)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.resolutions:
            rows += tensor_rows(r, args.stages, args.images, args.options, device, args.repeats, Path(tmp))
        if args.folder_images:
            rows += folder_rows(args.folder_resolution, args.stages, args.folder_images, Path(tmp))
    tensor = [r for r in rows if r["mode"] == "tensor"]
    print("tensor in -> tensor out (images/s)")
    print(common.markdown_table(tensor, ["resolution", "n", "option", "images", "images_per_s", "images_per_cpu_s",
                                         "share_of_peak", "peak_mib", "max_level_diff_vs_fp32", "ok",
                                         "load_average_1min"]))
    folder = [r for r in rows if r["mode"] != "tensor"]
    if folder:
        print("folder in -> folder out (photos/s, detection + alignment included)")
        print(common.markdown_table(folder, ["mode", "resolution", "n", "images", "seconds", "images_per_s",
                                             "images_per_cpu_s",
                                             "load_average_1min"]))
    path = common.write_json("inference_throughput", {"machine": info, "args": vars(args), "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0 if all(r.get("ok", True) for r in tensor) else 1


if __name__ == "__main__":
    raise SystemExit(main())
