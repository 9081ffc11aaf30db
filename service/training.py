"""Full retrain at the database's edge: every rating read -> ``cf_core.fit.fit_model`` -> a new serving
version stored; and what a version adds from the catalogue (items known from their metadata alone)."""
from __future__ import annotations

import time

import numpy as np
from sqlalchemy import Engine

from ..cf_core.data import CollabData, index_ids
from ..cf_core.errors import CfbError, NotReadyError
from ..cf_core.fit import (TrainingData, check_kind_settings, fit_model, ranker_may_go_beside, side_process,
                           text_ranks, validate)
from ..cf_core.model import ServingConfig, TrainedModel
from ..db import array_cache, ratings_io, store, versions
from ..db.engine import writing
from ..db.schema import Item


def load_training_data(engine: Engine) -> tuple[TrainingData, float]:
    """Every rating in the database as ``TrainingData``, and the seconds it took to read."""
    t0 = time.perf_counter()
    with engine.connect() as conn:
        scale = store.rating_scale(conn)
        r = ratings_io.load_ratings(conn)
        attrs = store.user_attributes(conn)
        item_attrs = store.item_attributes(conn)
        external = {db_id: ext for ext, db_id in store.id_map(conn, Item).items()}
    if len(r) == 0 or scale is None:
        raise NotReadyError("no ratings in the database: run `cfb ingest …` first")
    user_ids, u = index_ids(r.user_id)
    item_ids, i = index_ids(r.item_id)
    td = TrainingData(CollabData(u, i, r.rating, len(user_ids), len(item_ids)), user_ids, item_ids, r.timestamp,
                      [attrs.get(int(x)) or {} for x in user_ids], scale, int(r.seq.max()),
                      [item_attrs.get(int(x)) or {} for x in item_ids],
                      text_ranks([external[int(x)] for x in item_ids]))
    return td, time.perf_counter() - t0


def retrain_full(engine: Engine, kind: str = "dot", valid_pct: float = 0.0, progress: bool = True,
                 serving: ServingConfig | None = None, ranker: bool = True, seed: int = 42, **params) -> dict:
    """Train a version on every rating and store it as serving, in one transaction. With
    ``valid_pct`` > 0 the rating model is first measured on the §7 split (then refit on everything).
    If the serving version changes meanwhile (a rollback), the new version is stored but not served."""
    if not 0 <= valid_pct < 1:
        raise CfbError("--valid-pct must be in [0, 1)")
    check_kind_settings(kind, params)  # (before the data is read)
    t_start = time.perf_counter()
    lock = versions.acquire_retrain_lock(engine)
    try:
        with engine.connect() as conn:
            started_serving = versions.serving_state(conn)
            newest_seq = store.next_seq(conn) - 1  # at least the number of ratings
        with side_process(ranker_may_go_beside(ranker, newest_seq)) as side:  # started now: its imports overlap the read
            td, load_s = load_training_data(engine)
            metrics: dict = {"n_ratings": len(td.data), "load_s": round(load_s, 3)}
            if valid_pct > 0:
                metrics.update(validate(td, kind, params, valid_pct, seed, progress))
            model, report = fit_model(td, kind, params, seed, serving, ranker, progress, side=side)
        metrics.update(report)
        with engine.connect() as conn:  # catalogue items with metadata and no rating yet join from it
            unrated = metadata_only_items(conn, model)
            if len(unrated):
                model = model.add_items(unrated, *model.metadata_rows(item_attributes_in_order(conn, unrated)))
        metrics["items_from_metadata"] = int(len(unrated))
        with writing(engine) as conn:
            version, served = versions.save_full(conn, model, metrics=metrics, max_seq=td.max_seq,
                                                 expected_serving=started_serving, lock=lock)
        warm_model_cache(engine, version)
        out = {"version": version, "kind": kind, "mode": "full", "serving": served, **metrics,
               "hyperparams": model.settings, "total_s": round(time.perf_counter() - t_start, 3)}  # (§7: its time)
        if not served:
            out["reason"] = (f"version {versions_now(engine)} was made serving during the retrain; version "
                             f"{version} is stored but not serving (`cfb rollback {version}` serves it)")
        return out
    finally:
        versions.release_retrain_lock(engine, lock)


def metadata_only_items(conn, model: TrainedModel, rated: np.ndarray | None = None) -> np.ndarray:  # noqa: ANN001
    """Database ids of the catalogue items with metadata that ``model`` lacks, other than ``rated``
    (items with ratings, which join from those): those a version adds from their metadata alone.
    None of them (an empty array) without an item prior."""
    if model.item_prior is None:
        return np.zeros(0, np.int64)
    catalogue = store.all_item_ids(conn)
    missing = catalogue[~np.isin(catalogue, model.item_ids) & ~np.isin(catalogue, [] if rated is None else rated)]
    attrs = store.item_attributes(conn, missing)
    return np.array([i for i in missing.tolist() if attrs.get(i)], np.int64)


def item_attributes_in_order(conn, item_ids: np.ndarray) -> list[dict]:  # noqa: ANN001
    """The metadata of each of ``item_ids`` (database ids), in their order ({} where none)."""
    attrs = store.item_attributes(conn, item_ids)
    return [attrs.get(int(i), {}) for i in item_ids]


def warm_model_cache(engine: Engine, version: int) -> None:
    """Write the local copy of a new version now, so that the next process to serve it maps it at once.

    The version is already stored (and maybe serving): a failure here must not fail the retrain.
    """
    if array_cache.cache_dir() is None:
        return
    try:
        with engine.connect() as conn:
            versions.load_model(conn, version)
    except Exception:  # the cache is only a copy; the next load reads the database
        pass


def versions_now(engine: Engine) -> int | None:
    with engine.connect() as conn:
        return versions.serving_version(conn)
