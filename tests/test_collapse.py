"""04's collapse check (stages/flowsan.py): a stage whose edit explodes or whose seen-matcher TMR collapses is
warned about in the log and metrics.json, and a healthy run stays silent. The collapsed case is the one of
issue 26 (medium, faithful recipe, seen face-api TMR at FMR 1% 0.99 -> 0.875 / 0.749 / 0.019, the third
stage editing 53.8 grey levels with J_M stuck near 3.0 after the warm-up)."""
from __future__ import annotations

import csv
import json

from flowsan_lib.core import config
from flowsan_lib.stages import flowsan as fs

HEADER = ["epoch", "seconds", "train_loss", "train_J_D", "train_J_G", "train_J_M", "valid_loss", "valid_J_D",
          "valid_J_G", "valid_J_M"]


def write_history(path, jm_valid: list[float]):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for e, jm in enumerate(jm_valid, 1):
            w.writerow([e, 1.0, 10.0, 0.1, 0.7, jm, 10.0, 0.1, 0.7, jm])


def seen(edits: list[float], tmr: list[float], tmr_original: float = 0.99) -> dict:
    return {"stage_edits": [{"mean_grey": e, "max_grey": 255, "at_max": 0.0} for e in edits],
            "matcher": {"tmr_original": tmr_original, "tmr_flowsan": tmr}}


def medium_san():
    return config.load("medium").san                  # 3 stages x 8 epochs, J_M warm-up 2 epochs


def test_collapsed_medium_run_is_flagged_in_metrics_and_log(tmp_path, capsys):
    for t in (1, 2):                                  # healthy: J_M recovers after the 2 warm-up epochs
        write_history(tmp_path / f"flowsan_stage{t:02d}.csv", [3.1, 3.0, 2.2, 1.6, 1.3, 1.2, 1.1, 1.1])
    write_history(tmp_path / "flowsan_stage03.csv", [3.0, 3.0, 3.1, 3.0, 3.0, 2.9, 3.0, 3.0])
    out = fs.collapse_check(seen([18.0, 14.0, 53.8], [0.875, 0.749, 0.019]), tmp_path, medium_san())
    assert [c["stage"] for c in out["collapsed_stages"]] == [3]
    c = out["collapsed_stages"][0]
    assert c["edit_exploded"] and c["tmr_collapsed"] and c["jm_recovered"] is False
    msg = out["collapse_warnings"][0]
    assert msg.startswith("stage 3 collapsed: mean edit 54 grey levels, seen TMR 0.02 (originals 0.99)")
    assert "J_M 3.10 -> 3.00 after the warm-up (did not recover)" in msg and out["warnings"] == [msg]
    assert f"WARNING: {msg}" in capsys.readouterr().err


def test_documented_healthy_medium_run_stays_silent(tmp_path, capsys):
    for t in (1, 2, 3):
        write_history(tmp_path / f"flowsan_stage{t:02d}.csv", [3.1, 3.0, 2.2, 1.6, 1.3, 1.2, 1.1, 1.1])
    out = fs.collapse_check(seen([18.0, 14.0, 20.0], [0.87, 0.78, 0.41]), tmp_path, medium_san())
    assert out["collapsed_stages"] == [] and out["warnings"] == [] and out["collapse_judged"] == [1, 2, 3]
    out = capsys.readouterr()
    assert "WARNING" not in out.out + out.err


def test_each_symptom_alone_flags_the_stage():
    healthy = [{"mean_grey": 15.0}, {"mean_grey": 12.0}]
    exploded = fs.find_collapse([healthy[0], {"mean_grey": fs.EDIT_LIMIT + 1}], 0.9, [0.8, 0.7], [None, None], [8, 8])
    assert [(c["stage"], c["edit_exploded"], c["tmr_collapsed"]) for c in exploded] == [(2, True, False)]
    lost = fs.find_collapse(healthy, 0.9, [0.8, 0.1], [None, None], [8, 8])
    assert [(c["stage"], c["edit_exploded"], c["tmr_collapsed"]) for c in lost] == [(2, False, True)]
    assert fs.find_collapse(healthy, 0.9, [0.8, 0.7], [None, None], [8, 8]) == []


def test_a_loss_inherited_from_an_earlier_stage_is_not_a_new_collapse():
    edits = [{"mean_grey": 50.0}, {"mean_grey": 3.0}, {"mean_grey": 2.0}]
    found = fs.find_collapse(edits, 0.9, [0.05, 0.04, 0.03], [None] * 3, [8, 8, 8])
    assert [c["stage"] for c in found] == [1]


def test_stages_too_short_to_judge_are_not_flagged(tmp_path):
    """smoke trains 1 epoch per stage: its SANs have not converged, so nothing is judged (and nothing warned)."""
    P = config.load("smoke").san
    write_history(tmp_path / "ensemble_stage01.csv", [4.6])
    out = fs.collapse_check(seen([45.7, 3.2], [0.0, 0.0], 0.88), tmp_path, P)
    assert out["collapsed_stages"] == [] and out["collapse_judged"] == []


def test_history_of_a_shared_first_stage_is_the_ensemble_members(tmp_path):
    write_history(tmp_path / "ensemble_stage01.csv", [3.0, 2.0, 1.0])
    assert [r["valid_J_M"] for r in fs.stage_history(tmp_path, 1)] == ["3.0", "2.0", "1.0"]
    assert fs.stage_history(tmp_path, 2) == []
    rec = fs.jm_recovery(fs.stage_history(tmp_path, 1), warmup=1)
    assert rec == {"first": 2.0, "last": 1.0, "recovered": True}
    assert fs.jm_recovery(fs.stage_history(tmp_path, 1), warmup=2) is None    # one epoch after it: no verdict


def test_report_front_page_shows_the_collapse_line(tmp_path):
    from flowsan_lib.report import html as report
    run = tmp_path / "medium"
    (run / "04_flowsan").mkdir(parents=True)
    msg = "stage 3 collapsed: mean edit 54 grey levels, seen TMR 0.02 (originals 0.99)"
    (run / "04_flowsan" / "metrics.json").write_text(json.dumps({"collapse_warnings": [msg]}))
    page = report.index_page(run, {})
    assert "id='collapse'" in page and msg in page
    assert page.index(msg) < page.index("What was run")             # on top, before anything else
    (run / "04_flowsan" / "metrics.json").write_text(json.dumps({"collapse_warnings": []}))
    assert "id='collapse'" not in report.index_page(run, {})
