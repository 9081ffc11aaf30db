"""The cold-start protocol (docs/protocol.md §1–6), run through the real pipeline: a temporary SQLite database, the
same ingest, retrain, questionnaire, onboard, recommend and incremental-retrain code as the commands."""
from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from ..cf_core.errors import CfbError
from ..db import array_cache, store, versions
from ..db.engine import make_engine, sqlite_url
from ..db.schema import Item
from ..db.ratings_io import one_row_per_pair
from ..db.sources import Dataset
from ..service.incremental import retrain_incremental
from ..service.ingest import ingest_dataset
from ..service.onboard import onboard, questionnaire_json
from ..service.state import load_served, user_vector
from ..service.training import retrain_full
from ..cf_core.model import ServingConfig, UserVector
from ..cf_core.scoring import top_n
from ..cf_core.split import answer_pool_split, cold_users
from .baselines import DEMOGRAPHICS, DemographicPopularity, Popularity, PositivePopularity
from .metrics import (Tally, combine_seeds, ndcg_at_k, paired_difference, recall_at_k, with_differences,
                      with_seed_errors, without_per_user)

K = 10
FIRST_REVEALS = 10  # §5: the fold-in curve reveals up to a user's first ten ratings and scores the rest
RELEVANT = 4.0  # §4b, §5: a test rating of 4 or more is what a ranking should find
BASELINES = ("popularity", "positive_popularity", "demographic_popularity")
METHODS = ("cfb", "average_user", *BASELINES)


class UserTally(Tally):
    """A method's tally on §4b/§5 users: the user's test ratings and their ranking at once."""

    def add(self, user: str, pred: np.ndarray, truth: np.ndarray, ranked: list, relevant: set) -> None:
        self.add_rating(pred, truth)
        if relevant:
            self.add_rank(user, ndcg_at_k(ranked, relevant, K), recall_at_k(ranked, relevant, K))


@contextmanager
def _db_copy(src: Path, dst: Path):
    shutil.copy(src, dst)
    engine = make_engine(sqlite_url(dst))
    try:
        yield engine
    finally:
        engine.dispose()


class Catalogue:
    """Maps between the serving model's inner item indices and external item ids."""

    def __init__(self, conn, served):  # noqa: ANN001
        ext_of = {v: k for k, v in store.id_map(conn, Item).items()}
        self.ext = [ext_of[int(i)] for i in served.model.item_ids]
        self.inner = {e: k for k, e in enumerate(self.ext)}
        self.by_id = np.array(sorted(range(len(self.ext)), key=self.ext.__getitem__), np.int64)  # (ids as strings)

    def index(self, ext_ids) -> np.ndarray:  # noqa: ANN001
        return np.array([self.inner.get(e, -1) for e in ext_ids], dtype=np.int64)


def _top(scores: np.ndarray, exclude: np.ndarray, cat: Catalogue) -> list:
    """External ids of the top K items, ``exclude`` (inner indices, -1 ignored) left out; ties by item id
    as a string, as the protocol breaks them."""
    s = scores.astype(np.float64).copy()
    s[exclude[exclude >= 0]] = -np.inf
    return [cat.ext[i] for i in cat.by_id[top_n(s[cat.by_id], K)]]


def _score_user(tallies: dict, conn, served, cat: Catalogue, baselines: dict, avg: UserVector | None,  # noqa: ANN001
                user: str, attrs: dict, exclude_ext: list, test: pd.DataFrame, train_items: set) -> None:
    """Rank and predict for one cold user with every method (the average user when ``avg`` is
    given); the user's rated items and ``exclude_ext`` leave the ranking; ``test`` is scored
    (RMSE over items of the training catalogue ``train_items``, as §4b says)."""
    model = served.model
    vec, rated = user_vector(conn, served, store.user_id_of(conn, user))
    exclude = np.concatenate([model.item_index(rated), cat.index(exclude_ext)])
    relevant = set(test.loc[test.rating >= RELEVANT, "item"])
    test_inner = cat.index(test["item"])
    known = (test_inner >= 0) & test["item"].isin(train_items).to_numpy()
    truth = test["rating"].to_numpy(float)[known]
    tallies["cfb"].add(user, model.predict(vec, test_inner[known]), truth, _top(model.scores(vec), exclude, cat),
                       relevant)
    if avg is not None:
        tallies["average_user"].add(user, model.predict(avg, test_inner[known]), truth,
                                    _top(model.scores(avg), exclude, cat), relevant)
    for name, baseline in baselines.items():
        tallies[name].add(user, baseline.predict(test_inner[known], attrs), truth,
                          _top(baseline.scores(attrs), exclude, cat), relevant)


