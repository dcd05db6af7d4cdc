"""What the data stage reads from outside the run, by content: the digest in 01_data's fingerprint.

`input_files(D)` lists every file 01 reads for DataParams D: each image its sources list and the
files their labels come from (LFW's gender lists, CelebA's attribute, identity and partition lists,
a manifest CSV; UTKFace's labels are its file names, which are part of the list). `input_digest(D)`
hashes their paths and contents, so a flipped label or an overwritten photo makes 01 stale. The
sha256 of each file is cached in `<cache_dir>/file-hashes.json` under its path, size, mtime, ctime
and inode: an unchanged folder is only stat-ed, never read again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flowsan_lib.core.integrity import atomic_write_text, sha256_file
from flowsan_lib.data import adapters
from flowsan_lib.data.cache import default_cache_dir

HASH_CACHE = "file-hashes.json"
FORMAT = 1


def input_files(data_params) -> list[Path]:
    """Every file the data stage reads for these DataParams: listed images and label sources, sorted."""
    files: set[str] = set()
    for source in data_params.sources:
        files.update(adapters.load_source(source, data_params.data_root)["path"])
        files.update(str(p.resolve()) for p in adapters.label_files(source, data_params.data_root))
    return [Path(f) for f in sorted(files)]


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class FileHashes:
    """sha256 of files, remembered under (size, mtime, ctime, inode) in one JSON file: a cache, never a source
    of truth (a damaged or missing cache file only means hashing again)."""

    def __init__(self, path: Path):
        self.path, self.dirty = Path(path), False
        try:
            doc = json.loads(self.path.read_text())
            self.entries = doc["files"] if doc.get("format") == FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the cache when its stat is unchanged; "missing" when it is not a readable file."""
        try:
            key = _stat_key(path.stat())
        except OSError:
            return "missing"
        cached = self.entries.get(str(path))
        if isinstance(cached, list) and cached[:4] == key:
            return cached[4]
        try:
            digest = sha256_file(path)
        except OSError:
            return "missing"                           # a folder, or unreadable: the stage reports it
        self.entries[str(path)] = key + [digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        """Write the cache back (atomically) when it learned something; a read-only cache folder is no error."""
        if not self.dirty:
            return
        try:
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "files": self.entries}))
        except OSError:
            pass                                       # only a cache: the next run hashes again
        self.dirty = False


def input_digest(data_params) -> dict:
    """{"files": how many, "sha256": digest of every input file's path and content} for DataParams."""
    files = input_files(data_params)
    hashes = FileHashes(default_cache_dir(data_params.cache_dir) / HASH_CACHE)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\t{hashes.sha256(f)}\n".encode())
    hashes.save()
    return {"files": len(files), "sha256": h.hexdigest()}
