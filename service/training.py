"""Full retrain: ratings from the database -> fastai model -> bootstrap -> a new serving version."""
from __future__ import annotations

import time

import numpy as np
from sqlalchemy import Engine

from ..bootstrap.fit import fit_bootstrap
from ..cf_core.data import CollabData, default_y_range, index_ids
from ..cf_core.errors import CfbError
from ..cf_core.scoring import to_npz
from ..cf_core.split import valid_split
from ..cf_core.train import MODELS, ImplicitDotBias
from ..db import store, versions
from ..db.versions import FactorRows
from .state import SERVING_DEFAULTS

VALID_SEED = 42  # COLDSTART_PROTOCOL.md §7
DEFAULTS = {
    "dot": {"n_factors": 50, "epochs": 8, "lr": 5e-3, "wd": 0.3, "bs": 1024},
    "nn": {"n_factors": 50, "epochs": 5, "lr": 5e-3, "wd": 0.1, "bs": 1024, "layers": (100, 50)},
}
RANKER_DEFAULTS = {"n_factors": 32, "epochs": 10, "lr": 1e-2, "wd": 0.05, "bs": 4096, "neg_ratio": 4}


BASE_TRAIN = 80_000  # the defaults above are tuned on MovieLens 100k's 80% training split


def scaled_defaults(defaults: dict, n_train: int, min_epochs: int) -> dict:
    """Defaults for a larger ratings set: the batch size grows with the data (×2 per doubling, at
    most ×16), the learning rate with its square root, and the epochs shrink likewise; a user's
    explicit settings always win. MovieLens 100k keeps the tuned defaults unchanged."""
    scale = int(np.clip(2 ** round(np.log2(max(n_train, 1) / BASE_TRAIN)), 1, 16))
    if scale == 1:
        return dict(defaults)
    return {**defaults, "bs": defaults["bs"] * scale, "lr": defaults["lr"] * scale ** 0.5,
            "epochs": max(min_epochs, round(defaults["epochs"] / scale ** 0.5))}


def load_training_data(engine: Engine):
    """Every rating as inner-index ``CollabData``, with the id maps, attributes, scale and max seq."""
    t0 = time.perf_counter()
    with engine.connect() as conn:
        scale = store.rating_scale(conn)
        r = store.load_ratings(conn)
        attrs = store.user_attributes(conn)
    if len(r) == 0 or scale is None:
        raise CfbError("no ratings in the database: run `cfb ingest …` first")
    user_ids, u = index_ids(r.user_id)
    item_ids, i = index_ids(r.item_id)
    data = CollabData(u, i, r.rating, len(user_ids), len(item_ids))
    return data, user_ids, item_ids, [attrs.get(int(x)) or {} for x in user_ids], scale, int(r.seq.max()), \
        time.perf_counter() - t0


def item_stats_npz(item_ids: np.ndarray, data: CollabData) -> bytes:
    counts, sums = data.item_totals()
    return to_npz({"item_ids": item_ids, "counts": counts.astype(np.int64), "sums": sums})


def retrain_full(engine: Engine, kind: str = "dot", valid_pct: float = 0.2, progress: bool = True,
                 serving: dict | None = None, **params) -> dict:
    """Train ``kind`` on every rating (minus the §7 validation split), fit the bootstrap, and store a
    new serving version in one transaction. Returns the report (version, metrics, timings)."""
    if kind not in MODELS:
        raise CfbError(f"unknown model kind {kind!r} (choose from {', '.join(MODELS)})")
    if not 0 <= valid_pct < 1:
        raise CfbError("--valid-pct must be in [0, 1)")
    lock = versions.acquire_retrain_lock(engine)
    try:
        data, user_ids, item_ids, attributes, scale, max_seq, load_s = load_training_data(engine)
        train_idx, valid_idx = valid_split(len(data), valid_pct, VALID_SEED)
        hp = {**scaled_defaults(DEFAULTS[kind], len(train_idx), 3),
              **{k: v for k, v in params.items() if v is not None}}
        train, valid = data.subset(train_idx), data.subset(valid_idx)
        model = MODELS[kind](y_range=default_y_range(*scale), progress=progress, **hp).fit(
            train, valid if len(valid) else None)
        metrics = {"n_ratings": len(data), "n_train": len(train), "n_valid": len(valid),
                   "load_s": round(load_s, 3), "epoch_s": model.report_.epoch_s, "fit_s": model.report_.fit_s,
                   "device": model.report_.device}
        if len(valid):
            mse = float(np.mean((model.predict(valid.users, valid.items) - valid.ratings) ** 2))
            metrics.update(valid_mse=round(mse, 4), valid_rmse=round(mse ** 0.5, 4))
        else:
            metrics.update(valid_mse=None, valid_rmse=None)
        serve_hp = {**SERVING_DEFAULTS, **(serving or {})}
        scoring, user_vecs = model.scoring_model(), model.user_factors_
        if serve_hp["ranker"] == "implicit":
            rank_hp = {**scaled_defaults(RANKER_DEFAULTS, len(train), 2), **serve_hp.get("ranker_params", {})}
            ranker = ImplicitDotBias(seed=hp.get("seed", 42), device=model.device, progress=progress,
                                     **rank_hp).fit(train)
            scoring.rank_factors, scoring.rank_bias = ranker.item_factors_, ranker.item_bias_
            user_vecs = np.concatenate([user_vecs, ranker.user_factors_], axis=1)
            metrics["ranker_fit_s"] = ranker.report_.fit_s
            serve_hp["ranker_params"] = ranker.get_params()
        t0 = time.perf_counter()
        boot = fit_bootstrap(train, user_vecs, model.user_bias_, attributes, alpha=serve_hp["bootstrap_alpha"],
                             strategy=serve_hp["questionnaire"], seed=hp.get("seed", 42))
        metrics["bootstrap_s"] = round(time.perf_counter() - t0, 3)
        arrays = {"item_stats.npz": item_stats_npz(item_ids, train), "bootstrap.npz": boot.to_npz()}
        if kind == "nn":
            arrays["nn_head.npz"] = scoring.head_to_npz()
        hyperparams = {**model.get_params(), **serve_hp, "valid_pct": valid_pct, "valid_seed": VALID_SEED}
        with engine.begin() as conn:
            version = versions.save_version(
                conn, kind=kind, mode="full", parent_id=None, hyperparams=hyperparams, metrics=metrics,
                max_seq=max_seq, users=FactorRows(user_ids, model.user_bias_, user_vecs),
                items=FactorRows(item_ids, model.item_bias_, scoring.item_rows()), arrays=arrays)
        return {"version": version, "kind": kind, "mode": "full", **metrics, "hyperparams": hyperparams}
    finally:
        versions.release_retrain_lock(engine, lock)
