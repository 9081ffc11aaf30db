"""What large data switches on, tried on small data: the ranker's sampled softmax learns the planted
taste, the lazy AdamW updates what it should, the rating model trains with it, and the rules that
bound the ranker's cost at scale do what they say."""
from __future__ import annotations

import numpy as np
import pytest

from cfb.bootstrap.questionnaire import choose_items, infer_questions
from cfb.cf_core.data import CollabData
from cfb.cf_core.feature_model import FeatureModelConfig, FeatureUserModel, Reveal, inclusion_probabilities

from .conftest import planted_ratings


def _fit(config: FeatureModelConfig):  # noqa: ANN202
    ds = planted_ratings(n_users=80, n_items=60)
    users = sorted(ds.ratings.user.unique())
    items = sorted(ds.ratings.item.unique())
    u = ds.ratings.user.map({x: k for k, x in enumerate(users)}).to_numpy()
    i = ds.ratings.item.map({x: k for k, x in enumerate(items)}).to_numpy()
    data = CollabData(u, i, ds.ratings.rating.to_numpy(np.float32), len(users), len(items))
    attrs_of = dict(zip(ds.users.user, ds.users.attributes))
    attributes = [attrs_of[x] for x in users]
    asked = choose_items(data.items, data.ratings, data.n_items, 10)
    model = FeatureUserModel(config, seed=3, progress=False).fit(
        data, ds.ratings.timestamp.to_numpy(float), attributes, infer_questions(attributes), asked, (1.0, 5.0))
    return model, items


def test_sampled_softmax_learns_the_planted_taste():
    cfg = FeatureModelConfig(n_factors=16, epochs=15, lr=3e-2, dropout=0.1, full_softmax_items=20, negatives=16)
    model, items = _fit(cfg)
    assert model.sampled_softmax_
    empty = np.zeros(0, np.int64)
    a_items = np.array([k for k, x in enumerate(items) if x.startswith("a")][:3])
    reveals = [Reveal({"gender": "F"}, empty, empty.astype(float)), Reveal({"gender": "M"}, empty, empty.astype(float)),
               Reveal({}, a_items, np.full(3, 5.0))]
    scores = model.item_scores(model.user_vectors(reveals))
    for row, group in zip(scores, "aba"):
        top = [items[k] for k in np.argsort(-row)[:5]]
        assert [x[0] for x in top] == [group] * 5, top


def test_full_softmax_below_the_catalogue_threshold():
    model, _ = _fit(FeatureModelConfig(n_factors=8, epochs=2))
    assert not model.sampled_softmax_


@pytest.mark.parametrize("m", [1, 3, 7, 10])
def test_inclusion_probabilities_sum_to_the_sample_size_and_match_the_sampler(m):
    w = np.array([50.0, 20, 5, 5, 1, 1, 1, 0.5, 0.5, 0.1])
    p = inclusion_probabilities(w, m)
    assert p.sum() == pytest.approx(m) and (p <= 1).all() and (p > 0).all()
    assert (np.diff(p[np.argsort(-w)]) <= 1e-12).all()  # more weight, at least as likely
    if m == len(w):
        assert (p == 1).all()
    else:  # the Gumbel top-k draw the batches use
        rng = np.random.default_rng(0)
        hits = np.zeros(len(w))
        for _ in range(4000):
            hits[np.argpartition(-(np.log(w) + rng.gumbel(size=len(w))), m - 1)[:m]] += 1
        assert np.abs(hits / 4000 - p).max() < 0.06


def test_epochs_and_users_per_epoch_stop_growing_with_the_users():
    cfg = FeatureModelConfig(epochs=30, max_user_epochs=200_000)
    assert (cfg.epochs_for(754), cfg.users_per_epoch(754)) == (30, 754)  # MovieLens 100k: every user, 30 epochs
    assert (cfg.epochs_for(53_424), cfg.users_per_epoch(53_424)) == (3, 53_424)
    assert (cfg.epochs_for(162_541), cfg.users_per_epoch(162_541)) == (2, 100_000)


