"""Fold-in recovers a user's factors from their ratings, and shrinks toward the prior."""
from __future__ import annotations

import numpy as np

from cfb.cf_core.foldin import fold_in_ranking, fold_in_user
from cfb.cf_core.scoring import ScoringModel


def model(rng, n_items=300, k=4, rank_k=0) -> ScoringModel:
    m = ScoringModel("dot", (0.0, 5.5), rng.normal(0, 1, (n_items, k)).astype(np.float32),
                     rng.normal(0, 0.3, n_items).astype(np.float32))
    if rank_k:
        m.rank_factors = rng.normal(0, 1, (n_items, rank_k)).astype(np.float32)
        m.rank_bias = rng.normal(-2, 0.5, n_items).astype(np.float32)
    return m


def test_many_ratings_recover_the_true_user():
    rng = np.random.default_rng(0)
    m = model(rng)
    true_vec, true_bias = np.array([0.5, -0.3, 0.2, 0.1], np.float32), 0.4
    items = np.arange(300)
    ratings = m.predict_user(true_vec, true_bias, items)
    vec, bias = fold_in_user(m, items, ratings, np.zeros(4, np.float32), 0.0, reg=1e-3, reg_bias=1e-3)
    assert np.allclose(vec, true_vec, atol=1e-2) and abs(bias - true_bias) < 1e-2


def test_no_ratings_or_strong_shrinkage_keep_the_prior():
    rng = np.random.default_rng(1)
    m = model(rng, rank_k=3)
    prior = rng.normal(0, 0.1, 7).astype(np.float32)
    vec, bias = fold_in_user(m, np.array([], np.int64), np.array([]), prior, 0.2)
    assert np.array_equal(vec, prior) and bias == 0.2
    vec, bias = fold_in_user(m, np.array([1, 2]), np.array([5.0, 5.0]), prior, 0.2, reg=1e9, reg_bias=1e9, rank_reg=1e9)
    assert np.allclose(vec, prior, atol=1e-6) and abs(bias - 0.2) < 1e-6


def test_ranking_fold_in_raises_the_rated_items():
    rng = np.random.default_rng(2)
    m = model(rng, rank_k=3)
    prior = np.zeros(3, np.float32)
    liked = np.array([3, 7, 11])
    u = fold_in_ranking(m.rank_factors, m.rank_bias, liked, prior, reg=1.0)
    before = m.rank_factors[liked] @ prior + m.rank_bias[liked]
    after = m.rank_factors[liked] @ u + m.rank_bias[liked]
    assert (after > before).all()
