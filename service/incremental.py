"""Incremental retrain: what changed since the serving version, or a full retrain when drift is large.

Users need nothing stored: a user's representation is computed from their trained row (or the
bootstrap prior) and their ratings whenever it is asked for, so every rating counts at once and
never twice. An incremental version adds the items that got their first ratings (solved against
their raters, item side of everything else frozen) and the item statistics after the new ratings."""
from __future__ import annotations

import time

import numpy as np
from sqlalchemy import Engine

from ..cf_core.errors import CfbError
from ..cf_core.rating import DotRating
from ..db import store, versions
from ..db.engine import writing
from .state import Served, load_served, user_history
from .training import retrain_full

DRIFT_LIMIT = 0.2  # share of ratings newer than the last full retrain that forces a full retrain


def drift(conn, version: int) -> tuple[float, int]:  # noqa: ANN001
    """(share of all ratings written after the version's full ancestor was trained, that ancestor)."""
    root = versions.chain(conn, version)[0]
    total = store.count_ratings(conn)
    newer = store.count_ratings(conn, since_seq=versions.get_version(conn, root)["max_seq"])
    return (newer / total if total else 0.0), root


def retrain_auto(engine: Engine, kind: str | None = None, valid_pct: float = 0.0, progress: bool = True,
                 drift_limit: float = DRIFT_LIMIT, seed: int = 42, **params) -> dict:
    """`cfb retrain`: incremental when possible, full when there is no model or drift exceeds ``drift_limit``."""
    store.create_schema(engine)
    with engine.connect() as conn:
        serving = versions.serving_version(conn)
        if serving is not None:
            share, root = drift(conn, serving)
            root_row = versions.get_version(conn, root)
    if serving is None:
        out = retrain_full(engine, kind=kind or "dot", valid_pct=valid_pct, progress=progress, seed=seed, **params)
        return {**out, "reason": "no model yet: full retrain"}
    if share > drift_limit:
        kind = kind or root_row["kind"]
        if kind == root_row["kind"]:  # keep the settings of the version being replaced unless told otherwise
            params = {**{k: v for k, v in root_row["hyperparams"].items() if k in ("n_factors", "epochs", "lr", "wd", "bs")},
                      **{k: v for k, v in params.items() if v is not None}}
        out = retrain_full(engine, kind=kind, valid_pct=valid_pct, progress=progress, seed=seed, **params)
        return {**out, "reason": f"{share:.0%} of ratings are newer than full version {root} "
                                 f"(limit {drift_limit:.0%}): full retrain"}
    return retrain_incremental(engine)


def retrain_incremental(engine: Engine) -> dict:
    """Fold what changed into the serving version; write and serve the result."""
    t_start = time.perf_counter()
    lock = versions.acquire_retrain_lock(engine)
    try:
        with engine.connect() as conn:
            parent = versions.require_serving(conn)
            row = versions.get_version(conn, parent)
            served = load_served(conn, parent)
            new = store.load_ratings(conn, since_seq=row["max_seq"])
            if len(new) == 0:
                return {"version": parent, "kind": served.model.kind, "mode": "none", "new_ratings": 0,
                        "reason": f"no new ratings since version {parent}"}
            t_fold = time.perf_counter()
            new_items = np.setdiff1d(np.unique(new.item_id), served.model.item_ids)
            added = _fold_in_items(conn, served, new_items) if len(new_items) else {}
            fold_s = time.perf_counter() - t_fold
        model = served.model.add_items(new_items, added) if len(new_items) else served.model
        model = model.with_ratings_counted(model.item_index(new.item_id), new.rating)
        metrics = {"new_ratings": len(new), "users_with_new_ratings": int(len(np.unique(new.user_id))),
                   "items_added": int(len(new_items)), "fold_s": round(fold_s, 4)}
        delta = versions.make_delta(new_items, added, model)
        with writing(engine) as conn:
            version = versions.save_incremental(conn, parent, delta, kind=model.kind, settings=model.settings,
                                                metrics=metrics, max_seq=int(new.seq.max()))
        metrics["total_s"] = round(time.perf_counter() - t_start, 4)
        return {"version": version, "kind": model.kind, "mode": "incremental", "parent": parent, **metrics}
    finally:
        versions.release_retrain_lock(engine, lock)


def _fold_in_items(conn, served: Served, item_ids: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Rating-model rows of new items, each solved against its raters' current user vectors
    (a fold-in with users and items swapped: dot model only)."""
    model = served.model
    if model.kind != "dot":
        raise CfbError("new items need a full retrain for the nn model: run `cfb retrain --full`")
    factors, biases = [], []
    k = model.rating.n_factors
    for item in item_ids.tolist():
        users, ratings = store.item_ratings(conn, item)
        vecs = [model.user_vector(user_history(conn, served, int(u))) for u in users]
        raters = DotRating(model.rating.y_range, np.stack([v.vec for v in vecs]).astype(np.float32),
                           np.array([v.bias for v in vecs], np.float32))
        vec, bias = raters.fold_in(np.arange(len(users)), ratings, np.zeros(k, np.float32), 0.0,
                                   model.config.item_foldin())
        factors.append(vec)
        biases.append(bias)
    return {"item_factors": np.stack(factors).astype(np.float32), "item_bias": np.array(biases, np.float32)}
