"""Fit the questionnaire and the bootstrap regressor on warm users, simulating the questionnaire on them."""
from __future__ import annotations

import numpy as np

from ..cf_core.data import CollabData
from .features import AnswerEncoder
from .questionnaire import MAX_BUDGET, Questionnaire, choose_items, infer_questions
from .regressor import Bootstrap

SIM_BUDGETS = (0, 5, 15, 30)


def item_means(data: CollabData) -> np.ndarray:
    """Each item's mean training rating (the global mean for items with none)."""
    counts, sums = data.item_totals()
    glob = float(data.ratings.mean()) if len(data) else 0.0
    return np.where(counts > 0, sums / np.maximum(counts, 1), glob)


def simulated_answers(data: CollabData, asked: list[int], budgets=SIM_BUDGETS,
                      rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[int], list[dict[int, float]]]:
    """Pretend each warm user is new: they know a random half of their ratings (like the protocol's
    answer pool) and answer the first Q ``asked`` items (inner indices) they know, for each budget Q.

    Returns (user of each row, budget of each row, item answers of each row by inner index)."""
    rng = rng or np.random.default_rng(0)
    asked_arr = np.array(asked, dtype=np.int64)
    order = np.argsort(data.users, kind="stable")
    bounds = np.searchsorted(data.users[order], np.arange(data.n_users + 1))
    rank = np.full(data.n_items, len(asked_arr))  # position of each item in the questionnaire
    rank[asked_arr] = np.arange(len(asked_arr))
    rows_u, rows_q, rows_a = [], [], []
    for u in range(data.n_users):
        idx = order[bounds[u]:bounds[u + 1]]
        if len(idx) == 0:
            continue
        known = idx[rng.permutation(len(idx))[: len(idx) // 2]]
        known = known[rank[data.items[known]] < len(asked_arr)]  # only asked items can be answered
        pool = dict(zip(data.items[known].tolist(), data.ratings[known].tolist()))
        for q in budgets:
            rows_u.append(u)
            rows_q.append(q)
            rows_a.append({int(i): pool[i] for i in asked_arr[:q].tolist() if i in pool})
    return np.array(rows_u, dtype=np.int64), rows_q, rows_a


def make_questionnaire(data: CollabData, item_ids: np.ndarray, attributes: list[dict],
                       strategy: str = "positive", max_budget: int = MAX_BUDGET,
                       scale: tuple[float, float] | None = None, tie: np.ndarray | None = None) -> Questionnaire:
    """The sign-up questionnaire: attribute questions + ``max_budget`` items (by database id), from the
    ratings alone (it does not depend on a trained model); ``scale``: the rating scale (lo, hi); ``tie``:
    the order of items otherwise alike (``choose_items``)."""
    asked = choose_items(data.items, data.ratings, data.n_items, max_budget, strategy, scale, tie)
    return Questionnaire(infer_questions(attributes), [int(item_ids[i]) for i in asked])


def fit_bootstrap(data: CollabData, item_ids: np.ndarray, user_factors: np.ndarray, user_bias: np.ndarray,
                  attributes: list[dict], questionnaire: Questionnaire, alpha: float = 30.0, seed: int = 42) -> Bootstrap:
    """A ridge map from answers to ``questionnaire`` (``make_questionnaire``) to [embedding, bias], trained
    on warm users with the questionnaire simulated on them."""
    asked = list(np.searchsorted(item_ids, questionnaire.items))
    encoder = AnswerEncoder.fit(questionnaire, attributes, item_means(data)[asked].tolist())
    users, budgets, answers = simulated_answers(data, asked, rng=np.random.default_rng(seed))
    answers = [{int(item_ids[i]): r for i, r in a.items()} for a in answers]  # by database id, as served
    budgets = np.array(budgets)
    blocks, rows = [], []
    for q in np.unique(budgets):  # one transform per budget: only the first q items count as asked
        idx = np.flatnonzero(budgets == q)
        blocks.append(encoder.transform([attributes[u] for u in users[idx]], [answers[k] for k in idx], budget=int(q)))
        rows.append(users[idx])
    targets = np.concatenate([user_factors, user_bias[:, None]], axis=1)
    return Bootstrap.fit(encoder, np.concatenate(blocks), targets[np.concatenate(rows)], alpha)
