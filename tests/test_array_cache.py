"""The local memory-mapped copy of large versions: same model as the database, safe to lose."""
from __future__ import annotations

import numpy as np
import pytest

from cfb.db import array_cache, versions
from cfb.db.schema import ModelArrays
from cfb.service.incremental import retrain_incremental
from cfb.service.ratings import rate_item
from cfb.service.serving import recommend
from cfb.service.state import _CACHE
from cfb.service.training import retrain_full

from .conftest import FAST


@pytest.fixture
def cache_everything(monkeypatch):
    """Cache every version and map every array, as happens at MovieLens-25M size."""
    monkeypatch.setattr(array_cache, "CACHE_FROM_BYTES", 0)
    monkeypatch.setattr(array_cache, "MMAP_FROM_BYTES", 0)
    _CACHE.clear()
    yield
    _CACHE.clear()


def _database_arrays(conn, version: int) -> dict[str, np.ndarray]:
    return array_cache._from_database(conn, version, versions.MODEL_BLOB)


def _entries() -> list:
    root = array_cache.cache_dir()
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_cached_version_equals_the_stored_one_and_is_mapped(trained, cache_everything):
    engine, report = trained
    with engine.connect() as conn:
        first = array_cache.stored_arrays(conn, report["version"], versions.MODEL_BLOB)  # writes the copy
        assert len(_entries()) == 1
        again = array_cache.stored_arrays(conn, report["version"], versions.MODEL_BLOB)
        stored = _database_arrays(conn, report["version"])
    assert set(again) == set(stored) == set(first)
    for name, a in stored.items():
        assert again[name].dtype == a.dtype and np.array_equal(again[name], a), name
    assert isinstance(again["ranker/out"], np.memmap) and not again["ranker/out"].flags.writeable


def test_serving_from_the_copy_gives_the_same_recommendations(trained, cache_everything):
    """Recommendations, a new rating and an incremental version on top of a mapped (read-only) version."""
    engine, _ = trained
    with engine.connect() as conn:
        from_database = recommend(conn, "a0", 5)
    _CACHE.clear()
    with engine.connect() as conn:
        assert recommend(conn, "a0", 5) == from_database  # loaded from the copy the first load wrote
    rate_item(engine, "a0", "b21", 1.0)
    out = retrain_incremental(engine)
    _CACHE.clear()
    with engine.connect() as conn:
        assert versions.serving_version(conn) == out["version"]
        assert "b21" not in [i["item"] for i in recommend(conn, "a0", 40)["items"]]  # rated now


@pytest.mark.parametrize("damage", [b"not an array", b""])
def test_a_damaged_copy_falls_back_to_the_database_and_is_repaired(trained, cache_everything, damage):
    """Garbled or empty files (a crash before the data reached the disk) read the database, then rewrite the copy."""
    engine, report = trained
    with engine.connect() as conn:
        array_cache.stored_arrays(conn, report["version"], versions.MODEL_BLOB)
        entry = array_cache.cache_dir() / _entries()[0]
        for f in entry.glob("*.npy"):
            f.write_bytes(damage)
        got = array_cache.stored_arrays(conn, report["version"], versions.MODEL_BLOB)
        stored = _database_arrays(conn, report["version"])
        assert all(np.array_equal(got[k], stored[k]) for k in stored)
        assert array_cache._read_entry(entry) is not None  # the entry was written anew
        repaired = array_cache.stored_arrays(conn, report["version"], versions.MODEL_BLOB)
    assert isinstance(repaired["ranker/out"], np.memmap)
    assert all(np.array_equal(repaired[k], stored[k]) for k in stored)


def test_each_version_has_its_own_copy_and_old_ones_are_pruned(engine, planted, cache_everything, monkeypatch):
    from cfb.service.ingest import ingest_dataset

    monkeypatch.setattr(array_cache, "KEEP_ENTRIES", 2)
    ingest_dataset(engine, planted)
    made = [retrain_full(engine, progress=False, ranker=False, **FAST)["version"] for _ in range(3)]
    assert len(_entries()) == 2  # the full retrain writes its copy; the oldest is gone
    with engine.connect() as conn:
        for v in made:
            stored = _database_arrays(conn, v)
            got = array_cache.stored_arrays(conn, v, versions.MODEL_BLOB)
            assert all(np.array_equal(got[k], stored[k]) for k in stored)


def test_the_cache_can_be_turned_off(trained, cache_everything, monkeypatch):
    monkeypatch.setenv("CFB_MODEL_CACHE", "0")
    engine, report = trained
    with engine.connect() as conn:
        got = array_cache.stored_arrays(conn, report["version"], versions.MODEL_BLOB)
        assert not isinstance(got["ranker/out"], np.memmap)
    assert array_cache.cache_dir() is None


def test_a_missing_blob_is_a_lookup_error(trained):
    engine, _ = trained
    with engine.connect() as conn:
        with pytest.raises(LookupError, match="no model.npz"):
            array_cache.stored_arrays(conn, 999, versions.MODEL_BLOB)
        assert conn.scalar(ModelArrays.__table__.select().where(ModelArrays.version_id == 999)) is None


def test_an_evaluation_leaves_the_users_cache_as_it_was(planted, cache_everything):
    """`cfb eval cold-start`'s throwaway versions (a temporary database per budget and seed) took cache
    entries of their own and evicted the user's (at most ``KEEP_ENTRIES`` are kept)."""
    from cfb.evaluation.coldstart import run_seed

    root = array_cache.cache_dir()
    (root / "users-own-entry").mkdir(parents=True)
    run_seed(planted, 42, budgets=(0, 5), fold_steps=(0, 1))
    assert _entries() == ["users-own-entry"]
    assert array_cache.cache_dir() == root  # (on again after it)
