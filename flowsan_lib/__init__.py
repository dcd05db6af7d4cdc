"""FlowSAN Workbench: semi-adversarial networks for soft-biometric privacy of face images."""
import warnings as _warnings

__version__ = "0.1.0"

# Known harmless third-party deprecation, filtered by its exact message only: fastai 2.8 decorates a few
# layers with torch.jit.script at import time, which torch >= 2.10 deprecates (FutureWarning printed in
# red in every notebook that imports fastai). Our code does not call torch.jit; every other warning shows.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
