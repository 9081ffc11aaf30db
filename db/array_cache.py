"""A local, memory-mapped copy of large stored model versions, so that a process loads one in milliseconds.

A full version's arrays are one .npz blob in the database; at MovieLens-25M size it is about 100 MB,
and reading and unpacking it took most of a `cfb recommend` process. Versions never change once
written, so the first process that reads a large one also writes its arrays as .npy files under
``$CFB_HOME/model-cache/<key>/`` (into a temporary folder renamed into place, so a folder that
exists is complete), and later processes map them read-only: a request then reads only the arrays it
touches (whole when it scores every item; of the ranker's input tables, the rows of the user's
items). The key hashes the database URL (password hidden), the version id, its creation time and the
blob's length, so a recreated database never meets a stale copy. The cache is only a copy: any
failure to read or write it falls back to the database, and ``CFB_MODEL_CACHE=0`` turns it off. A copy
is checked for its files and their shapes, not summed: bytes changed inside an array (a failing disk, a
hand edit) are served; a checksum would read every page, which mapping the copy avoids.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, func, select

from ..cf_core.scoring import from_npz
from .engine import cfb_home
from .schema import ModelArrays, ModelVersion

CACHE_FROM_BYTES = 16 << 20  # smaller blobs are read from the database directly (a few ms)
MMAP_FROM_BYTES = 1 << 20  # arrays at least this large are mapped, smaller ones read
KEEP_ENTRIES = 4  # the most recently used cached versions kept (across every database under $CFB_HOME)
MANIFEST = "arrays.json"


_OFF = [0]  # blocks of ``switched_off`` running now (an evaluation's)


@contextmanager
def switched_off() -> Iterator[None]:
    """No cache within the block: the throwaway versions of an evaluation's temporary databases
    would each take an entry and evict the user's own (``KEEP_ENTRIES`` in all)."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def cache_dir() -> Path | None:
    """Where cached versions live (None when ``$CFB_MODEL_CACHE`` is 0/off/false, or ``switched_off``)."""
    if _OFF[0] or os.environ.get("CFB_MODEL_CACHE", "").lower() in {"0", "off", "false", "no"}:
        return None
    return cfb_home() / "model-cache"


def stored_arrays(conn: Connection, version: int, name: str) -> dict[str, np.ndarray]:
    """The arrays of a version's blob ``name``: from the local cache when the blob is large, else the database."""
    size = conn.scalar(select(func.length(ModelArrays.data)).where(
        ModelArrays.version_id == version, ModelArrays.name == name))
    if size is None:
        raise LookupError(f"model version {version} has no {name}")
    root = cache_dir()
    if root is None or size < CACHE_FROM_BYTES:
        return _from_database(conn, version, name)
    created = conn.scalar(select(ModelVersion.created_at).where(ModelVersion.id == version))
    url = conn.engine.url
    if url.get_backend_name() == "sqlite" and url.database:  # "sqlite:///cfb.db" means a file in the cwd
        url = url.set(database=os.path.abspath(url.database))
    key = hashlib.sha256(json.dumps([url.render_as_string(hide_password=True), version, name,
                                     str(created), int(size)]).encode()).hexdigest()[:32]
    cached = _read_entry(root / key)
    if cached is not None:
        return cached
    shutil.rmtree(root / key, ignore_errors=True)  # a damaged entry: rewritten below
    arrays = _from_database(conn, version, name)
    _write_entry(root, key, arrays)
    return arrays


def _from_database(conn: Connection, version: int, name: str) -> dict[str, np.ndarray]:
    return from_npz(conn.scalar(select(ModelArrays.data).where(
        ModelArrays.version_id == version, ModelArrays.name == name)))


def _read_entry(folder: Path) -> dict[str, np.ndarray] | None:
    """A cached version's arrays (large ones mapped read-only), or None when absent or unreadable."""
    try:
        files = json.loads((folder / MANIFEST).read_text())
        out = {}
        for name, (file, nbytes) in files.items():
            mmap = "r" if nbytes >= MMAP_FROM_BYTES else None
            out[name] = np.load(folder / file, mmap_mode=mmap, allow_pickle=False)
        os.utime(folder)  # recently used: kept by the pruning below
        return out
    except Exception:  # absent, truncated (EOFError), garbled: the database has the arrays
        return None


def _write_entry(root: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays as a new cache entry (all or nothing), then keep only the newest entries."""
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
        files = {}
        for k, (name, a) in enumerate(arrays.items()):
            _write_synced(tmp / f"{k}.npy", lambda f, a=a: np.save(f, a, allow_pickle=False))
            files[name] = [f"{k}.npy", int(a.nbytes)]
        _write_synced(tmp / MANIFEST, lambda f: f.write(json.dumps(files).encode()))
        os.rename(tmp, root / key)  # fails if another process got there first: theirs is as good
        tmp = None
        _prune(root)
    except OSError:
        pass  # the cache is optional: the arrays came from the database
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_synced(path: Path, write) -> None:
    """Write a file and flush it to disk, so that a crash after the rename cannot leave an empty one."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another process meanwhile
        return 0.0


def _prune(root: Path) -> None:
    """Keep the most recently used entries; remove the rest and partial folders of killed writers."""
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=_mtime, reverse=True)
    stale = [p for p in root.glob(".partial-*") if time.time() - _mtime(p) > 3600]
    for old in entries[KEEP_ENTRIES:] + stale:
        shutil.rmtree(old, ignore_errors=True)  # processes that mapped it keep their mapping
