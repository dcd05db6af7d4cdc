"""Committed notebooks carry no outputs and expose their parameters in a tagged first code cell."""
from pathlib import Path

import nbformat
import pytest

from flowsan_lib.run import pipeline

NOTEBOOKS = sorted(pipeline.NOTEBOOK_DIR.glob("*.ipynb"))


def test_every_stage_has_a_notebook():
    names = {p.stem for p in NOTEBOOKS}
    assert {s.name for s in pipeline.STAGES} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged parameters"
    stage_names = {s.name for s in pipeline.STAGES}
    needed = ("preset", "run_dir", "overrides", "inputs", "out_dir") if path.stem in stage_names else ("runs", "out_dir")
    for name in needed:
        assert f"{name} =" in code[0].source
