"""The protocol's splits and metrics, checked against hand-computed cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cfb.cf_core.split import answer_pool_split, cold_users, valid_split
from cfb.db.sources import Dataset
from cfb.evaluation.baselines import DemographicPopularity, Popularity, age_band
from cfb.evaluation.metrics import ndcg_at_k, recall_at_k


def test_cold_users_follow_section_1():
    users = [str(u) for u in range(1, 101)]
    cold = cold_users(users, 42)
    expected = set(np.random.default_rng(42).choice(sorted(users), size=20, replace=False).tolist())
    assert cold == expected and len(cold) == 20
    assert cold_users(list(reversed(users)), 42) == cold  # order of input does not matter
    assert cold_users(users, 43) != cold


def test_answer_pool_follows_section_3():
    items = ["10", "2", "33", "4", "5"]
    pool, test = answer_pool_split(7, items, 42)
    srt = sorted(items)
    perm = np.random.default_rng([42, 7]).permutation(5)
    assert pool == [srt[i] for i in perm[:2]] and test == [srt[i] for i in perm[2:]]


def test_valid_split_is_a_seeded_permutation():
    tr, va = valid_split(100, 0.2, 42)
    assert len(va) == 20 and set(tr) | set(va) == set(range(100)) and not set(tr) & set(va)
    assert set(va) == set(np.random.default_rng(42).permutation(100)[:20])


def test_ndcg_and_recall():
    ranked = ["a", "x", "b", "y"]
    relevant = {"a", "b", "z"}
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevant) == pytest.approx(dcg / idcg)
    assert recall_at_k(ranked, relevant) == pytest.approx(2 / 3)
    assert ndcg_at_k(["x"], {"a"}) == 0.0
    many = {str(i) for i in range(20)}
    assert recall_at_k([str(i) for i in range(10)], many) == 1.0  # min(10, relevant)


def test_popularity_baselines():
    items = np.array([0, 0, 0, 1, 2, 2])
    ratings = np.array([5, 4, 3, 1, 2, 2], float)
    pop = Popularity().fit(items, ratings, 4)
    assert list(np.argsort(-pop.scores(), kind="stable")[:3]) == [0, 2, 1]
    gm = ratings.mean()
    assert pop.predict(np.array([0, 3, -1])) == pytest.approx([(12 + 10 * gm) / 13, gm, gm])
    users = np.array([0, 0, 0, 1, 1, 1])
    demo = DemographicPopularity().fit(items, ratings, 4).fit_groups(
        users, items, [{"gender": "F", "age": 20}, {"gender": "M", "age": 60}], 4)
    assert np.argmax(demo.scores({"gender": "M", "age": 61})) == 2
    assert np.argmax(demo.scores({"gender": "F", "age": 19})) == 0
    assert np.argmax(demo.scores({})) == 0  # unknown group: popularity
    assert [age_band(a) for a in (17, 18, 24, 25, 49, 50, 55, 56)] == [0, 1, 1, 2, 4, 5, 5, 6]


def test_positive_popularity_counts_ratings_of_4_and_5_with_section_6_ties():
    from cfb.evaluation.baselines import PositivePopularity

    # item 0: two 5s; item 1: two 4s and one 1 (more ratings than item 0); item 2: five 3s; item 3: two 4s
    items = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    ratings = np.array([5, 5, 4, 4, 1, 3, 3, 3, 3, 3, 4, 4], float)
    pp = PositivePopularity().fit(items, ratings, 4)
    order = list(np.argsort(-pp.scores(), kind="stable"))
    assert order == [1, 0, 3, 2]  # 1 before 0 and 3 (more ratings), 0 before 3 (lower id), 2 has none
    assert pp.predict(np.array([0])) == pytest.approx(Popularity().fit(items, ratings, 4).predict(np.array([0])))


def _result(users, ndcgs):  # noqa: ANN001, ANN202
    from cfb.evaluation.metrics import Tally

    t = Tally()
    for u, x in zip(users, ndcgs):
        t.add_rank(u, x, x)
    return t.result()


def test_paired_difference_and_standard_errors_by_hand():
    from cfb.evaluation.metrics import paired_difference

    a, b = _result("wxyz", [1.0, 0.5, 0.0, 0.5]), _result("wxyz", [0.5, 0.5, 0.5, 0.0])
    d = np.array([0.5, 0.0, -0.5, 0.5])
    assert paired_difference(a, b) == {"diff": round(d.mean(), 4), "se": round(d.std(ddof=1) / 2, 4)}
    assert a["ndcg@10_se"] == round(np.std([1.0, 0.5, 0.0, 0.5], ddof=1) / 2, 4)
    with pytest.raises(ValueError, match="same users"):
        paired_difference(a, _result("wxzy", [0.5, 0.5, 0.5, 0.0]))  # the same users in another order
    assert _result("w", [1.0])["ndcg@10_se"] is None


def test_standard_error_over_seeds_counts_each_user_once():
    from cfb.evaluation.metrics import clustered_standard_error, combine_seeds

    rng = np.random.default_rng(0)
    x, y = rng.random(50), rng.random(60)
    one = clustered_standard_error([(list(range(50)), x)])
    assert one == round(x.std(ddof=1) / np.sqrt(50), 4)  # one seed: the usual standard error
    # the same users twice (two seeds that drew the same cold users) are no more evidence than once
    assert clustered_standard_error([(list(range(50)), x), (list(range(50)), x)]) == one
    # disjoint users: about √(se₁² + se₂²) / 2, the independent seeds' formula
    apart = clustered_standard_error([(list(range(50)), x), (list(range(100, 160)), y)])
    independent = np.sqrt((x.std(ddof=1) ** 2 / 50) + (y.std(ddof=1) ** 2 / 60)) / 2
    assert apart == pytest.approx(independent, rel=0.03)
    # every user alike: nothing to be unsure of, however the seeds share their users
    assert clustered_standard_error([(list(range(50)), np.full(50, 0.3)), (list(range(25, 60)), np.full(35, 0.3))]) == 0
    with pytest.raises(ValueError, match="one user per value"):
        clustered_standard_error([(["a"], np.array([0.1, 0.2]))])
    # plain means over seeds; standard errors need the users, so combine_seeds leaves them None
    m = combine_seeds([{"rmse": 0.9, "ndcg@10": 0.3, "ndcg@10_se": 0.03, "per_user": {"user": [1]}},
                       {"rmse": 1.0, "ndcg@10": None, "ndcg@10_se": 0.04, "per_user": {"user": [2]}}])
    assert m == {"rmse": 0.95, "ndcg@10": 0.3, "ndcg@10_se": None}


def test_the_mean_over_seeds_counts_users_not_their_mean():
    """Over seeds, "users" is how many distinct users were scored (the standard errors' units) and
    "users_per_seed" each seed's count: a mean of 19 and 20 users is not 19.5 users."""
    from cfb.evaluation.metrics import combine_seeds, with_seed_errors

    def cell(users):
        r = _result(users, [0.5] * len(users))
        return {"cfb": r, "positive_popularity": r, "cfb_vs": {"positive_popularity": {"diff": 0.0, "se": 0.0}}}

    cells = [cell("abcdefghijklmnopqrs"), cell("abcdefghijklmnopqrsT")]
    mean = {k: combine_seeds([c[k] for c in cells]) for k in cells[0]}
    with_seed_errors(mean, cells, ("cfb", "positive_popularity"))
    assert mean["cfb"]["users"] == 20 and mean["cfb"]["users_per_seed"] == [19, 20]
    assert mean["positive_popularity"]["users"] == 20


def test_protocol_reports_paired_differences_through_the_pipeline(planted):
    """One seed of §4b and §5 on the planted set: each paired difference is the difference of the two
    methods' means on the same users, and the text report shows them. A cold user whose attribute
    values the questionnaire does not offer (a gender no training user has, an age far out of range)
    leaves them unanswered instead of stopping the run."""
    from cfb.evaluation.coldstart import run_protocol
    from cfb.evaluation.report import render

    odd = min(cold_users(sorted(planted.ratings.user.unique()), 42))
    users = planted.users.copy()
    users["attributes"] = [{"gender": "X", "age": 10**6} if u == odd else a for u, a in zip(users.user, users.attributes)]
    planted = Dataset(planted.ratings, planted.items, users, planted.scale, planted.name, step=planted.step)
    steps: list[str] = []
    out = run_protocol(planted, seeds=(42,), budgets=(0, 5), fold_steps=(0, 1), log=steps.append)
    assert out["per_seed"][0]["unanswerable_attributes"] == 2
    assert [m.split(":")[1].split()[0] for m in steps] == ["training", "questionnaire", "questionnaire", "fold-in"]
    assert "questionnaire of 5 items" in steps[2] and steps[3].endswith("n = 0, 1 (§5)")
    assert '"per_user":' not in json.dumps(out)  # per-user lists serve the seed mean, not the report
    assert out["mean"]["fold_in"][1]["cfb_step"] == out["per_seed"][0]["fold_in"][1]["cfb_step"]  # one seed
    assert out["mean"]["budgets"][5]["cfb"]["ndcg@10_se"] == out["per_seed"][0]["budgets"][5]["cfb"]["ndcg@10_se"]
    for block in (*out["per_seed"][0]["budgets"].values(), *out["per_seed"][0]["fold_in"].values()):
        cfb, pp = block["cfb"], block["positive_popularity"]
        assert cfb["users"] == pp["users"] >= 2
        assert block["cfb_vs"]["positive_popularity"]["diff"] == pytest.approx(cfb["ndcg@10"] - pp["ndcg@10"], abs=2e-4)
        assert cfb["ndcg@10_se"] > 0
    fold = out["per_seed"][0]["fold_in"]
    assert fold[0]["cfb_step"] is None
    # §6's average user is in the §5 table too: it knows nothing of the user, so it is the same at every n
    assert fold[0]["average_user"]["ndcg@10"] == fold[1]["average_user"]["ndcg@10"]
    assert out["per_seed"][0]["budgets"][0]["average_user"]["ndcg@10"] == \
        out["per_seed"][0]["budgets"][5]["average_user"]["ndcg@10"]
    assert fold[1]["cfb_step"]["diff"] == pytest.approx(fold[1]["cfb"]["ndcg@10"] - fold[0]["cfb"]["ndcg@10"], abs=2e-4)
    text = render(out)
    assert text.count("cfb − positive pop.") == 2 and text.count("cfb − previous n") == 1  # (one seed: no mean tables)
    assert f"{fold[1]['cfb_step']['diff']:+.4f} ±{fold[1]['cfb_step']['se']:.4f}" in text
    assert "attribute answers left unanswered over the seeds: 2" in text
    settings = json.loads(text.splitlines()[1].split("'s): ", 1)[1])  # the model's settings, as JSON
    assert settings == json.loads(json.dumps(out["settings"])) and settings["kind"] == "dot"


def test_a_report_without_budgets_leaves_their_table_out(planted):
    """`--budgets ''` skips §4b: the report has no empty §4b table, and its timings line no dangling comma."""
    from cfb.evaluation.coldstart import run_protocol
    from cfb.evaluation.report import render

    text = render(run_protocol(planted, seeds=(42,), budgets=(), fold_steps=(0, 1)))
    assert "§4b" not in text and "== fold-in curve (protocol §5), seed 42 ==" in text
    timings = next(line for line in text.splitlines() if line.startswith("timings"))
    assert "full retrain" in timings and not timings.rstrip().endswith(",")


def test_data_without_times_has_no_fold_in_curve_and_says_so(planted):
    """§5 reveals each user's first ratings in time order: without times it is not drawn (sorted by item
    id, the "first" ratings would be nobody's), and the report says why."""
    from cfb.evaluation.coldstart import run_protocol
    from cfb.evaluation.report import render

    untimed = Dataset(planted.ratings.assign(timestamp=None), planted.items, planted.users, planted.scale,
                      planted.name, step=planted.step)
    out = run_protocol(untimed, seeds=(42,), budgets=(0,), fold_steps=(0, 1))
    assert "fold_in" not in out["per_seed"][0] and out["mean"]["fold_in"] == {}
    assert out["notes"] == ["no fold-in curve (§5), for any seed: its ratings have no time (some or all)"]
    text = render(out)
    assert "fold-in curve (protocol §5)" not in text and "note: no fold-in curve (§5)" in text
    # users without gender or age: demographic popularity is popularity, and the report says why
    plain = Dataset(untimed.ratings, planted.items, None, planted.scale, planted.name, step=planted.step)
    out = run_protocol(plain, seeds=(42,), budgets=(0,), fold_steps=())
    budget = out["mean"]["budgets"][0]
    assert budget["demographic_popularity"]["ndcg@10"] == budget["popularity"]["ndcg@10"]
    assert out["notes"] == ["demographic popularity (§6) is popularity here: the data's users have no gender or age"]


def test_users_with_no_rating_after_their_first_ten_have_no_fold_in_curve_and_say_so(planted):
    """§5 scores each user's ratings after their first ten: with at most ten each there is nothing to
    score, and the report says so (it showed a curve of dashes and no word why)."""
    from cfb.evaluation.coldstart import run_protocol

    r = planted.ratings.sort_values("timestamp")
    few = Dataset(r[r.groupby("user").cumcount() < 10], planted.items, planted.users, planted.scale, planted.name,
                  step=planted.step)
    out = run_protocol(few, seeds=(42,), budgets=(0,), fold_steps=(0, 1))
    assert "fold_in" not in out["per_seed"][0]
    assert out["notes"] == ["no fold-in curve (§5), for any seed: no cold user of seed 42 has more than 10 ratings"]


@pytest.mark.parametrize("seeds", [(43, 42), (42, 43)])
def test_a_fold_in_curve_only_some_seeds_can_draw_is_drawn_for_none_and_says_which(planted, seeds):
    """Which users are cold is each seed's draw (§1): where only seed 43's cold users include one with more
    than ten ratings, the curve was drawn for seed 43 alone, and the mean over seeds crashed (KeyError)
    or dropped it with a note that was false for seed 43. It is left out for every seed, before training,
    and the note names the seed that cannot draw it."""
    from cfb.evaluation.coldstart import no_fold_in_curve, run_protocol

    r = planted.ratings.sort_values("timestamp")
    users = sorted(r.user.astype(str).unique())
    long = next(u for u in sorted(cold_users(users, 43)) if u not in cold_users(users, 42))
    few = Dataset(r[(r.groupby("user").cumcount() < 10) | (r.user.astype(str) == long)], planted.items,
                  planted.users, planted.scale, planted.name, step=planted.step)
    assert no_fold_in_curve(few.ratings, (43,)) is None
    out = run_protocol(few, seeds=seeds, budgets=(0,), fold_steps=(0, 1))
    assert all("fold_in" not in r for r in out["per_seed"]) and out["mean"]["fold_in"] == {}
    assert out["notes"] == ["no fold-in curve (§5), for any seed: no cold user of seed 42 has more than 10 ratings"]


@pytest.mark.parametrize("seeds", [(42,), (43, 42)])
def test_data_with_no_liked_test_item_for_a_seed_is_refused_before_training(planted, seeds):
    """The ranking figures score each cold user's test ratings of 4 or more: with none for a seed (data of
    1s, or of 1..3), the report was a table of dashes with no word why, or a mean that mixed the seeds
    that had some with those that had none. Refused in one line before training, naming the seed."""
    from cfb.cf_core.errors import CfbError
    from cfb.evaluation.coldstart import no_fold_in_curve, run_protocol, unrankable_seeds

    users = sorted(planted.ratings.user.astype(str).unique())
    keeper = next(u for u in sorted(cold_users(users, 43)) if u not in cold_users(users, 42))
    r = planted.ratings
    capped = r.assign(rating=np.where(r.user.astype(str) == keeper, r.rating, np.minimum(r.rating, 3.0)))
    data = Dataset(capped, planted.items, planted.users, planted.scale, planted.name, step=planted.step)
    assert unrankable_seeds(capped, (43,)) == [] and unrankable_seeds(capped, seeds) == [42]
    with pytest.raises(CfbError, match=r"^no cold user of seed 42 has a rating of 4 or more in their test set"):
        run_protocol(data, seeds=seeds, budgets=(0,), fold_steps=(0, 1))
    assert no_fold_in_curve(capped, seeds) == "no cold user of seed 42 rated an item 4 or more after their first 10"


def test_too_little_data_for_the_protocol_says_so():
    """Four users make no new user (a fifth, rounded down), nine items no new item: one line each, not a
    division by zero after training."""
    from cfb.cf_core.errors import CfbError
    from cfb.evaluation.coldstart import run_protocol
    from cfb.evaluation.item_coldstart import run_items_protocol

    from .conftest import planted_ratings

    with pytest.raises(CfbError, match=r"the data's 4 users make none \(it needs at least 5\)$"):
        run_protocol(planted_ratings(n_users=4, n_items=20), seeds=(42,))
    few_items = planted_ratings(n_users=20, n_items=8)
    few_items.items["attributes"] = [{"year": 1990 + k} for k in range(8)]  # (metadata that tells them apart)
    said = []
    with pytest.raises(CfbError, match=r"the data's 8 rated items make none \(it needs at least 10\)$"):
        run_items_protocol(few_items, seeds=(42,), log=said.append)
    assert said == []  # (refused before a seed says it trains)


def test_rankings_break_ties_by_item_id_as_a_string(trained):
    """§6's tie rule for every ranking: with every score equal, the top ten are the first ten ids in string
    order ("a10" before "a2"), not the catalogue's order."""
    import numpy as np

    from cfb.evaluation.coldstart import Catalogue, _top
    from cfb.service.state import load_served

    engine, _ = trained
    with engine.connect() as conn:
        cat = Catalogue(conn, load_served(conn))
    top = _top(np.zeros(len(cat.ext)), np.array([-1]), cat)
    assert top == sorted(cat.ext)[:10] and top != cat.ext[:10]


def test_the_average_user_is_the_mean_of_the_warm_users_embeddings(trained):
    """§6: the trained model with the mean of the warm users' embeddings and biases: for cfb's ranker,
    whose user embedding is computed from a history, the mean of their full-history vectors."""
    import numpy as np

    from cfb.cf_core.item_prior import full_history_user_vectors
    from cfb.db import versions
    from cfb.evaluation.coldstart import _average_user
    from cfb.service.state import load_served
    from cfb.service.training import load_training_data

    engine, _ = trained
    with engine.connect() as conn:
        served = load_served(conn)
        avg = _average_user(engine, conn, served)
        _, factors, bias = versions.trained_rows(conn, served.version)
    td, _ = load_training_data(engine)
    vectors = full_history_user_vectors(served.model.ranker, td.data, td.attributes)
    assert np.allclose(avg.rank_vec, vectors.mean(0), atol=1e-6) and np.allclose(avg.vec, factors.mean(0))
    assert avg.bias == pytest.approx(float(bias.mean()))


def test_a_pair_given_twice_is_one_rating_in_the_evaluation_as_in_the_database(planted):
    """A release may give a (user, item) pair twice (goodbooks v1 does; a CSV may): an ingest keeps one row,
    the one with the latest time. The evaluation counted both, so one item could be in a cold user's
    answer pool and in their test set (a sure miss, or a revealed rating scored). It counts the kept row,
    so its figures are those of the data without the earlier rows."""
    from cfb.db.ratings_io import one_row_per_pair
    from cfb.evaluation.coldstart import run_protocol
    from cfb.evaluation.item_coldstart import split_dataset

    r = planted.ratings
    first = r.groupby("user").head(2)  # each user's first two pairs again, earlier and with another value
    doubled = pd.concat([first.assign(rating=6 - first.rating, timestamp=first.timestamp - 10**6), r])
    assert one_row_per_pair(doubled).equals(r.reset_index(drop=True))
    clean, dup = (Dataset(x, planted.items, planted.users, planted.scale, planted.name, step=planted.step)
                  for x in (r, doubled))
    a, b = (run_protocol(ds, seeds=(42,), budgets=(5,), fold_steps=(0, 1)) for ds in (clean, dup))
    for section in ("budgets", "fold_in"):
        for key, block in a["mean"][section].items():
            assert {m: f.get("ndcg@10") for m, f in block.items() if isinstance(f, dict)} == \
                {m: f.get("ndcg@10") for m, f in b["mean"][section][key].items() if isinstance(f, dict)}
    cold = {str(first.item.iloc[0])}
    assert len(split_dataset(dup, cold)["cold_ratings"]) == len(split_dataset(clean, cold)["cold_ratings"])
