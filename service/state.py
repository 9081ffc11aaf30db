"""The serving model of a database, loaded once per process from plain arrays (no torch for dot)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection

from ..bootstrap.regressor import Bootstrap
from ..cf_core.foldin import fold_in_user
from ..cf_core.scoring import ScoringModel, from_npz, head_from_npz
from ..db import store, versions

_CACHE: dict[tuple[str, int], "ServingState"] = {}

# How a version ranks and folds users in; stored in its hyperparams. Chosen on pseudo-cold users
# (docs/coldstart.md): never on the protocol's test users.
SERVING_DEFAULTS = {"ranker": "implicit", "rating_weight": 0.5, "popularity_weight": 1.0, "foldin_reg": 20.0,
                    "foldin_reg_bias": 100.0, "foldin_rank_reg": 100.0,
                    "bootstrap_alpha": 30.0, "questionnaire": "popularity"}


@dataclass
class ServingState:
    """A model version ready to score: item side, popularity, bootstrap, settings."""

    version: int
    kind: str
    scoring: ScoringModel
    item_ids: np.ndarray  # database ids, aligned with the rows of scoring.item_factors
    counts: np.ndarray  # training ratings per item
    bootstrap: Bootstrap | None
    hyperparams: dict

    def item_index(self, db_ids) -> np.ndarray:  # noqa: ANN001
        """Inner indices of database item ids (-1 for items this model does not know)."""
        db_ids = np.asarray(db_ids, dtype=np.int64)
        if len(self.item_ids) == 0:
            return np.full(len(db_ids), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.item_ids, db_ids), 0, len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == db_ids, pos, -1)

    def ranking_scores(self, vec: np.ndarray, bias: float) -> np.ndarray:
        """What recommendations are ranked by.

        With a ranking model: its logit that the user would rate the item, plus ``rating_weight`` ×
        the predicted rating (relevant = seen *and* liked). Without: the predicted rating, plus
        ``popularity_weight`` × log of the item's number of ratings."""
        hp = {**SERVING_DEFAULTS, **self.hyperparams}
        pred = self.scoring.predict_user(vec, bias)
        if self.scoring.rank_factors is not None:
            return self.scoring.rank_logits(vec) + float(hp["rating_weight"]) * pred
        return pred + float(hp["popularity_weight"]) * np.log1p(self.counts)


def load_state(conn: Connection, version: int | None = None) -> ServingState:
    """The serving (or given) version, cached per database and version."""
    version = version if version is not None else versions.require_serving(conn)
    key = (str(conn.engine.url), version)
    if key in _CACHE:
        return _CACHE[key]
    mv = versions.get_version(conn, version)
    items = versions.load_items(conn, version)
    hp = mv["hyperparams"]
    head_blob = versions.load_array(conn, version, "nn_head.npz")
    factors, rank_factors, rank_bias = ScoringModel.unpack_item_rows(items.factors, hp["n_factors"])
    scoring = ScoringModel(mv["kind"], tuple(hp["y_range"]), factors, items.bias,
                           head_from_npz(head_blob) if head_blob else None, rank_factors, rank_bias)
    stats = from_npz(versions.load_array(conn, version, "item_stats.npz"))
    counts = np.zeros(len(items.ids))
    counts[np.searchsorted(items.ids, stats["item_ids"])] = stats["counts"]
    boot_blob = versions.load_array(conn, version, "bootstrap.npz")
    state = ServingState(version, mv["kind"], scoring, items.ids, counts,
                         Bootstrap.from_npz(boot_blob) if boot_blob else None, hp)
    _CACHE[key] = state
    return state


def prior_factors(state: ServingState, attributes: dict, item_ratings: dict[int, float]) -> tuple[np.ndarray, float]:
    """A new user's starting point: the bootstrap regressor's output (or zeros without one)."""
    k = state.scoring.n_factors + state.scoring.n_rank_factors
    if state.bootstrap is None:
        return np.zeros(k, np.float32), 0.0
    vec, bias = state.bootstrap.initial_factors([attributes], [item_ratings])
    return vec[0], float(bias[0])


def cold_factors(state: ServingState, attributes: dict, items: np.ndarray, ratings: np.ndarray) -> tuple[np.ndarray, float]:
    """Embedding and bias for a user the model has no row for: bootstrap prior, then fold-in."""
    known = items >= 0
    items, ratings = items[known], np.asarray(ratings, np.float32)[known]
    vec, bias = prior_factors(state, attributes, dict(zip(items.tolist(), ratings.tolist())))
    return fold_in_user(state.scoring, items, ratings, vec, bias, **foldin_params(state.hyperparams))


def foldin_params(hyperparams: dict) -> dict:
    """The version's fold-in shrinkage settings."""
    hp = {**SERVING_DEFAULTS, **hyperparams}
    return {"reg": hp["foldin_reg"], "reg_bias": hp["foldin_reg_bias"], "rank_reg": hp["foldin_rank_reg"]}


def user_factors(conn: Connection, state: ServingState, user_id: int) -> tuple[np.ndarray, float]:
    """The user's row in the serving version, or (for users added since) bootstrap + fold-in of their ratings."""
    rows = versions.load_users(conn, state.version, [user_id])
    if len(rows.ids):
        return rows.factors[0], float(rows.bias[0])
    attributes = store.user_attributes_of(conn, user_id)
    items, ratings = store.user_ratings(conn, user_id)
    return cold_factors(state, attributes, state.item_index(items), ratings)