def test_lazy_adamw_matches_adamw_and_leaves_untouched_rows_alone():
    import torch

    from cfb.cf_core.lazy_adam import LazyAdamW

    torch.manual_seed(0)
    w0 = torch.randn(6, 3)
    dense, ref, sparse = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    opt = LazyAdamW([dense], lr=0.1, weight_decay=0.3)
    opt_ref = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.3)
    opt_sparse = LazyAdamW([sparse], lr=0.1, weight_decay=0.3)
    rows = torch.tensor([1, 4, 1])
    for _ in range(3):
        for p, o in ((dense, opt), (ref, opt_ref)):
            o.zero_grad()
            (p[rows] ** 2).sum().backward()
            o.step()
        opt_sparse.zero_grad()
        (torch.nn.functional.embedding(rows, sparse, sparse=True) ** 2).sum().backward()
        opt_sparse.step()
    assert torch.allclose(dense, ref, atol=1e-6)  # dense gradients: AdamW
    touched = torch.tensor([1, 4])
    untouched = torch.tensor([0, 2, 3, 5])
    assert torch.equal(sparse.detach()[untouched], w0[untouched])  # no decay, no move
    assert torch.allclose(sparse.detach()[touched], dense.detach()[touched], atol=1e-6)  # rows used every step


def test_dot_model_with_sparse_gradients_and_lazy_adam_learns_the_ratings():
    from cfb.cf_core.train import DotBias

    ds = planted_ratings()
    users, items = sorted(ds.ratings.user.unique()), sorted(ds.ratings.item.unique())
    u = ds.ratings.user.map({x: k for k, x in enumerate(users)}).to_numpy()
    i = ds.ratings.item.map({x: k for k, x in enumerate(items)}).to_numpy()
    r = ds.ratings.rating.to_numpy(np.float32)
    model = DotBias(n_factors=8, epochs=12, lr=0.03, bs=256, wd=0.05, progress=False)
    model.lazy_at = 0  # what 5M ratings and more get
    model.fit(CollabData(u, i, r, len(users), len(items)))
    assert float(np.mean((model.predict(u, i) - r) ** 2)) < 0.3  # a constant predictor: about 2.3


@pytest.mark.parametrize("times", ["whole", "fractional"])
def test_time_order_is_user_then_time_then_item_with_unknown_times_first(times):
    from cfb.cf_core.feature_model import time_order

    rng = np.random.default_rng(3)
    pairs = rng.permutation(np.array([(u, i) for u in range(6) for i in range(25)]))[:90]  # each pair once
    users, items = pairs[:, 0], pairs[:, 1]
    ts = rng.integers(-1, 5, len(pairs)).astype(float) + (0.5 if times == "fractional" else 0.0)
    unknown = ts < 0
    expected = np.lexsort((np.where(unknown, np.arange(len(ts)), items), np.where(unknown, -1.0, ts), users))
    assert np.array_equal(time_order(users, items, ts), expected)


def test_ratings_given_at_the_same_time_are_ordered_by_item_id_as_text(engine):
    """Protocol §5 breaks a time tie by item id compared as text; the ranker's first-in-time reveals
    broke it by inner index (database id order: "2" before "10"), a different first n for 44 of 943
    MovieLens 100k users at n = 1. Training now reads each item's text rank and orders by it."""
    import pandas as pd

    from cfb.cf_core.feature_model import time_order
    from cfb.db.sources import Dataset
    from cfb.service.ingest import ingest_dataset
    from cfb.service.training import load_training_data

    ratings = pd.DataFrame({"user": ["u"] * 3 + ["v"] * 3, "item": ["1", "2", "10"] * 2,
                            "rating": [5.0, 4.0, 3.0] * 2, "timestamp": [7, 7, 7, 9, 8, 9]})
    ingest_dataset(engine, Dataset(ratings, scale=(1.0, 5.0)))
    td, _ = load_training_data(engine)
    with engine.connect() as conn:
        from cfb.db import store
        from cfb.db.schema import Item

        external = {v: k for k, v in store.id_map(conn, Item).items()}
    names = [external[int(x)] for x in td.item_ids]
    assert names == ["1", "2", "10"] and td.item_tie.tolist() == [0, 2, 1]
    order = time_order(td.data.users, td.data.items, td.timestamps, td.item_tie)
    first = [(int(td.data.users[k]), names[td.data.items[k]]) for k in order]
    assert [i for _, i in first] == ["1", "10", "2", "2", "1", "10"]  # u: all at 7; v: "2" at 8, then "1" < "10"


