"""Incremental retrain: fold in what changed since the serving version, or retrain fully when drift is large.

Users with new ratings are re-solved with item factors frozen, starting from (shrunk toward) their
current embedding; new items are solved with user factors frozen. Only those rows are written, in a
version whose parent is the serving one, so the cost follows the number of new ratings."""
from __future__ import annotations

import time

import numpy as np
from sqlalchemy import Engine

from ..cf_core.errors import CfbError
from ..cf_core.foldin import fold_in_user
from ..cf_core.scoring import ScoringModel, from_npz, to_npz
from ..db import store, versions
from ..db.versions import FactorRows
from .state import foldin_params, load_state, prior_factors
from .training import DEFAULTS, retrain_full

DRIFT_LIMIT = 0.2  # share of ratings newer than the last full retrain that forces a full retrain
ITEM_BIAS_REG = 1.0  # a new item's bias is what its raters say (the strong user-bias shrinkage is for users)


def drift(conn, version: int) -> tuple[float, int]:  # noqa: ANN001
    """(share of all ratings written after the version's full ancestor was trained, that ancestor)."""
    root = versions.chain(conn, version)[0]
    root_seq = versions.get_version(conn, root)["max_seq"]
    total = store.count_ratings(conn)
    newer = store.count_ratings(conn, since_seq=root_seq)
    return (newer / total if total else 0.0), root


def retrain_auto(engine: Engine, kind: str | None = None, valid_pct: float = 0.2, progress: bool = True,
                 drift_limit: float = DRIFT_LIMIT, **params) -> dict:
    """`cfb retrain`: incremental when possible, full when there is no model or drift exceeds ``drift_limit``."""
    store.create_schema(engine)
    with engine.connect() as conn:
        serving = versions.serving_version(conn)
        if serving is not None:
            share, root = drift(conn, serving)
            root_row = versions.get_version(conn, root)
    if serving is None:
        out = retrain_full(engine, kind=kind or "dot", valid_pct=valid_pct, progress=progress, **params)
        return {**out, "reason": "no model yet: full retrain"}
    if share > drift_limit:
        hp = {k: v for k, v in root_row["hyperparams"].items() if k in DEFAULTS[root_row["kind"]] or k == "seed"}
        hp.update({k: v for k, v in params.items() if v is not None})
        out = retrain_full(engine, kind=kind or root_row["kind"], valid_pct=valid_pct, progress=progress, **hp)
        return {**out, "reason": f"{share:.0%} of ratings are newer than full version {root} "
                                 f"(limit {drift_limit:.0%}): full retrain"}
    return retrain_incremental(engine)


def retrain_incremental(engine: Engine) -> dict:
    """Fold new ratings into the serving version; write and serve the result."""
    t_start = time.perf_counter()
    lock = versions.acquire_retrain_lock(engine)
    try:
        with engine.connect() as conn:
            parent = versions.require_serving(conn)
            row = versions.get_version(conn, parent)
            state = load_state(conn, parent)
            new = store.load_ratings(conn, since_seq=row["max_seq"])
            if len(new) == 0:
                return {"version": parent, "kind": state.kind, "mode": "none", "new_ratings": 0,
                        "reason": f"no new ratings since version {parent}"}
            users = np.unique(new.user_id)
            user_rows = versions.load_users(conn, parent, users)
            current = {int(u): (f, float(b)) for u, f, b in zip(user_rows.ids, user_rows.factors, user_rows.bias)}
            ratings_of = {int(u): store.user_ratings(conn, int(u)) for u in users}
            attributes = {int(u): store.user_attributes_of(conn, int(u)) for u in users if int(u) not in current}
            new_item_ids = np.setdiff1d(np.unique(new.item_id), state.item_ids)
            item_rows = _fold_in_items(conn, state, parent, new_item_ids) if len(new_item_ids) else FactorRows.empty()
        scoring = state.scoring
        if len(item_rows.ids):  # score users against the catalogue including the new items
            scoring = _with_items(scoring, item_rows)
        all_item_ids = np.concatenate([state.item_ids, item_rows.ids])
        order = np.argsort(all_item_ids)
        t_fold = time.perf_counter()
        vecs, biases = [], []
        hp = state.hyperparams
        for u in users.tolist():
            items, ratings = ratings_of[u]
            inner = order[np.searchsorted(all_item_ids[order], items)]
            if u in current:
                prior_vec, prior_bias = current[u]
            else:
                prior_vec, prior_bias = prior_factors(state, attributes[u], {})
            vec, bias = fold_in_user(scoring, inner, ratings, prior_vec, prior_bias, **foldin_params(hp))
            vecs.append(vec)
            biases.append(bias)
        fold_s = time.perf_counter() - t_fold
        with engine.begin() as conn:
            stats = from_npz(versions.load_array(conn, parent, "item_stats.npz"))
            stats_npz = _updated_stats(stats, new)
            metrics = {"new_ratings": len(new), "users_folded": len(users), "items_added": len(item_rows.ids),
                       "fold_s": round(fold_s, 4)}
            version = versions.save_version(
                conn, kind=state.kind, mode="incremental", parent_id=parent, hyperparams=hp, metrics=metrics,
                max_seq=int(new.seq.max()),
                users=FactorRows(users, np.array(biases, np.float32), np.stack(vecs)),
                items=item_rows, arrays={"item_stats.npz": stats_npz})
        metrics["total_s"] = round(time.perf_counter() - t_start, 4)
        return {"version": version, "kind": state.kind, "mode": "incremental", "parent": parent, **metrics}
    finally:
        versions.release_retrain_lock(engine, lock)


