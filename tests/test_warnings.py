"""Known harmless third-party deprecations are filtered by message; a real warning still shows."""
import subprocess
import sys

import pytest

CODE = """
import warnings
warnings.simplefilter("default")       # as a notebook kernel shows them
import flowsan_lib
import fastai.vision.all                # runs torch.jit.script at import (deprecated in torch >= 2.10)
warnings.warn("a real problem", UserWarning)
warnings.warn("a real deprecation", FutureWarning)
"""


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_fastai_jit_deprecation_filtered_real_warnings_shown():
    err = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300).stderr
    assert "torch.jit.script" not in err, err
    assert "UserWarning: a real problem" in err and "FutureWarning: a real deprecation" in err, err
