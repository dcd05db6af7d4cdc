"""The lock file: every direct requirement pinned within its range, the Makefile and environment.yml install
from it, and this environment agrees with it (the environment record names any difference)."""
from __future__ import annotations

import re

from packaging.requirements import Requirement

from flowsan_lib.core import environment as env
from flowsan_lib.core.layout import PROJECT_ROOT


def _requirements() -> list[Requirement]:
    lines = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    return [Requirement(ln.split("#", 1)[0].strip()) for ln in lines if ln.split("#", 1)[0].strip()]


def test_lock_pins_every_requirement_within_its_range():
    pins = env.lock_pins(env.LOCK_FILE)
    assert len(pins) > len(_requirements())                        # the dependencies are pinned too
    for req in _requirements():
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is in requirements.txt but not in requirements.lock: re-run pip-compile"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_make_and_conda_install_from_the_lock():
    make = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): requirements\.lock", make, re.M)
    assert "pip install --quiet -r requirements.lock" in make and "-r requirements.txt" not in make
    assert "- -r requirements.lock" in (PROJECT_ROOT / "environment.yml").read_text()


def test_lock_names_no_index_or_machine_path():
    text = env.LOCK_FILE.read_text()
    assert not re.search(r"--(extra-)?index-url|--find-links|file:/|https?://", text)


def test_this_environment_agrees_with_the_lock():
    mism = env.lock_mismatches(env.installed_packages(), env.lock_pins(env.LOCK_FILE))
    assert not mism, f"installed packages differ from requirements.lock (run `make setup`): {mism}"
