"""Fold-in recovers a user's factors from their ratings, shrinks toward the prior, and is idempotent."""
from __future__ import annotations

import numpy as np
import pytest

from cfb.cf_core.rating import RATING_MODELS, DotRating, FoldInConfig, NNRating


def dot_model(rng, n_items=300, k=4) -> DotRating:
    return DotRating((0.0, 5.5), rng.normal(0, 1, (n_items, k)).astype(np.float32),
                     rng.normal(0, 0.3, n_items).astype(np.float32))


def nn_model(rng, n_items=300, k=4) -> NNRating:
    head = [("linear", [rng.normal(0, 0.5, (8, 2 * k)).astype(np.float32), np.zeros(8, np.float32)]),
            ("relu", []), ("affine", [np.ones(8, np.float32), np.full(8, 0.1, np.float32)]),
            ("linear", [rng.normal(0, 0.5, (1, 8)).astype(np.float32), np.zeros(1, np.float32)])]
    return NNRating((0.0, 5.5), rng.normal(0, 1, (n_items, k)).astype(np.float32), np.zeros(n_items, np.float32),
                    head=head)


# a random rating model of each kind: every fold-in test below runs on each
RANDOM_MODELS = {"dot": dot_model, "nn": nn_model}
EVERY_KIND = pytest.mark.parametrize("make", list(RANDOM_MODELS.values()), ids=list(RANDOM_MODELS))


def test_every_kind_of_rating_model_is_tested_here():
    assert set(RANDOM_MODELS) == set(RATING_MODELS)


def test_many_ratings_recover_the_true_user():
    m = dot_model(np.random.default_rng(0))
    true_vec, true_bias = np.array([0.5, -0.3, 0.2, 0.1], np.float32), 0.4
    items = np.arange(300)
    ratings = m.predict(true_vec, true_bias, items)
    vec, bias = m.fold_in(items, ratings, np.zeros(4, np.float32), 0.0, FoldInConfig(1e-3, 1e-3))
    assert np.allclose(vec, true_vec, atol=1e-2) and abs(bias - true_bias) < 1e-2


@EVERY_KIND
def test_no_ratings_or_strong_shrinkage_keep_the_prior(make):
    rng = np.random.default_rng(1)
    m = make(rng)
    prior = rng.normal(0, 0.1, 4).astype(np.float32)
    vec, bias = m.fold_in(np.array([], np.int64), np.array([]), prior, 0.2)
    assert np.array_equal(vec, prior) and bias == 0.2
    vec, bias = m.fold_in(np.array([1, 2]), np.array([5.0, 5.0]), prior, 0.2, FoldInConfig(1e9, 1e9))
    assert np.allclose(vec, prior, atol=1e-5) and abs(bias - 0.2) < 1e-5


@EVERY_KIND
def test_fold_in_moves_predictions_toward_the_ratings(make):
    m = make(np.random.default_rng(2))
    items = np.arange(20)
    prior = np.zeros(4, np.float32)
    before = m.predict(prior, 0.0, items)
    vec, bias = m.fold_in(items, np.full(20, 5.0), prior, 0.0, FoldInConfig(1.0, 1.0))
    assert m.predict(vec, bias, items).mean() > before.mean() + 0.3


@EVERY_KIND
def test_folding_the_same_ratings_twice_gives_the_same_user(make):
    """Fold-in is a pure function of (prior, ratings): nothing accumulates between calls."""
    m = make(np.random.default_rng(3))
    items, ratings = np.array([4, 9, 17]), np.array([5.0, 1.0, 4.0])
    prior = np.full(4, 0.1, np.float32)
    once = m.fold_in(items, ratings, prior, 0.1)
    twice = m.fold_in(items, ratings, prior, 0.1)
    assert np.array_equal(once[0], twice[0]) and once[1] == twice[1]


def test_nn_backward_matches_finite_differences():
    """The numpy backprop through the exported head is the gradient of the head's output."""
    from cfb.cf_core.scoring import run_head, run_head_backward

    m = nn_model(np.random.default_rng(4))
    x = np.random.default_rng(5).normal(0, 1, (1, 8))
    out, cache = run_head(m.head, x, keep=True)
    grad = run_head_backward(m.head, cache, np.ones_like(out))
    eps = 1e-6
    numeric = [(run_head(m.head, x + eps * np.eye(8)[j]) - out)[0, 0] / eps for j in range(8)]
    assert np.allclose(grad[0], numeric, atol=1e-4)


@EVERY_KIND
def test_ratings_that_cancel_leave_the_prior_exactly(make):
    """A changed rating changed back: the ratings are the ones the row learned, so the user must not
    move (Adam's full-size steps on a rounding-error gradient once moved the nn user by ~1e-5)."""
    rng = np.random.default_rng(3)
    m = make(rng)
    prior = rng.normal(0, 0.3, 4).astype(np.float32)
    items, ratings = np.array([7, 2, 11]), np.array([2.0, 4.5, 1.0])
    vec, bias = m.fold_in(items, ratings, prior, 0.1, FoldInConfig(10.0, 30.0), learned=(items[::-1], ratings[::-1]))
    assert np.array_equal(vec, prior) and np.float32(bias) == np.float32(0.1)


