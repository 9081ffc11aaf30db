"""Choose a new item's fold-in shrinkage (``item_foldin_reg``, ``item_foldin_reg_bias``) on pseudo-cold items.

The pseudo-cold items of ``tune_item_coldstart.py`` (never the protocol's cold items): a version trained
without them; each pseudo-cold item then gets its first k ratings in time order (k = 1, 3, 10; items
with more than k ratings), is solved against those raters' trained rows from its metadata row, exactly
as an incremental retrain does (``DotRating.fold_in`` with users and items swapped), and is scored by
RMSE on its other ratings. ``eb`` is the empirical-Bayes rule: the rating model's training MSE over
the variance of the trained items' biases (bias) / of their factors per dimension (embedding).

Measured (ml-100k, seeds 42-44, RMSE at k = 1 / 3 / 10): (20, 1) before 1.0011 / 0.9615 / 0.9402;
(20, 5) 0.9668 / 0.9442 / 0.9300; (10, 10) 0.9681 / 0.9453 / 0.9254; (10, 5) adopted 0.9661 / 0.9426 /
0.9271; (10, 3) 0.9685 / 0.9443 / 0.9300; empirical Bayes (about 43, 70) 0.9786 / 0.9647 / 0.9406 with
reg 20 on the embedding: the trained biases are shrunk by weight decay, so their spread understates
how far an item's bias may go.

With ``--rank``: the same items and reveals choose ``ranker_item_foldin_scale``, how a new item's ranker
row follows its ratings (``TrainedModel.ranker_rows_following``: its metadata row moved by what the
ratings move its rating row, solved with this many times the fold-in's shrinkage, through the
least-squares map from the learned items' rating rows to their ranker rows). Scored like §8: every
trained user with a rating >= 4 of a pseudo-cold item that is not among that item's first k ranks the
pseudo-cold items (the ones they revealed left out) by the version's scores; NDCG@10 at k = 0 / 1 / 3 / 10.
Measured (ml-100k, seeds 42-44): the ranker row kept (before) 0.349 / 0.350 / 0.350 / 0.350; scale 1
0.349 / 0.348 / 0.388 / 0.458; 2 0.349 / 0.374 / 0.413 / 0.464; 3 (adopted) 0.349 / 0.379 / 0.419 /
0.467; 5 0.349 / 0.377 / 0.417 / 0.466; 10 0.349 / 0.370 / 0.400 / 0.450.

Usage: PYTHONPATH=bench python bench/tune_item_foldin.py [--data ../shared/data/ml-100k] [--seeds 42,43,44] [--cache DIR] [--rank]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from cfb.cf_core.rating import DotRating, FoldInConfig, _RatingModel
from cfb.db.sources import read_movielens
from cfb.cf_core.model import UserVector
from cfb.evaluation.item_coldstart import expected_metrics, full_history_vectors, split_dataset, with_cold_items

from tune_item_coldstart import fitted_version, pseudo_cold_arguments, pseudo_split

KS = (1, 3, 10)


def empirical_bayes_item_shrinkage(rating: _RatingModel, user_factors: np.ndarray, user_bias: np.ndarray,
                                   users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                                   sample: int = 200_000, seed: int = 0) -> FoldInConfig:
    """A new item's fold-in shrinkage from what the full retrain learned (empirical Bayes): the
    ratings' noise (training MSE, on up to ``sample`` ratings) over the spread of the trained items'
    rows (variance of the biases; mean variance per dimension of the factors), so that an item solved
    from its first ratings moves as far from its prior as trained items with that evidence do."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ratings), min(sample, len(ratings)), replace=False) if len(ratings) > sample else slice(None)
    u, i = np.asarray(users)[pick], np.asarray(items)[pick]
    pred = rating.predict_pairs(user_factors[u], user_bias[u], i)
    mse = float(np.mean((np.asarray(ratings, np.float64)[pick] - pred) ** 2))
    var_f = float(np.var(rating.item_factors, axis=0).mean())
    var_b = float(np.var(rating.item_bias))
    default = FoldInConfig()
    return FoldInConfig(mse / var_f if var_f > 0 else default.reg, mse / var_b if var_b > 0 else default.reg_bias)



