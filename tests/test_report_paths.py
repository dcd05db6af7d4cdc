"""A failed stage's notebook, rendered into the report, shows its traceback with paths relative to the
project (and Python's folders by name), never this machine's absolute paths."""
import pytest

from flowsan_lib.core.layout import Stage
from flowsan_lib.report import html as report
from flowsan_lib.run import pipeline

from .test_pipeline import WRITE_A, _notebook
from .test_report_front_page import machine_paths

FAIL_IN_LIBRARY = """from flowsan_lib.core import config
import warnings
warnings.warn("a warning printed with its file path")
config.load("no-such-preset")
"""


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_failed_stage_page_has_no_machine_path(tmp_path):
    nb = tmp_path / "notebooks"
    nb.mkdir()
    _notebook(nb / "a.ipynb", WRITE_A)
    _notebook(nb / "f.ipynb", FAIL_IN_LIBRARY)
    stages = (Stage("a", ("data",)), Stage("f", ("san",)))
    with pytest.raises(pipeline.RunError):
        pipeline.run("smoke", pipeline.RunOptions(stages=stages, notebook_dir=nb, output_dir=tmp_path / "outputs",
                                                  fetch_models=False))
    run_dir = tmp_path / "outputs" / "smoke"
    raw = (run_dir / "notebooks" / "f.failed.ipynb").read_text()
    assert str(pipeline.LIBRARY) in raw                       # the raw traceback names the library file...
    report.build_report(run_dir)
    page = (run_dir / "report" / "f.failed.html").read_text()
    assert "&lt;project&gt;/flowsan_lib/core/config.py" in page and "no-such-preset" in page   # ...the page relative
    index = (run_dir / "report" / "index.html").read_text()
    assert "href='f.failed.html'" in index and "<td>failed</td>" in index
    for f in (run_dir / "report").iterdir():
        text = f.read_text(errors="replace")
        assert not [p for p in machine_paths(run_dir) if p in text], f.name
