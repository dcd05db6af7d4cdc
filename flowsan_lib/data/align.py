"""Face detection and 5-point alignment with dlib into one canonical 150 px chip per image.

The canonical crop is dlib's face chip: HOG frontal detector (threshold 0), the 5-point shape
predictor, `get_face_chip(size=150, padding=0.25)`. It reproduces the reference pack's chips
bit-exactly. Every input problem is returned in `info` (never raised), so a run over thousands of
files cannot crash on one bad file:

| info["reason"] | meaning |
| --- | --- |
| ""          | aligned (info["ok"] is True) |
| "unreadable"| not an image, missing, or an undecodable format |
| "truncated" | the file ends early (decoding would invent pixels) |
| "no_face"   | no detection in any detector pass |

Kept images may carry flags: several detections (`n_faces` > 1: the largest face that lies wholly
inside the image is taken, so that a bigger face cut by the border, often a bystander, is not), a
converted colour mode (`mode` is not RGB: CMYK, RGBA, LA, P, 16-bit, grayscale...), or a fallback
detector pass (`det_pass` > 0: zero-padded image and/or upsample 0, for tight crops like UTKFace).
"""
from __future__ import annotations

import io
import time
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

CHIP_SIZE = 150          # dlib face chip side, as the reference pack and dlib's ResNet
CHIP_PADDING = 0.25      # dlib face chip padding
DETECT_THRESHOLD = 0.0   # dlib HOG detector adjust_threshold
PAD_FRACTION = 0.25      # zero border added (per side) in the fallback passes
ALIGN_VERSION = 2        # bump when the recipe changes: it invalidates the crop cache
PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
# Longest side an image is shrunk to before detection when a caller passes max_side (anonymize does;
# the data stage does not, so its chips and crop cache are unchanged). An 8000 x 8000 photo costs
# ~3.8 GB through dlib's upsampled and padded passes; at 1280 px it costs ~0.1 GB. The landmarks and
# the chip are taken from the same downscaled image: the chip is 150 px with the face ~100 px wide, so
# any face at least ~8% of the longest side keeps every pixel the chip can hold, and only small faces
# in huge group photos are cut from fewer pixels (upsample 1 still finds faces down to ~40 px).
MAX_SIDE = 1280


def detector_passes(upsample: int) -> list[tuple[bool, int]]:
    """(zero-padded?, upsample) tried in order until a face is found."""
    passes = [(False, upsample), (True, upsample), (False, 0), (True, 0)]
    return list(dict.fromkeys(passes))  # upsample 0 gives two passes, not four


def align_params(upsample: int) -> dict:
    """Everything that determines a chip: the crop cache key is built from it."""
    import dlib

    from flowsan_lib.models.fetch import provenance
    return {"chip_size": CHIP_SIZE, "padding": CHIP_PADDING, "threshold": DETECT_THRESHOLD,
            "upsample": upsample, "passes": detector_passes(upsample), "pad_fraction": PAD_FRACTION,
            "predictor_sha256": provenance(PREDICTOR_FILE)["sha256"], "dlib": dlib.__version__,
            "version": ALIGN_VERSION}


# --- reading any image into 8-bit RGB ----------------------------------------------------------

def _to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; alpha is composited on white, 16/32-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0  # 16-bit data stored in an int container
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        back = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(back, img).convert("RGB")
    return img.convert("RGB")  # RGB, L, 1, CMYK, YCbCr, LAB, HSV


def downscale(img: Image.Image, max_side: int | None) -> tuple[Image.Image, float]:
    """img with its longest side shrunk to max_side (antialiased; never enlarged) and the scale applied."""
    longest = max(img.size)
    if not max_side or longest <= max_side:
        return img, 1.0
    scale = max_side / longest
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.BILINEAR, reducing_gap=3.0), scale


def read_rgb(src, max_side: int | None = None) -> tuple[np.ndarray | None, dict]:
    """Decode a path, bytes or array into uint8 RGB [H,W,3]; info holds mode and any failure.

    max_side: shrink larger images to this longest side (JPEG decodes at a reduced DCT scale first,
    so a huge photo never exists at full size); info["scale"] is the factor applied.
    """
    info = {"ok": False, "reason": "", "detail": "", "mode": "", "scale": 1.0}
    if isinstance(src, np.ndarray):
        if max_side and max(src.shape[:2]) > max_side:
            return read_rgb(Image.fromarray(src), max_side)
        return _array_to_rgb(src, info)
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            img = Image.open(io.BytesIO(data))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            # a bomb (e.g. 20000 x 20000 px) is refused by its header, before any pixel is decoded
            info.update(reason="unreadable", detail=f"{type(e).__name__}: {e}")
            return None, info
    info["mode"] = img.mode
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut file must fail, not get grey rows
        longest = max(img.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the pixels are what matter
            if max_side and longest > max_side and img.format == "JPEG":
                img.draft("RGB", (img.width * max_side // longest, img.height * max_side // longest))
            img.load()
            img = ImageOps.exif_transpose(img)
        img, _ = downscale(_to_rgb8(img), max_side)
        info["scale"] = max(img.size) / longest
        rgb = np.asarray(img, dtype=np.uint8)
    except OSError as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or "broken data stream" in msg else "unreadable"
        info.update(reason=reason, detail=f"{type(e).__name__}: {msg}")
        return None, info
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        info.update(reason="unreadable", detail=f"{type(e).__name__}: {e}")
        return None, info
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 8:
        info.update(reason="unreadable", detail=f"image too small: {rgb.shape}")
        return None, info
    info["ok"] = True
    return np.ascontiguousarray(rgb), info


def _array_to_rgb(a: np.ndarray, info: dict):
    """uint8/uint16/float arrays, gray or RGB(A), into uint8 RGB."""
    info["mode"] = f"array:{a.dtype}:{a.shape[2] if a.ndim == 3 else 1}"
    if a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        info.update(reason="unreadable", detail=f"unsupported array shape {a.shape}")
        return None, info
    if a.shape[2] == 4:
        return read_rgb(Image.fromarray(a, "RGBA"))
    info["ok"] = True
    return np.ascontiguousarray(a), info


# --- detection, landmarks, chip ----------------------------------------------------------------

@lru_cache(maxsize=1)
def _models():
    """dlib HOG detector and 5-point predictor, loaded once per process."""
    import dlib

    from flowsan_lib.models.fetch import weight_path
    predictor = weight_path(PREDICTOR_FILE)   # sha256-checked: a damaged .dat is a FetchError, not a dlib crash
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor))


def chip_landmarks(points: np.ndarray, details) -> np.ndarray:
    """Map image points [k,2] into chip pixel coordinates (inverse of dlib's chip mapping)."""
    r, n = details.rect, details.rows
    cx, cy = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2
    step_x, step_y = (r.right() - r.left()) / (n - 1), (r.bottom() - r.top()) / (details.cols - 1)
    c, s = np.cos(details.angle), np.sin(details.angle)
    d = points - [cx, cy]
    local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)  # rotate by -angle
    return (local / [step_x, step_y] + [(n - 1) / 2, (details.cols - 1) / 2]).astype(np.float32)