def shrinkage(model, td) -> FoldInConfig:  # noqa: ANN001
    d = td.data
    return empirical_bayes_item_shrinkage(model.rating, model.user_factors, model.user_bias, d.users, d.items, d.ratings)


def score(model, split: dict, reg: float | str, reg_bias: float | str) -> dict[int, tuple[float, int]]:  # noqa: ANN001
    """{k: (sum of squared errors, count)} over the pseudo-cold items."""
    td = split["td"]
    if "eb" in (reg, reg_bias):
        eb = shrinkage(model, td)
        reg, reg_bias = (eb.reg if reg == "eb" else reg), (eb.reg_bias if reg_bias == "eb" else reg_bias)
    rows, _ = model.metadata_rows(split["cold_attrs"])
    r = split["cold_ratings"].sort_values(["timestamp"], kind="stable")
    pos = {u: k for k, u in enumerate(td.user_ids.tolist())}
    out = {k: [0.0, 0] for k in KS}
    for n, item in enumerate(split["cold_items"]):
        ir = r[r.item == item]
        users = np.array([pos.get(split["uid"][u], -1) for u in ir.user])
        ratings = ir.rating.to_numpy(np.float64)[users >= 0]
        users = users[users >= 0]
        raters = DotRating(model.rating.y_range, model.user_factors[users], model.user_bias[users])
        for k in KS:
            if len(users) <= k:
                continue
            vec, bias = raters.fold_in(np.arange(k), ratings[:k], rows["item_factors"][n], float(rows["item_bias"][n]),
                                       FoldInConfig(float(reg), float(reg_bias)))
            rest = np.arange(k, len(users))
            pred = np.clip(raters.predict_pairs(np.broadcast_to(vec, (len(rest), len(vec))),
                                                np.full(len(rest), bias), rest), *td.scale)
            out[k][0] += float(((pred - ratings[k:]) ** 2).sum())
            out[k][1] += len(rest)
    return out


RANK_KS = (0, 1, 3, 10)


def first_ratings(model, split: dict) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    """Each pseudo-cold item's ratings by trained users (inner user, rating), in time order."""
    td = split["td"]
    r = split["cold_ratings"].sort_values(["timestamp"], kind="stable")
    pos = {u: k for k, u in enumerate(td.user_ids.tolist())}
    out = []
    for item in split["cold_items"]:
        ir = r[r.item == item]
        users = np.array([pos.get(split["uid"][u], -1) for u in ir.user], np.int64)
        out.append((users[users >= 0], ir.rating.to_numpy(np.float64)[users >= 0]))
    return out


