"""Item cold start (docs/protocol.md §8, "new items"), in memory: no database.

For each seed: a tenth of the items (ids as strings, sorted as strings) are cold; cfb trains a version
(``cf_core.fit.fit_model``: rating model, bootstrap, ranker) on every rating of the warm items,
fits an ``ItemPrior`` on the warm items' metadata, and adds the cold items through
``TrainedModel.add_items`` with the prior's rows. Every user with at least one rating >= 4 of a cold
item ranks all cold items (nothing removed) by the version's own scores; NDCG@10 / Recall@10 against
the cold items that user rated >= 4, RMSE over every rating of a cold item. The §8 baselines
(genre popularity, user-genre affinity) and a random order are scored on the same split.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd

from ..cf_core.errors import CfbError
from ..db.ratings_io import one_row_per_pair
from ..db.sources import Dataset
from .metrics import Tally, combine_seeds, with_differences, with_seed_errors, without_per_user
from .report import dataset_line, with_se

K = 10
METHODS = ("cfb", "user_genre_affinity", "genre_popularity", "random")
METHOD_NAMES = {"cfb": "cfb (item prior)", "user_genre_affinity": "user-genre affinity",
                "genre_popularity": "genre popularity", "random": "random order"}
DAMPING = 10.0


# ------------------------------------------------------------------------------------------- split
def check_some_items_cold(n_items: int) -> None:
    """§8 needs a tenth of ``n_items`` rated items to make at least one new item."""
    if n_items // 10 == 0:
        raise CfbError(f"§8 makes a tenth of the rated items new: the data's {n_items} rated items make none "
                       "(it needs at least 10)")


def cold_items(items: list[str], seed: int) -> set[str]:
    """§8: a tenth of the items (ids as strings, sorted as strings), chosen by ``default_rng(seed)``."""
    items = sorted(str(i) for i in items)
    rng = np.random.default_rng(seed)
    return set(rng.choice(items, size=len(items) // 10, replace=False).tolist())


# --------------------------------------------------------------------------------------- baselines
def _genres(attrs: dict | None, key: str) -> list:
    g = (attrs or {}).get(key) or []
    return list(g) if isinstance(g, (list, tuple)) else [g]


class GenrePopularity:
    """§8 genre popularity. Score of a cold item: the mean over its genres of the mean number of
    training ratings per warm item of that genre (0 with no known genre). Predicted rating: the damped
    mean (sum + 10·global_mean) / (count + 10) of the training ratings of warm items sharing any of its
    genres (the global mean when none does)."""

    def __init__(self, genre_key: str = "genres", damping: float = DAMPING):
        self.genre_key, self.damping = genre_key, damping

    def fit(self, warm_attrs: list[dict], counts: np.ndarray, sums: np.ndarray) -> "GenrePopularity":
        """``warm_attrs[j]``, ``counts[j]``, ``sums[j]``: warm item j's metadata and its training ratings'
        number and sum (the "sharing any genre" totals are built per item, each item counted once)."""
        counts, sums = np.asarray(counts, float), np.asarray(sums, float)
        self.global_mean_ = float(sums.sum() / max(counts.sum(), 1))
        self.item_genres_ = [set(_genres(a, self.genre_key)) for a in warm_attrs]
        per = {}
        for g_set, c in zip(self.item_genres_, counts):
            for g in g_set:
                per.setdefault(g, []).append(c)
        self.genre_pop_ = {g: float(np.mean(v)) for g, v in per.items()}
        self.counts_, self.sums_ = counts, sums
        return self

    def score(self, attrs: dict) -> float:
        gs = [g for g in dict.fromkeys(_genres(attrs, self.genre_key))]
        return float(np.mean([self.genre_pop_.get(g, 0.0) for g in gs])) if gs else 0.0

    def predict(self, attrs: dict) -> float:
        gs = set(_genres(attrs, self.genre_key))
        share = np.array([bool(gs & g) for g in self.item_genres_], bool)
        c, s = self.counts_[share].sum(), self.sums_[share].sum()
        return float((s + self.damping * self.global_mean_) / (c + self.damping))


class UserGenreAffinity:
    """§8 user-genre affinity. score(u, i) = Σ over i's genres g of u's training ratings >= 4 on warm
    items of genre g, / u's number of training ratings; ties broken by genre popularity; items still
    tied are scored at their expected value under a random order (``expected_metrics`` does that).
    Predicted rating: genre popularity's prediction plus u's damped mean offset from genre
    popularity's predictions of u's training ratings, shrunk with 10 pseudo-ratings."""

    def __init__(self, pop: GenrePopularity, threshold: float = 4.0, damping: float = DAMPING):
        self.pop, self.threshold, self.damping = pop, threshold, damping

    def fit(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int) -> "UserGenreAffinity":
        """Training ratings as (inner user, warm item index into ``pop``'s items, rating)."""
        users, items, ratings = np.asarray(users), np.asarray(items), np.asarray(ratings, float)
        vocab = sorted({g for s in self.pop.item_genres_ for g in s}, key=str)
        self.vocab_ = {g: k for k, g in enumerate(vocab)}
        G = np.zeros((len(self.pop.item_genres_), len(vocab)))
        for j, s in enumerate(self.pop.item_genres_):
            for g in s:
                G[j, self.vocab_[g]] = 1.0
        self.n_ratings_ = np.bincount(users, minlength=n_users).astype(float)
        pos = ratings >= self.threshold
        self.pos_genre_ = np.zeros((n_users, len(vocab)))
        np.add.at(self.pos_genre_, users[pos], G[items[pos]])
        pred = np.array([self.pop.predict({self.pop.genre_key: list(s)}) for s in self.pop.item_genres_])
        resid = np.bincount(users, weights=ratings - pred[items], minlength=n_users)
        self.offset_ = resid / (self.n_ratings_ + self.damping)
        return self

    def scores(self, u: int, attrs_list: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(affinity, genre popularity) of user ``u`` for each item: rank by the first, ties by the second."""
        aff = np.zeros(len(attrs_list))
        for k, a in enumerate(attrs_list):
            cols = [self.vocab_[g] for g in dict.fromkeys(_genres(a, self.pop.genre_key)) if g in self.vocab_]
            aff[k] = self.pos_genre_[u, cols].sum() / max(self.n_ratings_[u], 1.0)
        return aff, np.array([self.pop.score(a) for a in attrs_list])

    def predict(self, u: int, attrs: dict) -> float:
        return self.pop.predict(attrs) + float(self.offset_[u])


# ------------------------------------------------------------------------------------------ metrics
def expected_metrics(keys: list[np.ndarray], relevant: np.ndarray, k: int = K) -> tuple[float, float]:
    """NDCG@k and Recall@k of a ranking by ``keys`` (lexicographic, the first most significant,
    higher first) where items still tied sit in a random order: the expected value over that order
    (exact: every tied block's positions are shared evenly by its items). ``relevant``: bool per item."""
    relevant = np.asarray(relevant, bool)
    n_rel = int(relevant.sum())
    if n_rel == 0:
        return 0.0, 0.0
    order = np.lexsort(tuple(-np.asarray(x, float) for x in reversed(keys)))
    stacked = np.stack([np.asarray(x, float)[order] for x in keys], axis=1)
    new_block = np.r_[True, np.any(stacked[1:] != stacked[:-1], axis=1)]
    block = np.cumsum(new_block) - 1
    disc = np.where(np.arange(len(order)) < k, 1.0 / np.log2(np.arange(len(order)) + 2), 0.0)
    inside = (np.arange(len(order)) < k).astype(float)
    n_block = np.bincount(block)
    per_disc = np.bincount(block, weights=disc) / n_block  # expected discount of an item in the block
    per_in = np.bincount(block, weights=inside) / n_block
    rel_sorted = relevant[order]
    dcg = float(np.sum(per_disc[block][rel_sorted]))
    hits = float(np.sum(per_in[block][rel_sorted]))
    m = min(k, n_rel)
    ideal = float(np.sum(1.0 / np.log2(np.arange(m) + 2)))
    return dcg / ideal, hits / m


def split_dataset(ds: Dataset, cold: set[str]) -> dict:
    """Warm training data in memory (``TrainingData`` with database ids = positions in the sorted
    string ids of all users / items) and the cold items' ratings and metadata."""
    from ..cf_core.data import CollabData, index_ids
    from ..cf_core.fit import TrainingData

    r = one_row_per_pair(ds.ratings)  # (as an ingest stores them: a pair given twice is one rating)
    r = r.assign(user=r.user.astype(str), item=r.item.astype(str))
    all_users = sorted(r.user.unique().tolist())
    all_items = sorted(r.item.unique().tolist())
    uid = {u: k for k, u in enumerate(all_users)}
    iid = {i: k for k, i in enumerate(all_items)}
    is_cold = r.item.isin(cold).to_numpy()
    warm = r[~is_cold]
    user_ids, u = index_ids(warm.user.map(uid).to_numpy(np.int64))
    item_ids, i = index_ids(warm.item.map(iid).to_numpy(np.int64))
    user_attrs = dict(zip(ds.users.user.astype(str), ds.users.attributes)) if ds.users is not None else {}
    item_attrs = dict(zip(ds.items.item.astype(str), ds.items.attributes)) if ds.items is not None else {}
    ts = warm.timestamp.to_numpy() if "timestamp" in warm else None
    ts = np.where(pd.isna(ts), -1, ts).astype(np.float64) if ts is not None else np.full(len(warm), -1.0)
    warm_attrs = [item_attrs.get(all_items[x]) or {} for x in item_ids]
    td = TrainingData(CollabData(u, i, warm.rating.to_numpy(np.float32), len(user_ids), len(item_ids)),
                      user_ids, item_ids, ts, [user_attrs.get(all_users[x]) or {} for x in user_ids],
                      tuple(ds.scale), len(warm), warm_attrs)
    cold_sorted = sorted(cold)
    cr = r[is_cold]
    return {"td": td, "all_users": all_users, "all_items": all_items, "uid": uid, "iid": iid,
            "warm_attrs": warm_attrs,
            "cold_items": cold_sorted, "cold_db": np.array([iid[c] for c in cold_sorted], np.int64),
            "cold_attrs": [item_attrs.get(c) or {} for c in cold_sorted],
            "cold_ratings": cr, "user_attrs": user_attrs}


# ------------------------------------------------------------------------------------------ cfb side
def full_history_vectors(model, td) -> np.ndarray:  # noqa: ANN001
    """The ranker's user vector of every trained user from their full history (Reveal(budget=None))."""
    from ..cf_core.item_prior import full_history_user_vectors

    return full_history_user_vectors(model.ranker, td.data, td.attributes)


def with_cold_items(model, cold_db: np.ndarray, cold_attrs: list[dict]):  # noqa: ANN001
    """The version with the cold items added from their metadata alone, the way cfb adds any new
    item (``TrainedModel.metadata_rows`` then ``add_items``)."""
    rows, ranker_rows = model.metadata_rows(cold_attrs)
    return model.add_items(cold_db, rows, ranker_rows)


# ------------------------------------------------------------------------------------------ one seed
def evaluate_split(sp: dict, model, rank_vecs: np.ndarray | None) -> dict:  # noqa: ANN001
    """Score cfb (a model with the cold items added), the baselines and a random order on one split."""
    from ..cf_core.model import UserVector

    td = sp["td"]
    cold_db, cold_attrs = sp["cold_db"], sp["cold_attrs"]
    n_cold = len(cold_db)
    cold_inner = model.item_index(cold_db)
    col = {c: k for k, c in enumerate(sp["cold_items"])}
    cr = sp["cold_ratings"]
    cr_user = cr.user.map(sp["uid"]).to_numpy(np.int64)
    cr_item = cr.item.map(col).to_numpy(np.int64)
    cr_rating = cr.rating.to_numpy(float)

    counts, sums = td.data.item_totals()
    pop = GenrePopularity().fit(sp["warm_attrs"], counts, sums)
    aff = UserGenreAffinity(pop).fit(td.data.users, td.data.items, td.data.ratings, td.data.n_users)
    pop_score = np.array([pop.score(a) for a in cold_attrs])
    pop_pred = np.array([pop.predict(a) for a in cold_attrs])
    gmean = float(td.data.ratings.mean())

    order = np.argsort(td.data.users, kind="stable")  # each trained user's training ratings, for their metadata affinity
    bounds = np.searchsorted(td.data.users[order], np.arange(td.data.n_users + 1))
    tallies = {m: Tally() for m in METHODS}
    for db_u in sorted(set(cr_user.tolist())):
        rows = cr_user == db_u
        items_u, truth = cr_item[rows], cr_rating[rows]
        relevant = np.zeros(n_cold, bool)
        relevant[items_u[truth >= 4]] = True
        pos = int(np.searchsorted(td.user_ids, db_u))
        trained = pos < len(td.user_ids) and td.user_ids[pos] == db_u
        # cfb: the version's own scores (ranker + rating_weight × predicted rating)
        if trained:
            mine = order[bounds[pos]:bounds[pos + 1]]
            vec, bias = model.user_factors[pos], float(model.user_bias[pos])
            uv = UserVector(vec, bias, None if rank_vecs is None else rank_vecs[pos], n_ratings=len(mine),
                            meta_affinity=model.metadata_affinity(td.data.items[mine], td.data.ratings[mine], vec, bias))
        else:  # a user with cold-item ratings only: what the version knows of a stranger
            uv = model.average_user(model.user_factors, model.user_bias)
        s = model.scores(uv)[cold_inner]
        pred = model.predict(uv, cold_inner)
        tallies["cfb"].add_rating(pred[items_u], truth)
        # baselines
        tallies["genre_popularity"].add_rating(pop_pred[items_u], truth)
        tallies["random"].add_rating(np.full(len(truth), gmean), truth)
        if trained:
            a_s, a_t = aff.scores(pos, cold_attrs)
            a_pred = pop_pred + aff.offset_[pos]
        else:
            a_s, a_t, a_pred = np.zeros(n_cold), pop_score, pop_pred
        tallies["user_genre_affinity"].add_rating(a_pred[items_u], truth)
        if relevant.any():  # items with the same metadata score alike: tied, in a random order as for the baselines
            tallies["cfb"].add_rank(db_u, *expected_metrics([s], relevant))
            tallies["user_genre_affinity"].add_rank(db_u, *expected_metrics([a_s, a_t], relevant))
            tallies["genre_popularity"].add_rank(db_u, *expected_metrics([pop_score], relevant))
            tallies["random"].add_rank(db_u, *expected_metrics([np.zeros(n_cold)], relevant))
    return with_differences({m: t.result() for m, t in tallies.items()})


def run_seed(ds: Dataset, seed: int, kind: str = "dot", params: dict | None = None, prior_config=None,  # noqa: ANN001
             attributes: tuple[str, ...] | None = ("genres", "year"), progress: bool = False,
             fitted=None, cold: set[str] | None = None) -> dict:  # noqa: ANN001
    """§8 for one seed. ``fitted``: a version already trained on this split's warm items (reused by
    tuning); ``cold``: the cold items (default: §8's split for ``seed``; tuning passes pseudo-cold items)."""
    from ..cf_core.item_prior import ItemPrior, ItemPriorConfig
    from ..cf_core.fit import encoded_metadata, fit_model

    items = sorted(ds.ratings.item.astype(str).unique().tolist())
    cold = cold_items(items, seed) if cold is None else cold
    if not cold:
        check_some_items_cold(len(items))
        raise CfbError("§8: no new items to score")  # (a tuning split of none)
    sp = split_dataset(ds, cold)
    timings = {}
    t0 = time.perf_counter()
    if fitted is not None:
        model = fitted
    else:  # the product's full retrain: rating model, ranker, and the item prior from the warm items' metadata
        model, report = fit_model(sp["td"], kind, params, seed, progress=progress)
        timings["item_prior_s"] = report.get("item_prior_s")
    timings["retrain_s"] = round(time.perf_counter() - t0, 2)
    rank_vecs = full_history_vectors(model, sp["td"]) if model.ranker is not None else None
    if prior_config is not None or model.item_prior is None:  # tuning: another prior on the same version
        t0 = time.perf_counter()
        prior = ItemPrior(prior_config or ItemPriorConfig(), attributes=attributes, seed=seed).fit_version(
            model, sp["td"], sp["warm_attrs"], rank_vecs)
        # a copy with this prior (the version ``fitted`` passed in is reused by every candidate: left as it was)
        model = replace(model, item_prior=prior,
                        item_meta=encoded_metadata(prior, sp["td"].item_attributes))  # (for the metadata affinity)
        timings["item_prior_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    grown = with_cold_items(model, sp["cold_db"], sp["cold_attrs"])
    timings["add_items_s"] = round(time.perf_counter() - t0, 4)
    res = evaluate_split(sp, grown, rank_vecs)
    return {"seed": seed, "n_cold_items": len(sp["cold_items"]), "n_warm_items": len(sp["td"].item_ids),
            "has_genres": any(_genres(a, "genres") for a in sp["warm_attrs"]),
            "n_cold_ratings": len(sp["cold_ratings"]), "timings": timings, "settings": dict(model.settings),
            "prior": {"attributes": [spec["name"] for spec in model.item_prior.encoder_.spec],  # what it really used
                      **model.item_prior.config.to_json()},
            "prior_l2": getattr(model.item_prior, "l2_", None),  # the rating part's penalty its held-out items chose
            **res}


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """Every method's figures (and cfb's paired differences) averaged over seeds, with standard errors
    over the seeds' users (the results must still hold their ``per_user`` lists)."""
    mean = {key: combine_seeds([r.get(key) for r in per_seed]) for key in (*METHODS, "cfb_vs")}
    with_seed_errors(mean, per_seed, METHODS)
    return mean


def run_items_protocol(ds: Dataset, seeds=(42, 43, 44), kind: str = "dot", params: dict | None = None,  # noqa: ANN001
                       prior_config=None, attributes: tuple[str, ...] | None = ("genres", "year"),
                       progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """§8 for every seed, with the mean over seeds. ``attributes``: the item metadata a prior fitted
    here uses (tuning; the product's retrain chooses its own, which the report names). ``log`` is told
    each seed as it starts."""
    check_metadata_tells_items_apart(ds)
    check_some_items_cold(ds.ratings.item.astype(str).nunique())  # (before a seed says it trains)
    per_seed = []
    for k, s in enumerate(seeds):
        if log is not None:
            log(f"seed {s} ({k + 1} of {len(seeds)}): training on the warm items, then scoring the new ones (§8)")
        per_seed.append(run_seed(ds, s, kind, params, prior_config, attributes, progress))
        if not per_seed[-1]["cfb"]["users"]:
            raise CfbError(f"seed {s}: no user liked a new item (rated it in the top quarter of the scale), so §8 "
                           "has no ranking to score: the data needs more users rating the items")
    notes = [] if per_seed[0]["has_genres"] else [
        "this data has no genres: genre popularity and user-genre affinity rank new items as the random order "
        "does; genre popularity predicts the global mean rating, user-genre affinity that plus the user's "
        "damped offset from it"]
    return {"dataset": ds.name, "seeds": list(seeds), "kind": kind, "settings": {"kind": kind, **per_seed[0]["settings"]},
            "attributes": per_seed[0]["prior"]["attributes"],
            "prior": per_seed[0]["prior"], "notes": notes, "per_seed": without_per_user(per_seed),
            "mean": mean_over_seeds(per_seed)}


CHUNK_ITEMS = 4096  # items whose metadata is encoded (densely) at a time


def check_metadata_tells_items_apart(ds: Dataset) -> None:
    """§8 starts new items from their metadata: refused, before any training, for data whose items hold
    none that the item prior would use (every new item would start from the same row: a random order)."""
    from ..cf_core.item_prior import ItemPriorConfig, MetaEncoder
    from ..cf_core.fit import metadata_names

    rated = set(ds.ratings.item.astype(str))
    attrs = [] if ds.items is None else [a or {} for i, a in zip(ds.items.item.astype(str), ds.items.attributes)
                                         if i in rated]
    config = ItemPriorConfig()
    encoder = MetaEncoder.fit(attrs, metadata_names(attrs), config.min_count, config.max_vocab, config.n_bins)
    first = encoder.encode(attrs[:1])
    for start in range(0, len(attrs), CHUNK_ITEMS):  # (a chunk at a time, as ``encoded_metadata``: dense rows)
        if (encoder.encode(attrs[start:start + CHUNK_ITEMS]) != first).any():
            return
    raise CfbError("§8 starts new items from their metadata (genres, authors, tags, a year, ...), and this data's "
                   "rated items hold none that tells them apart: every new item would start alike, a random "
                   "order (the folder's item file gives it: genres and a year in the titles of movies.dat or "
                   "movies.csv, tags.csv, or authors, years and tags beside goodbooks' books.csv)")


def table(block: dict) -> list[str]:
    """Rows: methods; NDCG@10 ± its standard error over users, cfb's paired difference from the
    method ± its standard error, Recall@10, RMSE, users."""
    head = f"{'method':<24}| NDCG@10 ± SE    | cfb − method ± SE | Rec@10 | RMSE   | users"
    lines = [head, "-" * len(head)]
    f = lambda v: "   -   " if v is None else f"{v:.4f} "  # noqa: E731
    for m in METHODS:
        r, d = block[m], (block.get("cfb_vs") or {}).get(m) or {}
        ndcg, diff = with_se(r["ndcg@10"], r.get("ndcg@10_se")), with_se(d.get("diff"), d.get("se"), signed=True)
        lines.append(f"{METHOD_NAMES[m]:<24}| {ndcg:<16}| {'' if m == 'cfb' else diff:<18}| {f(r['recall@10'])}| "
                     f"{f(r['rmse'])}| {r['users']}")
    return lines


def render(result: dict) -> str:
    """The §8 report as text: settings, the first seed's table and (with more than one seed) the mean's."""
    first, used = result["per_seed"][0], ", ".join(result["attributes"]) or "none (a constant row only)"
    lines = [f"{dataset_line(result)}  item metadata: {used}",
             f"model (each seed's trains with that seed; seed {first['seed']}'s): {json.dumps(result['settings'])}",
             f"item prior: {json.dumps(result['prior'])}",
             "cold items: " + "; ".join(f"seed {r['seed']}: {r['n_cold_items']} (of "
                                        f"{r['n_cold_items'] + r['n_warm_items']}), cold ratings: {r['n_cold_ratings']}"
                                        + ("" if r.get("prior_l2") is None else
                                           f", the prior's rating penalty chosen: {r['prior_l2']:g}")
                                        for r in result["per_seed"]), ""]
    lines += [f"== new items (protocol §8), seed {first['seed']} =="] + table(first) + [""]
    if len(result["per_seed"]) > 1:  # (one seed's mean is that seed: its table once)
        lines += ["== new items (protocol §8), mean over seeds =="] + table(result["mean"]) + [""]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    lines.append("timings (s): " + "; ".join(f"seed {r['seed']}: " + ", ".join(f"{k} {v}" for k, v in r["timings"].items())
                                           for r in result["per_seed"]))
    return "\n".join(lines)

