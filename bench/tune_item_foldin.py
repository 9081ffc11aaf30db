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

With ``--rank``: the same items and reveals choose how a new item's ranker row follows its ratings
(``TrainedModel.ranker_rows_following``; candidates (ranker_item_foldin_scale, ranker_item_map_count)).
Scored like §8: every trained user with a rating >= 4 of a pseudo-cold item that is not among that
item's first k ranks the pseudo-cold items (the ones they revealed left out) by the version's scores;
NDCG@10 at k = 0 / 1 / 3 / 10. That ranks new items among themselves only; ``--level`` measures where
an item with all its ratings (20 or more) lands among the learned items, against a full retrain that
learned it (a second version trained on every warm rating): per user, the share of learned items
scored above it in each, their mean absolute difference, correlation and mean difference.
Measured (ml-100k, seeds 42-44, 2026-12-06), --rank | --level:
  metadata row kept (before):  0.349 / 0.350 / 0.350 / 0.350 | 0.231, 0.531, +0.196
  (3, inf): moved, bias not drawn 0.349 / 0.381 / 0.420 / 0.470 | 0.245, 0.617, +0.235
  (3, 1)                        0.349 / 0.378 / 0.417 / 0.475 | 0.123, 0.600, -0.089
  (3, 10)                       0.349 / 0.382 / 0.423 / 0.479 | 0.105, 0.616, -0.048
  (3, 30) adopted               0.349 / 0.382 / 0.423 / 0.479 | 0.101, 0.629, +0.008
  (3, 30), the solved bias clipped to the learned range (2026-12-07, adopted): 0.349 / 0.384 / 0.422 / 0.481 |
                                0.098, 0.629, +0.009
Drawing the whole row (not only the bias) toward the map's row put well-rated items closer to the
full retrain (0.066 at count 3) but ranked new items among themselves far worse at small k (k = 3:
0.19 at count 3, 0.39 at 100). The scale at count 30: 1 0.349 / 0.359 / 0.399 / 0.469; 10 0.349 / 0.370 /
0.401 / 0.463.

Usage: PYTHONPATH=bench python bench/tune_item_foldin.py [--data ../shared/data/ml-100k] [--seeds 42,43,44] [--cache DIR] [--rank]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from cfb.cf_core.rating import FoldInConfig, _RatingModel
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
        for k in KS:
            if len(users) <= k:
                continue
            vec, bias = model.rating.fold_in_item(model.user_factors[users[:k]], model.user_bias[users[:k]], ratings[:k],
                                                  rows["item_factors"][n], float(rows["item_bias"][n]),
                                                  FoldInConfig(float(reg), float(reg_bias)))
            rest = users[k:]
            one = model.rating.with_items({"item_factors": vec[None], "item_bias": np.array([bias])})
            pred = np.clip(one.predict_pairs(model.user_factors[rest], model.user_bias[rest],
                                             np.full(len(rest), one.n_items - 1)), *td.scale)
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


def folded_rows(model, prior: dict, reveals: list[tuple[np.ndarray, np.ndarray]], shrinkage: FoldInConfig) -> dict:  # noqa: ANN001
    """The pseudo-cold items' rating rows solved from ``prior`` against ``reveals`` (per item: inner users,
    their ratings) with ``shrinkage``, as an incremental retrain solves an added item."""
    rows = {n: prior[n].copy() for n in ("item_factors", "item_bias")}
    for j, (u, r) in enumerate(reveals):
        if len(u):
            rows["item_factors"][j], rows["item_bias"][j] = model.rating.fold_in_item(
                model.user_factors[u], model.user_bias[u], r, prior["item_factors"][j], float(prior["item_bias"][j]),
                shrinkage)
    return rows