def test_the_bags_weight_per_count_is_learned_stored_and_optional():
    """count_scale: a learned weight per count bucket multiplies the item bags; it survives the plain
    arrays, and a version stored without it (before it existed) serves with weight 1."""
    cfg = FeatureModelConfig(n_factors=16, epochs=6, lr=3e-2, dropout=0.1)
    model, items = _fit(cfg)
    assert model.bag_scale_ is not None and model.bag_scale_.shape == (12,)
    assert not np.allclose(model.bag_scale_[1:5], 1.0)  # learned, not left at its start
    a_items = np.array([k for k, x in enumerate(items) if x.startswith("a")][:3])
    reveals = [Reveal({}, a_items[:n], np.full(n, 5.0)) for n in (0, 1, 3)]
    again = FeatureUserModel.from_arrays(model.to_arrays())
    assert np.array_equal(again.user_vectors(reveals), model.user_vectors(reveals))
    older = model.to_arrays()
    del older["bag_scale"]
    unscaled = FeatureUserModel.from_arrays(older)
    assert unscaled.bag_scale_ is None
    assert np.array_equal(unscaled.user_vectors(reveals[:1]), model.user_vectors(reveals[:1]))  # no bag at n = 0
    assert not np.allclose(unscaled.user_vectors(reveals[1:]), model.user_vectors(reveals[1:]))
    off, _ = _fit(FeatureModelConfig(n_factors=16, epochs=2, count_scale=False))
    assert off.bag_scale_ is None and "bag_scale" not in off.to_arrays()


@pytest.mark.parametrize("count_scale", [True, False])
def test_history_vectors_equal_one_reveal_per_user(count_scale):
    """The batched full-history vectors (sparse products) are the per-user loop's, attributes included,
    for users with many, one or no ratings, a repeated item and an item outside the catalogue."""
    model, items = _fit(FeatureModelConfig(n_factors=16, epochs=2, count_scale=count_scale))
    rng = np.random.default_rng(5)
    n_users = 6
    users = np.concatenate([np.zeros(20, np.int64), [1], np.full(5, 3), [4, 4], [5]])
    item = rng.integers(0, len(items), len(users))
    item[-3] = item[-2]  # user 4 rates the same item twice
    item[-1] = len(items) + 3  # not in the catalogue: ignored, as user_vectors ignores it
    ratings = rng.integers(1, 6, len(users)).astype(float)
    attributes = [{"gender": "F", "age": 30}, {"gender": "M"}, {}, {"age": 70}, {"gender": "F"}]  # user 5: none
    batched = model.history_vectors(users, item, ratings, n_users, attributes)
    one_by_one = model.user_vectors([Reveal(attributes[u] if u < len(attributes) else {}, item[users == u],
                                            ratings[users == u], None) for u in range(n_users)])
    assert batched.shape == (n_users, 16) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0], batched[2])  # many ratings against none


def test_an_infinite_stored_number_leaves_both_answer_encoders_finite():
    """A database from before ingest refused infinite numbers may hold an age of inf (or 10**400, which no
    float holds): the questions skip it (infer_questions), and so must the bootstrap's and the ranker's
    encoders (mean inf and NaN bin edges made every user's features NaN; 10**400 was an OverflowError)."""
    from cfb.bootstrap.features import AnswerEncoder
    from cfb.bootstrap.questionnaire import Questionnaire
    from cfb.cf_core.feature_model import _AttrEncoder

    attrs = [{"age": 20}, {"age": float("inf")}, {"age": 30}, {"age": 40}, {"age": float("nan")}, {"age": 10**400}]
    questions = infer_questions(attrs)
    assert [(q.name, q.type, q.range) for q in questions] == [("age", "number", [20.0, 40.0])]
    enc = AnswerEncoder.fit(Questionnaire(questions, []), attrs, [])
    assert np.isfinite(enc.numeric_stats["age"]["mean"]) and np.isfinite(enc.numeric_stats["age"]["edges"]).all()
    rows = enc.transform(attrs + [{"age": 25}, {}], [{}] * 8)
    assert np.isfinite(rows).all()
    assert (rows[1] == rows[7]).all() and (rows[4] == rows[7]).all() and (rows[5] == rows[7]).all()  # (as no answer)
    attr_enc = _AttrEncoder.fit(questions, attrs, n_bins=4)
    assert np.isfinite(attr_enc.spec[0]["edges"]).all()
    assert [attr_enc.encode(a)[0] for a in attrs] == [1, 0, 3, 4, 0, 0]  # (edges 25, 30, 35; inf, NaN, 10**400 unknown)