def rank_score(model, split: dict, scales: list[float | None]) -> dict:  # noqa: ANN001
    """{scale: {k: [NDCG@10 of each scored user]}}; scale None: the ranker row stays its metadata row."""
    td = split["td"]
    grown = with_cold_items(model, split["cold_db"], split["cold_attrs"])
    cold = grown.item_index(split["cold_db"])
    prior, prior_ranker = model.metadata_rows(split["cold_attrs"])
    rank_vecs = full_history_vectors(model, td)
    n_ratings = np.bincount(td.data.users, minlength=td.data.n_users)
    raters = DotRating(model.rating.y_range, model.user_factors, model.user_bias)
    by_item = first_ratings(model, split)
    threshold = model.ranker.threshold_
    out = {s: {k: [] for k in RANK_KS} for s in scales}
    for k in RANK_KS:
        shown = [(u[:k], r[:k]) if len(u) > k else (u[:0], r[:0]) for u, r in by_item]
        rows = {n: prior[n].copy() for n in ("item_factors", "item_bias")}
        for j, (u, r) in enumerate(shown):
            if len(u):
                rows["item_factors"][j], rows["item_bias"][j] = raters.fold_in(
                    u, r, prior["item_factors"][j], float(prior["item_bias"][j]), model.config.item_foldin(model.scale_width))
        held = {}  # user -> (relevant pseudo-cold items, the ones they revealed)
        for j, (u, r) in enumerate(by_item):
            for at, (user, rating) in enumerate(zip(u.tolist(), r.tolist())):
                rel, mine = held.setdefault(user, (set(), set()))
                (mine if at < len(shown[j][0]) else rel if rating >= threshold else set()).add(j)
        for scale in scales:
            ranker_rows = prior_ranker
            if scale is not None:
                m = replace(model, config=replace(model.config, ranker_item_foldin_scale=scale))
                moved = {n: prior[n].copy() for n in ("item_factors", "item_bias")}
                for j, (u, r) in enumerate(shown):
                    if len(u):
                        moved["item_factors"][j], moved["item_bias"][j] = raters.fold_in(
                            u, r, prior["item_factors"][j], float(prior["item_bias"][j]),
                            m.config.ranker_item_foldin(m.scale_width))
                ranker_rows = m.ranker_rows_following(prior, moved, prior_ranker)
            version = grown.with_item_rows(cold, rows, ranker_rows)
            for user, (rel, mine) in sorted(held.items()):
                rel = rel - mine
                if not rel:
                    continue
                uv = UserVector(model.user_factors[user], float(model.user_bias[user]), rank_vecs[user],
                                n_ratings=int(n_ratings[user]))
                scores = version.scores(uv)[cold].astype(np.float64)
                relevant = np.zeros(len(cold), bool)
                relevant[list(rel)] = True
                scores[list(mine)] = -np.inf
                out[scale][k].append(expected_metrics([scores], relevant)[0])
    return out


def main() -> None:
    ap = pseudo_cold_arguments(argparse.ArgumentParser())
    ap.add_argument("--rank", action="store_true", help="choose ranker_item_foldin_scale instead")
    args = ap.parse_args()
    ds = read_movielens(Path(args.data))
    if args.rank:
        scales = [None, 1.0, 2.0, 3.0, 5.0, 10.0]
        means = {s: {k: [] for k in RANK_KS} for s in scales}
        for seed in [int(s) for s in args.seeds.split(",")]:
            warm, pseudo = pseudo_split(ds, seed)
            model = fitted_version(warm, pseudo, seed, Path(args.cache) if args.cache else None)
            for s, per_k in rank_score(model, split_dataset(warm, pseudo), scales).items():
                for k, v in per_k.items():
                    means[s][k].append(float(np.mean(v)))
                print(f"seed {seed} scale {s}: " + " / ".join(f"{np.mean(v):.4f}" for v in per_k.values()), flush=True)
        print("ranker_item_foldin_scale | " + " | ".join(f"NDCG@10 k={k}" for k in RANK_KS))
        for s in scales:
            print(f"{'kept' if s is None else s} | " + " | ".join(f"{np.mean(v):.4f}" for v in means[s].values()))
        return
    grid = [(20.0, 1.0), (20.0, 5.0), (20.0, 10.0), (20.0, 20.0), (10.0, 10.0), (10.0, 5.0), (10.0, 3.0), (40.0, 10.0),
            (20.0, "eb")]
    totals = {g: {k: [0.0, 0] for k in KS} for g in grid}
    for seed in [int(s) for s in args.seeds.split(",")]:
        warm, pseudo = pseudo_split(ds, seed)
        model = fitted_version(warm, pseudo, seed, Path(args.cache) if args.cache else None)
        split = split_dataset(warm, pseudo)
        print(f"seed {seed}: empirical Bayes (embedding, bias) = "
              f"{shrinkage(model, split['td'])}")
        for g in grid:
            for k, (sse, n) in score(model, split, *g).items():
                totals[g][k][0] += sse
                totals[g][k][1] += n
    print("reg, reg_bias | " + " | ".join(f"RMSE k={k}" for k in KS))
    for g in grid:
        print(f"{g} | " + " | ".join(f"{np.sqrt(s / max(n, 1)):.4f} ({n})" for s, n in totals[g].values()))


if __name__ == "__main__":
    main()
