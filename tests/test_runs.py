"""`flowsan runs`: one line per run with preset, per-stage status, headline metrics and age."""
import json
import shutil

from flowsan_lib import cli
from flowsan_lib.core.integrity import hash_tree
from flowsan_lib.core.layout import MARKER, STAGE_NAMES, RunLayout
from flowsan_lib.report import runs


def _fake_run(root, name, done, failed=None, preset="quick"):
    lay = RunLayout(root / name)
    lay.log_file.parent.mkdir(parents=True)
    lay.log_file.write_text(f"[2026-01-01 10:00:00] INFO run {name}: preset {preset}, stages 01_data\n")
    for s in done:
        lay.stage_dir(s).mkdir()
        (lay.stage_dir(s) / "metrics.json").write_text("{}")
        lay.marker(s).write_text(json.dumps({"fingerprint": "x", "seconds": 1.5, "finished": "2026-01-01",
                                             "files": hash_tree(lay.stage_dir(s), skip=(MARKER,))}))
    if failed:
        lay.partial_dir(failed).mkdir()
        lay.notebook_dir.mkdir()
        lay.executed_notebook(failed, "failed").write_text("{}")
    return lay.root


def test_runs_table_statuses_preset_and_age(tmp_path):
    _fake_run(tmp_path, "a", STAGE_NAMES[:3], failed=STAGE_NAMES[3], preset="/some/where/mine.yaml")
    _fake_run(tmp_path, "b", STAGE_NAMES[:1])
    (tmp_path / "not-a-run.txt").write_text("")
    table = runs.runs_table(tmp_path, now=runs.last_activity(tmp_path / "a") + 7200)
    line_a = next(x for x in table.splitlines() if x.startswith("a "))
    assert "mine.yaml" in line_a and "/some/where" not in table            # a preset path: its name only
    assert "+++X.." in line_a and "2 h" in line_a
    assert "+....." in next(x for x in table.splitlines() if x.startswith("b "))
    assert "not-a-run" not in table


def test_runs_command_shows_the_smoke_run_headline(smoke_run, tmp_path, capsys):
    shutil.copytree(smoke_run.run_dir, tmp_path / "smoke", ignore=shutil.ignore_patterns("report"))  # runs verifies every file
    assert cli.main(["runs", "--outputs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("smoke "))
    h = runs.headline(smoke_run.run_dir)
    assert "++++++" in line and f"{h['eer_flowsan']:.3f}" in line and f"{h['eer_orig']:.3f}" in line
    assert line.split()[1] == "smoke"


def test_a_stage_edited_after_it_finished_shows_as_damaged(tmp_path):
    _fake_run(tmp_path, "a", STAGE_NAMES[:3])
    (tmp_path / "a" / STAGE_NAMES[1] / "metrics.json").write_text('{"edited": 1}')
    table = runs.runs_table(tmp_path)
    assert "+!+..." in next(x for x in table.splitlines() if x.startswith("a "))
    assert f"{STAGE_NAMES[1]}/metrics.json was modified" in table
