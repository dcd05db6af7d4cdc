"""Content, not existence: file hashes recorded when written and checked when read, atomic writes,
paths confined to where they belong. One definition of each, used by every module that writes."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


class IntegrityError(ValueError):
    """A file does not match the hash recorded when it was written, or a path leaves its folder."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under folder, keyed by its POSIX path relative to it (names in skip excluded)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def tree_problems(folder: Path, recorded: dict[str, str]) -> list[str]:
    """What differs between the files under folder and their recorded hashes ([] = intact)."""
    problems = []
    for rel, digest in recorded.items():
        p = Path(folder) / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel} was modified")
    return problems


def confined(base: Path, rel: str | os.PathLike, what: str) -> Path:
    """base / rel, refused unless it stays inside base (no '..', no absolute path, no symlink escape)."""
    base = Path(base).resolve()
    target = (base / rel).resolve()
    if Path(rel).is_absolute() or (target != base and base not in target.parents):
        raise IntegrityError(f"{what} {str(rel)!r} points outside {base}; give a path inside it")
    return target


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class LockHeld(RuntimeError):
    """Another process holds an advisory lock; `holder` is the pid it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by pid {holder}")
        self.path, self.holder = Path(path), holder


def acquire_lock(path: Path, wait_s: float = 0.0) -> int:
    """Take the exclusive advisory lock on `path` (created if missing) and write our pid into it.

    Returns the open descriptor: the lock lasts until it is closed (or the process dies, so a killed
    holder never leaves a stale lock). Raises LockHeld when another process still holds it after wait_s.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockHeld(path, holder) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def marker_problems(folder: Path, marker: str, required: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a finished folder against its marker file (`marker`, inside it), which recorded the
    sha256 of every file the folder's stage wrote ([] = intact): the marker missing, unreadable or recording
    no hashes (or none of a `required` file), a recorded file outside the folder, missing or modified. For
    readers that must not trust a number the pipeline would refuse (compare, runs)."""
    path = Path(folder) / marker
    if not path.is_file():
        return [f"{marker} is missing (the stage never finished)"]
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return [f"{marker} is not valid JSON"]
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return [f"{marker} records no file hashes"]
    wrong = [f"{marker} records no hash of {rel}" for rel in required if rel not in files]
    for rel in files:
        try:
            confined(folder, rel, "recorded file")
        except IntegrityError:
            wrong.append(f"{rel} (recorded in {marker}) lies outside the folder")
    return wrong or tree_problems(folder, files)


def lock_holder(path: Path) -> str | None:
    """The pid in a lock file whose lock another process holds now; None when nobody holds it or there is no
    file. Takes nothing and writes nothing: a refusal at once, before the real lock is taken (acquire_lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