def pick_face(rects, width: int, height: int) -> int:
    """Index of the largest detection wholly inside the image (of the largest overall if none is)."""
    inside = [r.left() >= 0 and r.top() >= 0 and r.right() < width and r.bottom() < height for r in rects]
    areas = [r.area() if ok or not any(inside) else -1 for r, ok in zip(rects, inside)]
    return int(np.argmax(areas))


def detect_align(rgb: np.ndarray, upsample: int = 1) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """Detect (largest face), predict 5 landmarks and cut the 150 px chip from an RGB array."""
    import dlib
    detector, predictor = _models()
    info = {"ok": False, "reason": "no_face", "detail": "", "n_faces": 0, "det_score": float("nan"),
            "det_pass": -1}
    h, w = rgb.shape[:2]
    for k, (pad, up) in enumerate(detector_passes(upsample)):
        py, px = (int(round(h * PAD_FRACTION)), int(round(w * PAD_FRACTION))) if pad else (0, 0)
        img = np.pad(rgb, ((py, py), (px, px), (0, 0))) if pad else rgb
        rects, scores, _ = detector.run(img, up, DETECT_THRESHOLD)
        if len(rects):
            break
    else:
        info["detail"] = f"no detection in {len(detector_passes(upsample))} passes"
        return None, None, info
    best = pick_face(rects, img.shape[1], img.shape[0])
    shape = predictor(img, rects[best])
    details = dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
    chip = dlib.extract_image_chip(img, details)  # identical to get_face_chip(img, shape, 150, 0.25)
    pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    r = rects[best]
    info.update(ok=True, reason="", n_faces=len(rects), det_score=float(scores[best]), det_pass=k,
                rect=[r.left() - px, r.top() - py, r.right() - px, r.bottom() - py],
                landmarks_image=(pts - [px, py]).astype(np.float32))
    if len(rects) > 1:
        info["detail"] = f"{len(rects)} faces; took the largest wholly inside the image ({r.width()}x{r.height()} px)"
    return np.ascontiguousarray(chip, dtype=np.uint8), chip_landmarks(pts, details), info


def align_image(src, upsample: int = 1, max_side: int | None = None
                ) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """Path, bytes, PIL image or array -> (chip150 RGB uint8 | None, landmarks5 [5,2] in chip px | None, info).

    max_side: detect and align on the image shrunk to this longest side (see MAX_SIDE); info["size"]
    is then the detected image's size, info["scale"] the factor, and rect / landmarks_image are
    mapped back to the original image's pixels.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    rgb, info = read_rgb(src, max_side)
    chip = lm = None
    if rgb is not None:
        chip, lm, det = detect_align(rgb, upsample)
        info.update(det)
        info["size"] = [int(rgb.shape[1]), int(rgb.shape[0])]
        if chip is not None and info["scale"] != 1.0:
            info["rect"] = [round(v / info["scale"]) for v in info["rect"]]
            info["landmarks_image"] = (info["landmarks_image"] / info["scale"]).astype(np.float32)
    info["seconds"], info["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return chip, lm, info


def chip_to_resolution(chip: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """150 px RGB chip -> (gray [R,R], rgb [R,R,3]) uint8: PIL convert("L") and bilinear (antialiased) resize."""
    im = Image.fromarray(chip)
    size = (resolution, resolution)
    gray = np.asarray(im.convert("L").resize(size, Image.BILINEAR), dtype=np.uint8)
    rgb = np.asarray(im.resize(size, Image.BILINEAR), dtype=np.uint8)
    return gray, rgb


def landmarks_to_resolution(lm: np.ndarray, resolution: int) -> np.ndarray:
    """Chip-150 pixel coordinates -> R-px crop coordinates (pixel-centre convention, as PIL resize)."""
    return ((lm + 0.5) * (resolution / CHIP_SIZE) - 0.5).astype(np.float32)
