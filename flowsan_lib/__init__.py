"""FlowSAN Workbench: semi-adversarial networks for soft-biometric privacy of face images.

The library is layered (docs/ARCHITECTURE.md). Every import, also one inside a function, runs from a
layer to the same or a lower one, and the module graph has no circles (tests/test_architecture.py).
"""
import warnings as _warnings

__version__ = "0.1.0"

# Top to bottom. A package or top-level module of flowsan_lib belongs to the layer that names it.
LAYERS = (
    ("cli", "anonymize"),   # entry points
    ("run",),               # papermill runner, stage setup, kernels, sweeps, compare
    ("report",),            # HTML report, run index, explorer widgets and app
    ("stages",),            # one entry point per notebook stage
    ("evaluate",),          # metrics, pairs, suites, attacks
    ("method",),            # losses, frozen networks, directions, prototypes, inference, fitting, SAN training
    ("data",),              # adapters, alignment, splits, crop cache, resampling
    ("viz", "models"),      # charts and image grids; network definitions, pretrained ports, fetching
    ("core",),              # config, device, integrity, progress, layout, seeding, code graph
)

# Known harmless third-party deprecation, filtered by its exact message only: fastai 2.8 decorates a few
# layers with torch.jit.script at import time, which torch >= 2.10 deprecates (FutureWarning printed in
# red in every notebook that imports fastai). Our code does not call torch.jit; every other warning shows.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