@EVERY_KIND
def test_fold_in_moves_a_user_alike_on_any_rating_scale(make):
    """The shrinkage follows the scale's width squared (ServingConfig.user_foldin): the same model on
    1..10 (every rating mapped a + s·r) moves a user by the same share of the scale as on 1..5."""
    from cfb.cf_core.model import ServingConfig

    rng = np.random.default_rng(4)
    m = make(rng)
    prior = rng.normal(0, 0.3, 4).astype(np.float32)
    items, ratings = np.array([3, 8, 11]), np.array([5.0, 4.0, 1.0])
    moves = []
    for a, s in [(0.0, 1.0), (1 - 2.25, 2.25)]:  # 1..5, and 1..10
        scaled = type(m).from_arrays({**m.to_arrays(), "y_range": np.array([a + s * 0.0, a + s * 5.5])})
        before = scaled.predict(prior, 0.0)
        vec, bias = scaled.fold_in(items, a + s * ratings, prior, 0.0, ServingConfig().user_foldin(4.0 * s))
        moves.append((scaled.predict(vec, bias) - before) / s)
    assert np.abs(moves[0]).max() > 0.05
    assert np.allclose(moves[0], moves[1], atol=1e-3)


def test_top_n_breaks_ties_by_lower_index_at_the_cut():
    """The protocol breaks ties by id order: argpartition alone took any of the items tied at the
    10th place (popularity's ranking has such ties)."""
    from cfb.cf_core.scoring import top_n

    rng = np.random.default_rng(5)
    for _ in range(300):
        scores = rng.integers(0, 5, size=int(rng.integers(1, 300))).astype(np.float64)
        scores[rng.random(len(scores)) < 0.1] = -np.inf  # (left out: never ranked)
        n = int(rng.integers(1, 15))
        expected = [i for i in np.lexsort((np.arange(len(scores)), -scores)) if np.isfinite(scores[i])][:n]
        assert top_n(scores, n).tolist() == expected


@pytest.mark.parametrize("make,at_once", [(dot_model, None), (nn_model, 1024), (nn_model, 12)])
def test_many_items_solved_at_once_get_the_rows_each_gets_alone(make, at_once, monkeypatch):
    """``fold_in_items`` (an incremental retrain solves every re-solved item in one call; the nn model
    runs their ratings through its MLP together, ``RATINGS_AT_ONCE`` at a time) gives each item the row
    ``fold_in_item`` gives it alone, whatever order its ratings come in; an item with no rating keeps its
    prior row."""
    from cfb.cf_core import rating

    if at_once is not None:
        monkeypatch.setattr(rating, "RATINGS_AT_ONCE", at_once)
    rng = np.random.default_rng(6)
    m = make(rng)
    n = 40
    users, bias = rng.normal(0, 1, (n, 4)).astype(np.float32), rng.normal(0, 0.3, n).astype(np.float32)
    item_of_rating = rng.permutation(np.repeat([0, 1, 3], [5, 15, 20]))  # item 2: no rating
    ratings = rng.integers(1, 6, n).astype(np.float64)
    priors, prior_bias = rng.normal(0, 0.3, (4, 4)).astype(np.float32), rng.normal(0, 0.3, 4).astype(np.float32)
    config = FoldInConfig(2.0, 3.0)
    vecs, biases = m.fold_in_items(users, bias, item_of_rating, ratings, priors, prior_bias, config)
    for k in range(4):
        at = item_of_rating == k
        alone = m.fold_in_item(users[at], bias[at], ratings[at], priors[k], float(prior_bias[k]), config)
        assert np.allclose(vecs[k], alone[0], atol=1e-6) and abs(biases[k] - alone[1]) < 1e-6
    assert np.array_equal(vecs[2], priors[2]) and biases[2] == prior_bias[2]
    assert not np.allclose(vecs[1], priors[1], atol=1e-2)


@EVERY_KIND
def test_a_trained_users_fit_reaches_its_optimum_when_its_ratings_turn_round(make):
    """From a trained row whose ratings all turn round (r → 5.5 − r), the fit ends at a minimum of its
    objective (Σ (r − pred)² + reg |θ − θ0|² + 2 gᵀ(θ − θ0); through the nn's ReLUs a local one): a long
    plain gradient descent from it finds nothing lower. Gauss-Newton through the ReLUs stopped well
    short of it after 8 steps (a review)."""
    rng = np.random.default_rng(3)  # (with 8 steps the nn's fit here ended 2% above the minimum)
    m = make(rng)
    cfg = FoldInConfig(1.0, 1.0)
    row = rng.normal(0, 0.8, 4).astype(np.float32)
    items = np.arange(120)
    learned = np.clip(m.predict(row, 0.0, items) + rng.normal(0, 0.3, 120), 0.5, 5.0)
    now = 5.5 - learned
    vec, bias = m.fold_in(items, now, row, 0.0, cfg, learned=(items, learned))
    theta0 = m._theta(row, 0.0)
    pull = m._learned_pull((items, learned), theta0)
    reg = np.r_[np.full(4, cfg.reg), cfg.reg_bias][:len(theta0)]

    def objective(theta: np.ndarray) -> float:
        pred, _ = m._jacobian(items, theta)
        d = theta - theta0
        return float(((now - pred) ** 2).sum() + (reg * d * d).sum() + 2 * pull @ d)

    theta = m._theta(vec, bias).copy()
    fitted = objective(theta)
    for _ in range(20_000):  # a long, small-step descent from the fit: it must find nothing much lower
        pred, J = m._jacobian(items, theta)
        theta -= 2e-4 * (-2 * J.T @ (now - pred) + 2 * reg * (theta - theta0) + 2 * pull)
    assert fitted <= objective(theta) * 1.001 + 1e-9