def run_seed(ds: Dataset, seed: int, budgets=(0, 5, 15, 30), fold_steps=(0, 1, 3, 5, 10), kind: str = "dot",
             train_params: dict | None = None, serving: dict | None = None, workdir: Path | None = None,
             progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Every figure of the protocol for one seed (§4b per budget, §5 fold-in curve); ``log`` is told
    each step as it starts."""
    own_tmp = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="cfb-eval-"))
    try:
        with array_cache.switched_off():  # (its versions are thrown away: none is worth a cache entry)
            return _run_seed(ds, seed, budgets, fold_steps, kind, train_params or {}, serving or {}, workdir,
                             progress, log or (lambda _message: None))
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_seed(ds, seed, budgets, fold_steps, kind, train_params, serving, workdir, progress, log) -> dict:  # noqa: ANN001
    ratings = _as_text(ds.ratings)  # (as an ingest stores them: a pair given twice is one rating, once in pool or test)
    users = sorted(ratings.user.unique().tolist())
    user_index = {u: k for k, u in enumerate(users)}
    check_some_users_cold(len(users))
    cold = cold_users(users, seed)
    is_cold = ratings.user.isin(cold)
    attrs_of = dict(zip(ds.users.user, ds.users.attributes)) if ds.users is not None else {}
    warm_users = ds.users[~ds.users.user.isin(cold)] if ds.users is not None else None
    timings: dict = {}

    base = workdir / f"seed{seed}.db"
    engine = make_engine(sqlite_url(base))
    t0 = time.perf_counter()
    # the training catalogue only: an item that only cold users rated is something about them (§2)
    warm_items = ds.items[ds.items.item.astype(str).isin(ratings.item[~is_cold].unique())] if ds.items is not None else None
    ingest_dataset(engine, Dataset(ratings[~is_cold], warm_items, warm_users, ds.scale, ds.name, step=ds.step))
    timings["ingest_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    log(f"seed {seed}: training on {int((~is_cold).sum()):,} ratings of {len(users) - len(cold)} warm users")
    train = retrain_full(engine, kind=kind, valid_pct=0.0, progress=progress, seed=seed,
                         serving=ServingConfig.from_json({**ServingConfig.for_kind(kind).to_json(), **serving}),
                         **train_params)
    timings["retrain_s"] = round(time.perf_counter() - t0, 3)
    with engine.connect() as conn:
        served = load_served(conn)
        avg = _average_user(engine, conn, served)  # warm users only: the same at every budget
        # what a cold user can answer: a value the questionnaire does not offer is left unanswered
        answers_of = {u: served.model.questionnaire.accepted_answers(attrs_of.get(u)) for u in cold}
    engine.dispose()
    with closing(sqlite3.connect(base)) as raw:  # fold the WAL in, so that plain file copies are whole
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # §6 baselines on the warm users' ratings
    warm = ratings[~is_cold]
    item_ids = sorted(set(warm.item))
    inner = {e: k for k, e in enumerate(item_ids)}
    w_items = warm.item.map(inner).to_numpy()
    w_users_ids = sorted(set(warm.user))
    w_users = warm.user.map({u: k for k, u in enumerate(w_users_ids)}).to_numpy()
    w_ratings = warm.rating.to_numpy(float)
    fitted = {"popularity": Popularity().fit(w_items, w_ratings, len(item_ids)),
              "positive_popularity": PositivePopularity().fit(w_items, w_ratings, len(item_ids)),
              "demographic_popularity": DemographicPopularity().fit(w_items, w_ratings, len(item_ids)).fit_groups(
                  w_users, w_items, [attrs_of.get(u, {}) for u in w_users_ids], len(item_ids))}

    cold_sorted = sorted(cold)
    by_user = {u: g.sort_values("item") for u, g in ratings[is_cold].groupby("user")}
    splits = {u: answer_pool_split(user_index[u], by_user[u]["item"].tolist(), seed) for u in cold_sorted}

    out = {"seed": seed, "n_cold": len(cold), "n_warm": len(users) - len(cold), "train": _train_summary(train),
           "unanswerable_attributes": sum(len(attrs_of.get(u) or {}) - len(answers_of[u]) for u in cold),
           "budgets": {}, "timings": timings}
    for q in budgets:
        log(f"seed {seed}: questionnaire of {q} items, {len(cold_sorted)} cold users (§4b)")
        with _db_copy(base, workdir / f"seed{seed}_q{q}.db") as eng:
            with eng.connect() as conn:
                asked = [r["item"] for r in questionnaire_json(conn, q)["items"]] if q else []
            entries, answers = [], 0
            for u in cold_sorted:
                pool = by_user[u].set_index("item").loc[splits[u][0], "rating"]
                given = {i: float(pool[i]) for i in asked if i in pool.index}
                answers += len(given)
                entries.append((f"cold user {u}", {"user": u, "answers": answers_of[u], "ratings": given,
                                                   "asked": q}))  # (the questionnaire it published: §4)
            t0 = time.perf_counter()
            onboard(eng, entries)
            onboard_ms = (time.perf_counter() - t0) * 1000 / max(len(entries), 1)
            tallies = {m: UserTally() for m in METHODS}
            t0 = time.perf_counter()
            with eng.connect() as conn:
                served = load_served(conn)
                cat = Catalogue(conn, served)
                bl = _aligned_baselines(fitted, item_ids, cat)
                for u in cold_sorted:
                    g = by_user[u].set_index("item")
                    test = g.loc[splits[u][1]].reset_index()
                    _score_user(tallies, conn, served, cat, bl, avg, u, attrs_of.get(u, {}), splits[u][0], test,
                                set(item_ids))
            out["budgets"][q] = {"answers_per_user": round(answers / len(cold_sorted), 2),
                                 "onboard_ms_per_user": round(onboard_ms, 2),
                                 "recommend_ms_per_user": round((time.perf_counter() - t0) * 1000 / len(cold_sorted), 2),
                                 **with_differences({m: t.result() for m, t in tallies.items()})}
    scored = sum(len(by_user[u]) > FIRST_REVEALS for u in cold_sorted)  # (users the curve would score)
    if fold_steps and untimed(ratings):  # (sorted by item id instead, the "first ratings" would be no one's first)
        out["fold_in_skipped"] = ("no fold-in curve (§5): it reveals each user's first ratings in time order, "
                                  "and the data's ratings have no time (some or all)")
        log(f"seed {seed}: {out['fold_in_skipped']}")
    elif fold_steps and not scored:
        out["fold_in_skipped"] = (f"no fold-in curve (§5): it scores each user's ratings after their first "
                                  f"{FIRST_REVEALS}, and no cold user has more than {FIRST_REVEALS}")
        log(f"seed {seed}: {out['fold_in_skipped']}")
    elif fold_steps:
        log(f"seed {seed}: fold-in curve n = {', '.join(map(str, sorted(fold_steps)))} (§5)")
        with _db_copy(base, workdir / f"seed{seed}_fold.db") as eng:
            out["fold_in"] = _fold_in_curve(eng, ratings[is_cold], cold_sorted, attrs_of, answers_of, fold_steps,
                                            fitted, item_ids, avg)
    return out


def untimed(ratings: pd.DataFrame) -> bool:
    """Whether some or all ratings have no time (goodbooks): §5's first ratings in time order are unknown."""
    return "timestamp" not in ratings or bool(pd.to_numeric(ratings.timestamp, errors="coerce").isna().any())


def _as_text(ratings: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item), both as text, as the protocol reads them (§1)."""
    ratings = one_row_per_pair(ratings)
    return ratings.assign(user=ratings.user.astype(str), item=ratings.item.astype(str))


def _seeds_named(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def no_fold_in_curve(ratings: pd.DataFrame, seeds=(42, 43, 44)) -> str | None:  # noqa: ANN001
    """Why the fold-in curve (§5) cannot be drawn for every one of ``seeds`` (their means would mix
    seeds), said before anything is trained; None: it can. It scores cold users with more than
    ``FIRST_REVEALS`` ratings, which each seed draws anew (§1), and ranks against those rated
    ``RELEVANT`` or more after the first ``FIRST_REVEALS`` in time order."""
    if untimed(ratings):
        return "its ratings have no time (some or all)"
    r = _as_text(ratings).sort_values(["timestamp", "item"], kind="stable")  # (the curve's order)
    counts = r.groupby("user").size()
    liked_later = set(r.user[(r.groupby("user").cumcount() >= FIRST_REVEALS) & (r.rating >= RELEVANT)])
    short, unliked = [], []
    for seed in seeds:
        cold = sorted(cold_users(list(counts.index), seed))
        if not (counts[cold] > FIRST_REVEALS).any():
            short.append(seed)
        elif not liked_later.intersection(cold):
            unliked.append(seed)
    why = ([f"no cold user of {_seeds_named(short)} has more than {FIRST_REVEALS} ratings"] if short else []) \
        + ([f"no cold user of {_seeds_named(unliked)} rated an item {RELEVANT:g} or more after their first "
            f"{FIRST_REVEALS}"] if unliked else [])
    return "; ".join(why) or None


def unrankable_seeds(ratings: pd.DataFrame, seeds=(42, 43, 44)) -> list[int]:  # noqa: ANN001
    """The ``seeds`` some of whose users are cold (§1) but none with a rating of ``RELEVANT`` or more in
    their test set (§3): §4b's ranking figures would be empty for them. Known before anything is trained."""
    r = _as_text(ratings)
    users = sorted(r.user.unique().tolist())
    index = {u: k for k, u in enumerate(users)}
    liked = r[r.rating >= RELEVANT].groupby("user").item.agg(set).to_dict()
    items = r[r.user.isin(liked)].groupby("user").item.agg(list).to_dict()
    lacking = []
    for seed in seeds:
        cold = cold_users(users, seed)
        if cold and not any(liked[u].intersection(answer_pool_split(index[u], items[u], seed)[1])
                            for u in sorted(cold) if u in liked):
            lacking.append(seed)
    return lacking


def _train_summary(train: dict) -> dict:
    keys = ("version", "kind", "n_ratings", "load_s", "fit_s", "bootstrap_s", "device")
    return {**{k: train.get(k) for k in keys}, "hyperparams": train["hyperparams"]}


def _average_user(engine, conn, served) -> UserVector:  # noqa: ANN001
    """§6 "average user": the trained model with the mean of the trained (warm) users' embeddings and
    biases: their rating-model rows, and their ranker vectors, computed from their whole histories."""
    _, factors, bias = versions.trained_rows(conn, served.version)
    rank_vecs = None
    if served.model.ranker is not None:
        from ..cf_core.item_prior import full_history_user_vectors
        from ..service.training import load_training_data

        td, _ = load_training_data(engine)
        rank_vecs = full_history_user_vectors(served.model.ranker, td.data, td.attributes)
    return served.model.average_user(factors, bias, rank_vecs)


class _Aligned:
    """A baseline re-indexed onto the serving catalogue."""

    def __init__(self, model: Popularity, item_ids: list, cat: Catalogue):
        self.model = model
        pos = {e: k for k, e in enumerate(item_ids)}
        self.map = np.array([pos.get(e, -1) for e in cat.ext], dtype=np.int64)

    def scores(self, attrs: dict) -> np.ndarray:
        s = self.model.scores(attrs)
        return np.where(self.map >= 0, s[np.maximum(self.map, 0)], -1.0)

    def predict(self, inner: np.ndarray, attrs: dict) -> np.ndarray:
        return self.model.predict(np.where(inner >= 0, self.map[np.maximum(inner, 0)], -1))


def _aligned_baselines(fitted: dict, item_ids, cat) -> dict:  # noqa: ANN001
    return {name: _Aligned(model, item_ids, cat) for name, model in fitted.items()}


def _fold_in_curve(eng, cold_ratings: pd.DataFrame, cold_sorted: list, attrs_of: dict, answers_of: dict,  # noqa: ANN001
                   steps, fitted, item_ids, avg: UserVector) -> dict:
    """§5: onboard with Q = 0, reveal the first n ratings in time order, incremental retrain after each step."""
    onboard(eng, [(f"cold user {u}", {"user": u, "answers": answers_of[u], "ratings": {}, "asked": 0})
                  for u in cold_sorted])
    timeline = {u: g.sort_values(["timestamp", "item"], kind="stable") for u, g in cold_ratings.groupby("user")}
    first10 = {u: timeline[u].iloc[:FIRST_REVEALS] for u in cold_sorted}
    evalset = {u: timeline[u].iloc[FIRST_REVEALS:] for u in cold_sorted}
    out, shown, previous = {}, 0, None
    for n in sorted(steps):
        retrain_s = None
        if n > shown:
            new = pd.concat([first10[u].iloc[shown:n] for u in cold_sorted])
            ingest_dataset(eng, Dataset(new[["user", "item", "rating", "timestamp"]]))
            t0 = time.perf_counter()
            retrain_incremental(eng)
            retrain_s = round(time.perf_counter() - t0, 4)
            shown = n
        tallies = {m: UserTally() for m in METHODS}
        with eng.connect() as conn:
            served = load_served(conn)
            cat = Catalogue(conn, served)
            bl = _aligned_baselines(fitted, item_ids, cat)
            for u in cold_sorted:
                if not evalset[u].empty:
                    _score_user(tallies, conn, served, cat, bl, avg, u, attrs_of.get(u, {}),
                                first10[u]["item"].tolist(), evalset[u], set(item_ids))
        results = with_differences({m: t.result() for m, t in tallies.items()})
        # the same users at every step: the step's gain over the previous n, paired
        results["cfb_step"] = None if previous is None else paired_difference(results["cfb"], previous)
        out[n] = {"retrain_s": retrain_s, **results}
        previous = results["cfb"]
    return out


def mean_over_seeds(results: list[dict]) -> dict:
    """Every figure averaged over seeds (same structure as one seed's ``budgets`` and ``fold_in``),
    with standard errors over the seeds' users (``metrics.with_seed_errors``; the results must still
    hold their ``per_user`` lists)."""
    mean = {section: {key: combine_seeds([r.get(section, {}).get(key) for r in results])
                      for key in results[0].get(section, {})}
            for section in ("budgets", "fold_in")}
    for q in mean["budgets"]:
        with_seed_errors(mean["budgets"][q], [r["budgets"][q] for r in results], METHODS)
    steps = list(mean["fold_in"])
    for k, n in enumerate(steps):
        with_seed_errors(mean["fold_in"][n], [r["fold_in"][n] for r in results], METHODS,
                         None if k == 0 else [r["fold_in"][steps[k - 1]] for r in results])
    return mean


def has_demographics(ds: Dataset) -> bool:
    """Whether any user has one of the attributes demographic popularity groups by (gender, age)."""
    return ds.users is not None and any(
        isinstance(a, dict) and any(a.get(k) is not None for k in DEMOGRAPHICS) for a in ds.users.attributes)


def check_some_users_cold(n_users: int) -> None:
    """§1 makes a fifth of the users new: fewer than 5 users make none."""
    if n_users // 5 == 0:
        raise CfbError(f"the protocol makes a fifth of the users new (§1): the data's {n_users} users make "
                       "none (it needs at least 5)")


def run_protocol(ds: Dataset, seeds=(42, 43, 44), budgets=(0, 5, 15, 30), fold_steps=(0, 1, 3, 5, 10),
                 kind: str = "dot", train_params: dict | None = None, serving: dict | None = None,
                 progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The protocol for every seed, with the mean over seeds; ``log`` is told each step as it starts."""
    check_some_users_cold(ds.ratings.user.astype(str).nunique())  # (before any note on the cold users' data)
    lacking = unrankable_seeds(ds.ratings, seeds) if budgets else []
    if lacking:  # (a mean over the others would mix seeds)
        raise CfbError(f"no cold user of {_seeds_named(lacking)} has a rating of {RELEVANT:g} or more in their test "
                       f"set (§3): the protocol ranks against those, so its NDCG and recall would be empty (the "
                       f"data's ratings go from {ds.ratings.rating.min():g} to {ds.ratings.rating.max():g})")
    why = no_fold_in_curve(ds.ratings, seeds) if fold_steps else None
    notes = [f"no fold-in curve (§5), for any seed: {why}"] if why else []
    if why and log:
        log(notes[0])
    per_seed = []
    for seed in seeds:
        per_seed.append(run_seed(ds, seed, budgets, () if why else fold_steps, kind, train_params, serving,
                                 progress=progress, log=log))
    settings = {"kind": kind, **per_seed[0]["train"]["hyperparams"]}
    if not has_demographics(ds):
        notes.append("demographic popularity (§6) is popularity here: the data's users have no gender or age")
    return {"dataset": ds.name, "seeds": list(seeds), "settings": settings, "notes": notes,
            "per_seed": without_per_user(per_seed), "mean": mean_over_seeds(per_seed)}
