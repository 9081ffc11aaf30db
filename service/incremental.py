"""Incremental retrain: what changed since the serving version, or a full retrain when drift is large.

Users need nothing stored: a user's representation is computed from their trained row (or the
bootstrap prior) and their ratings whenever it is asked for, so every rating counts at once and
never twice. An incremental version adds the items that got their first ratings (solved against
their raters, item side of everything else frozen) and the item statistics after the new ratings."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from sqlalchemy import Engine

from ..cf_core.errors import InputError
from ..cf_core.fit import rating_params
from ..db import ratings_io, store, versions
from ..db.engine import writing
from .state import Served, load_served, user_histories
from .training import item_attributes_in_order, metadata_only_items, retrain_full

DRIFT_LIMIT = 0.2  # share of ratings newer than the last full retrain that forces a full retrain
DEFAULT_SEED = 42  # a first model's (a full retrain forced by drift keeps the replaced version's)
DEFAULT_VALID_PCT = 0.2  # a first model's §7 measurement (likewise)


def drift(conn, version: int) -> tuple[float, int]:  # noqa: ANN001
    """(share of the ratings written after the version's full ancestor was trained, that ancestor).

    The share is newer / (learned + newer), with ``learned`` the number of ratings the full version
    trained on (its stored metrics): exact while the newer ratings are new pairs, and without a
    count over the whole table (a third of a second at 25M ratings)."""
    root = versions.chain(conn, version)[0]
    row = versions.get_version(conn, root)
    newer = store.count_ratings(conn, since_seq=row["max_seq"])
    learned = (row["metrics"] or {}).get("n_ratings")
    total = learned + newer if learned is not None else store.count_ratings(conn)
    return (newer / total if total else 0.0), root


def percent(share: float) -> str:
    """A share as a percentage with three significant digits: 0.009% over a 0.001% limit reads so, not
    as 0% over 0%."""
    return f"{100 * share:.3g}%"


def retrain_auto(engine: Engine, kind: str | None = None, valid_pct: float | None = None, progress: bool = True,
                 drift_limit: float = DRIFT_LIMIT, seed: int | None = None, full_only: tuple[str, ...] = (),
                 **params) -> dict:
    """`cfb retrain`: incremental when possible, full when there is no model or drift exceeds ``drift_limit``.
    ``full_only``: the options given that only a full retrain uses; an incremental retrain refuses them
    (before writing anything) rather than ignore them. ``seed`` and ``valid_pct`` None: 42 and 0.2 for a
    first model, and a full retrain forced by drift keeps those of the version it replaces (a version
    trained without the §7 measurement is replaced without it: at size it is a second training)."""
    store.upgrade_schema(engine)
    with engine.connect() as conn:
        serving = versions.serving_version(conn)
        if serving is not None:
            share, root = drift(conn, serving)
            root_row = versions.get_version(conn, root)
    if serving is None:
        out = retrain_full(engine, kind=kind or "dot", progress=progress,
                           valid_pct=DEFAULT_VALID_PCT if valid_pct is None else valid_pct,
                           seed=DEFAULT_SEED if seed is None else seed, **params)
        return {**out, "reason": "no model yet: full retrain"}
    if share > drift_limit:
        kind = kind or root_row["kind"]
        if kind == root_row["kind"]:  # keep the settings of the version being replaced unless told otherwise
            params = {**chosen_settings(root_row), **{k: v for k, v in params.items() if v is not None}}
        if seed is None:
            seed = int((root_row["hyperparams"] or {}).get("seed", DEFAULT_SEED))
        if valid_pct is None:
            valid_pct = float((root_row["metrics"] or {}).get("valid_pct") or 0.0)
        out = retrain_full(engine, kind=kind, valid_pct=valid_pct, progress=progress, seed=seed, **params)
        return {**out, "reason": f"{percent(share)} of ratings are newer than full version {root} "
                                 f"(limit {percent(drift_limit)}): full retrain"}
    if full_only:
        verb = "applies" if len(full_only) == 1 else "apply"
        raise InputError(f"{', '.join(full_only)} only {verb} to a full retrain, and this one is incremental "
                       f"({percent(share)} of ratings newer than full version {root}): add --full (full=True in Python)")
    return retrain_incremental(engine)


def chosen_settings(version_row) -> dict:  # noqa: ANN001
    """The rating-model settings a full version was trained with that were chosen for it rather than
    defaults for its size (``rating_params``): a version's stored settings are the ones it used, and the
    defaults (batch, learning rate, epochs) scale with the data, so a set that grew keeps only what
    was chosen, not the small set's batch."""
    used = version_row["hyperparams"]
    n = (version_row["metrics"] or {}).get("n_ratings")
    defaults = rating_params(version_row["kind"], int(n), {}) if n else {}
    return {k: v for k, v in used.items()
            if k in ("n_factors", "epochs", "lr", "wd", "bs") and (k not in defaults or defaults[k] != v)}


def retrain_incremental(engine: Engine) -> dict:
    """Fold what changed into the serving version; write and serve the result.

    Items that got ratings for the first time, and items added since the full retrain that got new
    ratings, whose raters did, or whose metadata changed, are solved against all their raters from
    their metadata row (or zeros); catalogue items
    with metadata and no rating join from their metadata; the statistics of every touched item are
    the version's plus what the new ratings changed (``store.totals_since``)."""
    t_start = time.perf_counter()
    store.upgrade_schema(engine)  # (a database from before the replaced-value columns gets them)
    lock = versions.acquire_retrain_lock(engine)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":  # one snapshot for every read below, as SQLite's BEGIN gives
                conn.execution_options(isolation_level="REPEATABLE READ")
            parent = versions.require_serving(conn)
            started = versions.serving_state(conn)  # (a rollback meanwhile, even to ``parent``, stays)
            row = versions.get_version(conn, parent)
            served = load_served(conn, parent)
            model = served.model
            new = ratings_io.load_ratings(conn, since_seq=row["max_seq"], with_replaced=True)
            touched = np.unique(new.item_id)
            rated = np.setdiff1d(touched, model.item_ids)
            unrated = metadata_only_items(conn, model, rated)  # catalogue items with metadata and no rating yet
            # items added since the full retrain whose metadata changed (`cfb ingest items`): their rows
            # start from it, so they are solved again (one with no rating: its metadata row)
            added_inner = model.added_items()
            added_ids = model.item_ids[added_inner]
            attributes_of_added = item_attributes_in_order(conn, added_ids)
            relabelled = added_ids[model.metadata_changed(added_inner, attributes_of_added)]
            if len(new) == 0 and len(unrated) == 0 and len(relabelled) == 0:
                return {"version": parent, "kind": model.kind, "mode": "none", "new_ratings": 0,
                        "reason": f"no new ratings, items or item metadata since version {parent}"}
            # added items solved again: those with new ratings, and those whose raters have new ratings (a
            # rater's vector moves with their ratings of learned items: the row stays a function of the
            # ratings), and those whose metadata changed
            resolve = np.union1d(np.union1d(np.intersect1d(added_ids, touched),
                                            store.items_rated_by(conn, np.unique(new.user_id), added_ids)), relabelled)
            new_items = np.concatenate([rated, unrated])
            t_fold = time.perf_counter()
            added, ranker_rows = model.metadata_rows(item_attributes_in_order(conn, new_items))
            of_added = dict(zip(added_ids.tolist(), attributes_of_added))  # (resolve: added items only)
            priors, prior_ranker = model.metadata_rows([of_added[i] for i in resolve.tolist()])
            solve = np.concatenate([rated, resolve])
            first = len(rated)  # solve = the newly rated items, then the added ones that got more ratings

            def rated_then_resolved(rows: dict | None, more: dict | None) -> dict | None:
                return None if rows is None else {k: np.concatenate([rows[k][:first], more[k]]) for k in more}

            solved, solved_ranker = _fold_in_items(conn, served, solve, rated_then_resolved(added, priors),
                                                   rated_then_resolved(ranker_rows, prior_ranker))
            added = {**added, **{k: np.concatenate([solved[k][:first], added[k][first:]]) for k in solved}}
            replaced = {k: v[first:] for k, v in solved.items()}
            if "item_meta" in priors:  # (their metadata as now encoded: it may have changed)
                replaced["item_meta"] = priors["item_meta"]
            replaced_ranker = None
            if solved_ranker is not None:
                ranker_rows = {k: np.concatenate([solved_ranker[k][:first], ranker_rows[k][first:]]) for k in ranker_rows}
                replaced_ranker = {k: v[first:] for k, v in solved_ranker.items()}
            known = model.item_index(touched)  # (-1: an item new since the version, no ratings then)
            counts, sums = store.totals_since(conn, new, int(row["max_seq"]), touched,
                                              np.where(known >= 0, model.item_counts[known], 0.0),
                                              np.where(known >= 0, model.item_sums[known], 0.0))
            fold_s = time.perf_counter() - t_fold
        if len(new_items):
            model = model.add_items(new_items, added, ranker_rows)
        if len(resolve):
            model = model.with_item_rows(model.item_index(resolve), replaced, replaced_ranker)
        model = model.with_item_totals(model.item_index(touched), counts, sums)
        metrics = {"new_ratings": len(new), "users_with_new_ratings": int(len(np.unique(new.user_id))),
                   "items_added": int(len(new_items)), "items_from_metadata": int(len(unrated)),
                   "items_resolved": int(len(resolve)), "items_metadata_changed": int(len(relabelled)),
                   "fold_s": round(fold_s, 4)}
        delta = versions.make_delta(new_items, added, model, ranker_rows, resolve, replaced, touched, replaced_ranker)
        max_seq = int(new.seq.max()) if len(new) else int(row["max_seq"])
        with writing(engine) as conn:
            version = versions.save_incremental(conn, started, delta, kind=model.kind, settings=model.settings,
                                                metrics=metrics, max_seq=max_seq, model=model, lock=lock)
        metrics["total_s"] = round(time.perf_counter() - t_start, 4)
        return {"version": version, "kind": model.kind, "mode": "incremental", "parent": parent, "serving": True,
                **metrics}
    finally:
        versions.release_retrain_lock(engine, lock)


RATERS_AT_ONCE = 5_000  # the new items' raters whose histories are read at a time (``_fold_in_items``)


def _fold_in_items(conn, served: Served, item_ids: np.ndarray, prior: dict[str, np.ndarray],  # noqa: ANN001
                   prior_ranker: dict[str, np.ndarray] | None) -> tuple[dict, dict | None]:
    """(rating-model rows, ranker rows) of ``item_ids``. Each rating row is solved against all the item's
    raters' user vectors (a fold-in with users and items swapped), starting from and shrunk toward its
    ``prior`` row. A rater's vector here leaves out their ratings of every item added since the full
    retrain: those items' rows are the ones being solved (or were solved by an earlier incremental
    retrain), so the solution is a pure function of the ratings, whatever retrains came before; nor does
    it use their attributes (an untrained rater's prior is the bootstrap's for a user of whom nothing is
    known), which change without a rating to mark the item for solving again. Its
    ranker row follows its rating row from its ``prior_ranker`` row (``TrainedModel.ranker_rows_following``).
    The nn model's item embeddings are solved through its MLP, all at once (``NNRating.fold_in_items``)."""
    model = served.model
    rated = [store.item_ratings(conn, item) for item in item_ids.tolist()]
    counts = np.array([len(users) for users, _ in rated], np.int64)
    raters = np.concatenate([users for users, _ in rated] or [np.zeros(0, np.int64)])
    ratings = np.concatenate([r for _, r in rated] or [np.zeros(0)])
    everyone = np.unique(raters)
    vectors = []
    for start in range(0, len(everyone), RATERS_AT_ONCE):  # every rater's vector once, their histories read together
        for h in user_histories(conn, served, everyone[start:start + RATERS_AT_ONCE]):
            inner = model.item_index(h.items)
            learned_only = h.restricted_to((inner >= 0) & (inner < model.n_learned_items))
            vectors.append(model.user_vector(replace(learned_only, attributes={}), affinity=False, ranking=False))
    at = np.searchsorted(everyone, raters)  # each rating's rater
    vecs = np.array([v.vec for v in vectors], np.float32).reshape(len(vectors), model.rating.n_factors)[at]
    bias = np.array([v.bias for v in vectors], np.float32)[at]
    item_of_rating = np.repeat(np.arange(len(rated)), counts)
    # every item against its raters at once (an item with no rating left keeps its prior row)
    factors, biases = model.rating.fold_in_items(vecs, bias, item_of_rating, ratings, prior["item_factors"],
                                                 prior["item_bias"], model.config.item_foldin(model.scale_width))
    for_ranker = prior
    if prior_ranker is not None:
        f, b = model.rating.fold_in_items(vecs, bias, item_of_rating, ratings, prior["item_factors"],
                                          prior["item_bias"], model.config.ranker_item_foldin(model.scale_width))
        for_ranker = {"item_factors": f, "item_bias": b}
    ranker_rows = model.ranker_rows_following(prior, for_ranker, prior_ranker, counts)
    return {"item_factors": factors.astype(np.float32), "item_bias": biases.astype(np.float32)}, ranker_rows
