"""The real pipeline on the `smoke` preset, end to end, through the real runner and report.

Runs once per test session (the `smoke_run` fixture in conftest.py, shared with the report and explorer
tests) into a temporary outputs folder; the assertions read the files and metrics JSON the stages wrote,
and open the report in headless Chromium where available.
"""
import json
from pathlib import Path

from flowsan_lib.core import config
from flowsan_lib.report import html as report
from flowsan_lib.run import pipeline

from .browser import chromium_page

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_every_stage_ran_and_wrote_its_outputs(smoke_run):
    run_dir = smoke_run.run_dir
    assert smoke_run.ran == [s.name for s in pipeline.STAGES]
    for stage in pipeline.STAGES:
        for name in stage.outputs:
            assert (run_dir / stage.name / name).exists(), f"{stage.name}/{name}"
        assert (run_dir / "notebooks" / f"{stage.name}.ipynb").exists()
        assert (run_dir / "logs" / f"{stage.name}.log").exists()
    assert config.load(run_dir / "params.yaml") == config.load("smoke")


def _is_rate(v) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


def test_metrics_json_holds_the_headline_numbers(smoke_run):
    """Each stage's metrics.json holds its headline numbers, consistent with the run's parameters."""
    run_dir, P = smoke_run.run_dir, config.load("smoke")
    data = json.loads((run_dir / "01_data" / "metrics.json").read_text())
    assert data["faces"] == sum(data["splits"].values()) and min(data["splits"].values()) > 0
    assert data["resolution"] == P.data.resolution and data["subject_disjoint"] is True
    flow = json.loads((run_dir / "04_flowsan" / "metrics.json").read_text())
    n = P.san.n_stages
    assert flow["n_stages"] == n and flow["n_test"] == data["splits"]["test"]
    assert set(flow["aux_auc"]) == {f"G{i:02d}" for i in range(1, P.aux.n_classifiers + 1)}
    for g in flow["aux_auc"].values():                       # seen AUCs: original, then t = 1..n
        assert _is_rate(g["original"]) and len(g["flowsan"]) == n and all(map(_is_rate, g["flowsan"]))
    m = flow["matcher"]
    assert _is_rate(m["tmr_original"]) and len(m["tmr_flowsan"]) == n and all(map(_is_rate, m["tmr_flowsan"]))
    ev = json.loads((run_dir / "05_evaluate" / "metrics.json").read_text())
    summary = ev["summary"][f"n{n}"]
    for method in ("original", "flowsan", "ens_avg", "ens_gibbs"):
        auc = summary[method]["mean_auc"]
        assert _is_rate(auc["value"]) and auc["lo"] <= auc["value"] <= auc["hi"], (method, auc)
        dev = summary[method]["mean_auc_dev"]["value"]          # mean of |AUC - 0.5| >= |mean AUC - 0.5|
        assert abs(auc["value"] - 0.5) - 1e-12 <= dev <= 0.5, (method, dev)
    assert set(ev["classifiers"]) >= set(P.evaluate.classifiers)
    assert set(ev["matchers"]) >= set(P.evaluate.matchers)


def test_second_run_skips_everything(smoke_run):
    again = pipeline.run("smoke", pipeline.RunOptions(output_dir=smoke_run.run_dir.parent, report=False))
    assert again.ran == [] and len(again.skipped) == len(pipeline.STAGES)


def test_report_opens_offline(smoke_run):
    pages = sorted((smoke_run.run_dir / "report").glob("*.html"))
    assert {p.stem for p in pages} >= {"index"} | {s.name for s in pipeline.STAGES}
    for page in pages:
        text = page.read_text()
        assert report.external_references(text) == [], page.name
        assert "<script" not in text.lower(), page.name
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium_page() as (page, network):
        for html in pages:
            page.goto(html.as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(ARTIFACTS / f"report-{html.stem}.png"), full_page=False)
        assert network == [], f"report pages tried to load {network[:5]}"
        assert (ARTIFACTS / "report-index.png").stat().st_size > 1000
