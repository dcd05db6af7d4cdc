"""Progress bars: a live widget only for a stage run by hand in a Jupyter kernel, plain text otherwise."""

from flowsan_lib.core import progress


def test_text_under_papermill_widget_by_hand(monkeypatch):
    monkeypatch.setattr(progress, "_in_jupyter_kernel", lambda: True)
    progress.set_interactive(False)                     # as setup_stage does for an injected (papermill) stage
    bar = progress.progress(total=3, desc="align")
    assert type(bar).__module__ == "tqdm.std"
    bar.close()
    progress.set_interactive(True)                      # opened by hand in JupyterLab
    try:
        assert progress.live()
        from tqdm.notebook import tqdm as widget_tqdm
        bar = progress.progress(total=3, desc="align")
        assert isinstance(bar, widget_tqdm)
        bar.close()
    finally:
        progress.set_interactive(False)


def test_setup_stage_reports_interactive(tmp_path, monkeypatch):
    from flowsan_lib.run.stage_setup import setup_stage
    monkeypatch.setenv("FLOWSAN_OUTPUTS", str(tmp_path))
    setup_stage("smoke", "r1", {}, "01_data")           # no injected out_dir: a notebook run by hand
    assert progress._interactive
    setup_stage("smoke", "r1", {}, "02_prototypes", {}, "02_prototypes.partial")
    assert not progress._interactive