def _fold_in_items(conn, state, version: int, item_ids: np.ndarray) -> FactorRows:  # noqa: ANN001
    """New items' stored rows, solved against their raters' frozen user factors (dot model).

    The rating part is a fold-in with users and items swapped; the ranking part (if any) starts at
    zero factors and the lowest ranking bias: a new item is ranked by its predicted rating until
    the next full retrain."""
    if state.kind != "dot":
        raise CfbError("new items need a full retrain for the nn model: run `cfb retrain --full`")
    sm = state.scoring
    vecs, biases = [], []
    for item in item_ids.tolist():
        users, ratings = store.item_ratings(conn, item)
        rows = versions.load_users(conn, version, users)
        keep = np.isin(users, rows.ids)
        raters = ScoringModel("dot", sm.y_range, sm.split_user(rows.factors)[0], rows.bias)
        inner = np.searchsorted(rows.ids, users[keep])
        vec, bias = fold_in_user(raters, inner, ratings[keep], np.zeros(sm.n_factors, np.float32), 0.0,
                                 reg=foldin_params(state.hyperparams)["reg"], reg_bias=ITEM_BIAS_REG)
        vecs.append(vec)
        biases.append(bias)
    new = ScoringModel("dot", sm.y_range, np.stack(vecs), np.array(biases, np.float32))
    if sm.rank_factors is not None:
        new.rank_factors = np.zeros((len(vecs), sm.n_rank_factors), np.float32)
        new.rank_bias = np.full(len(vecs), sm.rank_bias.min(), np.float32)
    return FactorRows(item_ids, new.item_bias, new.item_rows())


def _with_items(sm: ScoringModel, rows: FactorRows) -> ScoringModel:
    """The scoring model with the new item rows appended."""
    factors, rank_factors, rank_bias = ScoringModel.unpack_item_rows(rows.factors, sm.n_factors)
    extended = ScoringModel(sm.kind, sm.y_range, np.concatenate([sm.item_factors, factors]),
                            np.concatenate([sm.item_bias, rows.bias]), sm.head)
    if sm.rank_factors is not None:
        extended.rank_factors = np.concatenate([sm.rank_factors, rank_factors])
        extended.rank_bias = np.concatenate([sm.rank_bias, rank_bias])
    return extended


def _updated_stats(stats: dict, new) -> bytes:  # noqa: ANN001
    ids = np.union1d(stats["item_ids"], new.item_id)
    counts = np.zeros(len(ids), np.int64)
    sums = np.zeros(len(ids))
    pos = np.searchsorted(ids, stats["item_ids"])
    counts[pos], sums[pos] = stats["counts"], stats["sums"]
    np.add.at(counts, np.searchsorted(ids, new.item_id), 1)
    np.add.at(sums, np.searchsorted(ids, new.item_id), new.rating)
    return to_npz({"item_ids": ids, "counts": counts, "sums": sums})