def candidate_ranker_rows(model, candidate: tuple[float, float] | None, prior: dict, prior_ranker: dict,  # noqa: ANN001
                          reveals: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """The pseudo-cold items' ranker rows after ``reveals`` (per item: inner users, their ratings), as an
    incremental retrain makes them with ``candidate`` = (ranker_item_foldin_scale, ranker_item_map_count);
    None: their metadata rows."""
    if candidate is None:
        return prior_ranker
    m = replace(model, config=replace(model.config, ranker_item_foldin_scale=candidate[0],
                                      ranker_item_map_count=candidate[1]))
    moved = folded_rows(model, prior, reveals, m.config.ranker_item_foldin(m.scale_width))
    return m.ranker_rows_following(prior, moved, prior_ranker, np.array([len(u) for u, _ in reveals]))


def rank_score(model, split: dict, scales: list[tuple[float, float] | None]) -> dict:  # noqa: ANN001
    """{(ranker_item_foldin_scale, ranker_item_map_count): {k: [NDCG@10 of each scored user]}}; None: the
    ranker row stays its metadata row."""
    td = split["td"]
    grown = with_cold_items(model, split["cold_db"], split["cold_attrs"])
    cold = grown.item_index(split["cold_db"])
    prior, prior_ranker = model.metadata_rows(split["cold_attrs"])
    rank_vecs = full_history_vectors(model, td)
    n_ratings = np.bincount(td.data.users, minlength=td.data.n_users)
    by_item = first_ratings(model, split)
    threshold = model.ranker.threshold_
    out = {s: {k: [] for k in RANK_KS} for s in scales}
    for k in RANK_KS:
        shown = [(u[:k], r[:k]) if len(u) > k else (u[:0], r[:0]) for u, r in by_item]
        rows = folded_rows(model, prior, shown, model.config.item_foldin(model.scale_width))
        held = {}  # user -> (relevant pseudo-cold items, the ones they revealed)
        for j, (u, r) in enumerate(by_item):
            for at, (user, rating) in enumerate(zip(u.tolist(), r.tolist())):
                rel, mine = held.setdefault(user, (set(), set()))
                (mine if at < len(shown[j][0]) else rel if rating >= threshold else set()).add(j)
        for scale in scales:
            version = grown.with_item_rows(cold, rows, candidate_ranker_rows(model, scale, prior, prior_ranker, shown))
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


def level_score(model, full, split: dict, full_split: dict, candidates: list, min_ratings: int = 20) -> dict:  # noqa: ANN001
    """Where an added item lands among the learned items once it has all its ratings, against where a
    full retrain that learned it (``full``, on ``full_split``) puts it: for each pseudo-cold item with at
    least ``min_ratings`` ratings by trained users and each user both versions trained, the share of the
    learned (warm) items the user's ranker scores above it, in each version. {candidate: (mean absolute
    difference of those shares, their mean correlation over items, the mean difference)}; a candidate is
    (ranker_item_foldin_scale, ranker_item_map_count), or None: the metadata row kept."""
    td, full_td = split["td"], full_split["td"]
    common = np.intersect1d(td.user_ids, full_td.user_ids)
    mine, theirs = np.searchsorted(td.user_ids, common), np.searchsorted(full_td.user_ids, common)
    vecs, full_vecs = full_history_vectors(model, td)[mine], full_history_vectors(full, full_td)[theirs]
    n = model.n_learned_items
    learned = vecs @ model.ranker.out_[:n].T + model.ranker.out_bias_[:n]
    in_full = full.item_index(split["cold_db"])
    warm = np.setdiff1d(np.arange(full.n_learned_items), in_full)
    full_scores = full_vecs @ full.ranker.out_.T + full.ranker.out_bias_
    prior, prior_ranker = model.metadata_rows(split["cold_attrs"])
    reveals = [(u, r) if len(u) >= min_ratings else (u[:0], r[:0]) for u, r in first_ratings(model, split)]
    rows = {c: candidate_ranker_rows(model, c, prior, prior_ranker, reveals) for c in candidates}
    out = {c: [] for c in candidates}
    for j, (u, _) in enumerate(reveals):
        if not len(u):
            continue
        truth = (full_scores[:, warm] > full_scores[:, [in_full[j]]]).mean(1)
        for c in candidates:
            share = (learned > (vecs @ rows[c]["out"][j] + rows[c]["out_bias"][j])[:, None]).mean(1)
            out[c].append((np.abs(share - truth).mean(), np.corrcoef(share, truth)[0, 1], (share - truth).mean()))
    return {c: tuple(np.mean(np.array(v), axis=0)) for c, v in out.items()}


def main() -> None:
    ap = pseudo_cold_arguments(argparse.ArgumentParser())
    ap.add_argument("--rank", action="store_true", help="choose how a new item's ranker row follows its ratings")
    ap.add_argument("--kind", choices=["dot", "nn"], default="dot", help="the rating model")
    ap.add_argument("--level", action="store_true", help="where a well-rated added item lands against a full retrain")
    args = ap.parse_args()
    ds = read_movielens(Path(args.data))
    if args.level:
        from cfb.cf_core.fit import fit_model

        candidates = [None] + [(3.0, count) for count in (1.0, 3.0, 10.0, 30.0, float("inf"))]
        per_seed = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            warm, pseudo = pseudo_split(ds, seed)
            model = fitted_version(warm, pseudo, seed, Path(args.cache) if args.cache else None, args.kind)
            full_split = split_dataset(warm, set())  # the same warm data with the pseudo-cold items learned
            full = fit_model(full_split["td"], args.kind, None, seed, progress=False)[0]
            per_seed.append(level_score(model, full, split_dataset(warm, pseudo), full_split, candidates))
            print(f"seed {seed}: " + "; ".join(f"{c}: {v[0]:.3f}" for c, v in per_seed[-1].items()), flush=True)
        print("candidate | mean |share difference| | correlation | mean difference")
        for c in candidates:
            v = np.mean([p[c] for p in per_seed], axis=0)
            print(f"{'kept' if c is None else c} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:+.3f}")
        return
    if args.rank:
        scales = [None] + [(3.0, count) for count in (1.0, 3.0, 10.0, 30.0, float("inf"))] + \
            [(scale, 30.0) for scale in (1.0, 10.0)]
        means = {s: {k: [] for k in RANK_KS} for s in scales}
        for seed in [int(s) for s in args.seeds.split(",")]:
            warm, pseudo = pseudo_split(ds, seed)
            model = fitted_version(warm, pseudo, seed, Path(args.cache) if args.cache else None, args.kind)
            for s, per_k in rank_score(model, split_dataset(warm, pseudo), scales).items():
                for k, v in per_k.items():
                    means[s][k].append(float(np.mean(v)))
                print(f"seed {seed} scale {s}: " + " / ".join(f"{np.mean(v):.4f}" for v in per_k.values()), flush=True)
        print("ranker_item_foldin_scale | " + " | ".join(f"NDCG@10 k={k}" for k in RANK_KS))
        for s in scales:
            print(f"{'kept' if s is None else s} | " + " | ".join(f"{np.mean(v):.4f}" for v in means[s].values()))
        return
    grid = [(20.0, 1.0), (20.0, 5.0), (20.0, 10.0), (20.0, 20.0), (10.0, 10.0), (10.0, 5.0), (10.0, 3.0), (40.0, 10.0),
            (20.0, "eb")] if args.kind == "dot" else [(r, 5.0) for r in (3.0, 5.0, 10.0, 20.0, 30.0, 100.0, 1e9)]
    totals = {g: {k: [0.0, 0] for k in KS} for g in grid}
    for seed in [int(s) for s in args.seeds.split(",")]:
        warm, pseudo = pseudo_split(ds, seed)
        model = fitted_version(warm, pseudo, seed, Path(args.cache) if args.cache else None, args.kind)
        split = split_dataset(warm, pseudo)
        if args.kind == "dot":
            print(f"seed {seed}: empirical Bayes (embedding, bias) = {shrinkage(model, split['td'])}")
        for g in grid:
            for k, (sse, n) in score(model, split, *g).items():
                totals[g][k][0] += sse
                totals[g][k][1] += n
    print("reg, reg_bias | " + " | ".join(f"RMSE k={k}" for k in KS))
    for g in grid:
        print(f"{g} | " + " | ".join(f"{np.sqrt(s / max(n, 1)):.4f} ({n})" for s, n in totals[g].values()))


if __name__ == "__main__":
    main()
