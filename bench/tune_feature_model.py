"""Choose ``FeatureUserModel`` settings on pseudo-cold users, then report the protocol's real test numbers.

(1) Pseudo-cold: for each protocol seed s, keep only its warm users (COLDSTART_PROTOCOL.md §1) and run the
protocol on them with seed s + 1000 and again with s + 2000 (each time a fifth of them become pseudo-cold,
§3 answer pools with that seed; six pseudo-cold sets in all), as bench/tune_coldstart.py does; the
protocol's cold users are never seen. (2) Real: the protocol's split of
seed s (cold users of seeds 42, 43, 44), with the chosen settings. Both score §4b (Q = 0/5/15/30, the
questionnaire = the 30 training items most often rated in the top quarter of the scale, those first)
and §5 (first 10 ratings in time order revealed at n = 0/1/3/5/10, evaluation on the ratings after the
first 10) exactly as the protocol does,
in memory (no database), side by side with positive popularity (§6). RMSE is not reported: the model ranks.

Settings that scale with the data rather than being constants: number attributes are binned at quantiles
of the training users' values; the batch is min(users_per_batch, n_training_users / 4) users, so an epoch
is 12 steps for up to 1,024 training users and grows with them beyond; the questionnaire is the 30
most-liked items of the training data. The rest (epochs, lr, wd, dropout, d, ...) are constants chosen
here on MovieLens 100k.

Usage:
  python bench/tune_feature_model.py [--data DIR] [--mode pseudo|real|both] [--seeds 42,43,44]
      [--json OUT] ['{"n_factors": 64}' ...]      # candidate settings (overrides of the defaults)

Each candidate after the first is also shown as its paired difference from the first on the same users
(mean over splits), with a standard error clustered by user (the splits share users): pass '{}' first to
compare candidates with the defaults.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cfb.bootstrap.questionnaire import choose_items, infer_questions
from cfb.cf_core.data import CollabData
from cfb.cf_core.feature_model import FeatureModelConfig, FeatureUserModel, Reveal
from cfb.cf_core.split import answer_pool_split, cold_users
from cfb.db.sources import read_movielens
from cfb.evaluation.metrics import (PER_USER, clustered_standard_error, ndcg_at_k, paired_values, recall_at_k,
                                    without_per_user)

K = 10
BUDGETS = (0, 5, 15, 30)
STEPS = (0, 1, 3, 5, 10)


@dataclass
class Split:
    """One protocol run prepared in memory: training data for the model, and every cold user's reveals,
    exclusions and relevant items per budget (§4b) and per fold-in step (§5)."""

    data: CollabData
    timestamps: np.ndarray
    attributes: list[dict]
    questions: list
    questionnaire: list[int]
    scale: tuple[float, float]
    item_ids: list[str]
    pos_pop: np.ndarray  # positive-popularity ranking score of each catalogue item
    cases: dict  # ("q", Q) or ("n", n) -> (reveals, exclude lists, relevant sets, user ids)


def build_split(ratings: pd.DataFrame, attrs_of: dict, seed: int, scale=(1.0, 5.0),  # noqa: ANN001
                strategy: str = "positive") -> Split:
    users = sorted(ratings.user.unique().tolist())
    user_index = {u: k for k, u in enumerate(users)}
    cold = cold_users(users, seed)
    is_cold = ratings.user.isin(cold)
    warm = ratings[~is_cold]
    item_ids = sorted(set(warm.item))
    inner_item = {e: k for k, e in enumerate(item_ids)}
    warm_ids = sorted(set(warm.user))
    inner_user = {u: k for k, u in enumerate(warm_ids)}
    data = CollabData(warm.user.map(inner_user).to_numpy(), warm.item.map(inner_item).to_numpy(),
                      warm.rating.to_numpy(np.float32), len(warm_ids), len(item_ids))
    attributes = [attrs_of.get(u, {}) for u in warm_ids]
    ts = warm.timestamp.to_numpy(dtype=float, na_value=-1.0) if "timestamp" in warm else np.full(len(warm), -1.0)
    questionnaire = choose_items(data.items, data.ratings, data.n_items, max(BUDGETS), strategy, scale)
    # positive popularity: count of ratings >= 4, ties by count, then item id as a string (= inner order)
    pos_n = np.bincount(data.items[data.ratings >= 4], minlength=data.n_items).astype(float)
    cnt = np.bincount(data.items, minlength=data.n_items).astype(float)
    order = np.lexsort((np.arange(data.n_items), -cnt, -pos_n))
    pos_pop = np.empty(data.n_items)
    pos_pop[order] = -np.arange(data.n_items, dtype=float)

    def inner(ids) -> np.ndarray:  # noqa: ANN001
        return np.array([inner_item.get(e, -1) for e in ids], dtype=np.int64)

    cold_sorted = sorted(cold)
    groups = {u: g for u, g in ratings[is_cold].groupby("user")}
    cases: dict = {}
    for q in BUDGETS:
        asked = set(questionnaire[:q])
        reveals, excl, rel, who = [], [], [], []
        for u in cold_sorted:
            who.append(u)
            g = groups[u].sort_values("item")
            pool, test = answer_pool_split(user_index[u], g["item"].tolist(), seed)
            r_of = dict(zip(g["item"], g["rating"]))
            pool_inner = inner(pool)
            given = [(int(i), float(r_of[e])) for e, i in zip(pool, pool_inner) if i in asked]
            reveals.append(Reveal(attrs_of.get(u, {}), np.array([i for i, _ in given], np.int64),
                                  np.array([r for _, r in given], float), budget=q))
            excl.append(pool_inner[pool_inner >= 0])
            rel.append({e for e in test if r_of[e] >= 4})
        cases[("q", q)] = (reveals, excl, rel, who)
    timeline = {u: groups[u].sort_values(["timestamp", "item"], kind="stable") for u in cold_sorted}
    for n in STEPS:
        reveals, excl, rel, who = [], [], [], []
        for u in cold_sorted:
            tl = timeline[u]
            if len(tl) <= 10:
                continue
            who.append(u)
            first = tl.iloc[:10]
            shown = first.iloc[:n]
            si = inner(shown["item"])
            keep = si >= 0
            reveals.append(Reveal(attrs_of.get(u, {}), si[keep], shown["rating"].to_numpy(float)[keep],
                                  budget=0 if n == 0 else None))
            fi = inner(first["item"])
            excl.append(fi[fi >= 0])
            ev = tl.iloc[10:]
            rel.append(set(ev.loc[ev.rating >= 4, "item"]))
        cases[("n", n)] = (reveals, excl, rel, who)
    return Split(data, ts, attributes, infer_questions(attributes), questionnaire, tuple(scale), item_ids,
                 pos_pop, cases)


def score_cases(split: Split, score_fn) -> dict:  # noqa: ANN001
    """NDCG@10 / Recall@10 per case (and each scored user's NDCG@10); ``score_fn(reveals) -> (n, n_items)``
    scores or None for pos. popularity."""
    out = {}
    for key, (reveals, excl, rel, who) in split.cases.items():
        s = (np.tile(split.pos_pop, (len(reveals), 1)) if score_fn is None else score_fn(reveals)).astype(np.float64)
        nd, rc, scored = [], [], []
        for k, (r, ex, relevant, user) in enumerate(zip(reveals, excl, rel, who)):
            if not relevant:
                continue
            row = s[k]
            row[np.asarray(r.items, dtype=np.int64)] = -np.inf
            row[ex] = -np.inf
            top = np.lexsort((np.arange(len(row)), -row))[:K]
            ranked = [split.item_ids[i] for i in top]
            nd.append(ndcg_at_k(ranked, relevant, K))
            rc.append(recall_at_k(ranked, relevant, K))
            scored.append(user)
        out[f"{key[0]}{key[1]}"] = {"ndcg": float(np.mean(nd)), "recall": float(np.mean(rc)), "users": len(nd),
                                    PER_USER: {"user": scored, "ndcg@10": nd}}
    return out


def fit_model(split: Split, config: FeatureModelConfig, seed: int) -> FeatureUserModel:
    return FeatureUserModel(config, seed=seed, progress=False).fit(
        split.data, split.timestamps, split.attributes, split.questions, split.questionnaire, split.scale)


def run(split: Split, config: FeatureModelConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    model = fit_model(split, config, seed)
    fit_s = time.perf_counter() - t0
    res = score_cases(split, lambda rv: model.item_scores(model.user_vectors(rv)))
    return {"model": res, "fit_s": round(fit_s, 2)}


def load(path: str):  # noqa: ANN201
    ds = read_movielens(path)
    ratings = ds.ratings.assign(user=ds.ratings.user.astype(str), item=ds.ratings.item.astype(str))
    attrs_of = dict(zip(ds.users.user.astype(str), ds.users.attributes)) if ds.users is not None else {}
    return ratings, attrs_of, ds.scale or (1.0, 5.0)


def pseudo_split(ratings: pd.DataFrame, attrs_of: dict, seed: int, scale, offset: int = 1000,  # noqa: ANN001
                 strategy: str = "positive") -> Split:
    """Warm users of protocol seed ``seed`` only, split again with seed + ``offset``."""
    cold = cold_users(sorted(ratings.user.unique().tolist()), seed)
    return build_split(ratings[~ratings.user.isin(cold)], attrs_of, seed + offset, scale, strategy)


COLS = [f"q{q}" for q in BUDGETS] + [f"n{n}" for n in STEPS]


def mean_rows(rows: list[dict]) -> dict:
    return {c: float(np.mean([r[c]["ndcg"] for r in rows])) for c in COLS}


def fmt(name: str, row: dict, extra: str = "") -> str:
    return f"{name:<40}" + " ".join(f"{row[c]:.3f}" for c in COLS) + f"  {extra}"


def paired_rows(runs: list[dict], base: list[dict]) -> tuple[dict, dict]:
    """Per column: the mean over splits of a candidate's NDCG@10 minus the first candidate's on the same
    users, and its standard error (clustered by user: the splits share users; None when unknown)."""
    diff, se = {}, {}
    for c in COLS:
        samples = [paired_values(r[c], b[c]) for r, b in zip(runs, base)]
        diff[c] = float(np.mean([d.mean() for _, d in samples]))
        se[c] = clustered_standard_error(samples)
    return diff, se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/ml-100k")
    ap.add_argument("--mode", choices=["pseudo", "real", "both"], default="both")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--pseudo-offsets", default="1000,2000", help="pseudo-cold splits per seed (seed + offset)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--questionnaire", default="positive", choices=["positive", "popularity", "entropy"],
                    help="how the questionnaire items are chosen (bootstrap.questionnaire.choose_items)")
    ap.add_argument("candidates", nargs="*", help="JSON overrides of FeatureModelConfig (and \"questionnaire\": "
                    "a strategy for that candidate)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    ratings, attrs_of, scale = load(a.data)
    seeds = [int(s) for s in a.seeds.split(",")]
    cands = [json.loads(c) for c in a.candidates] or [{}]
    modes = ["pseudo", "real"] if a.mode == "both" else [a.mode]
    report: dict = {"dataset": a.data, "seeds": seeds, "results": []}
    print(f"{'NDCG@10':<40}" + " ".join(f"{c:>5}" for c in COLS))
    for mode in modes:
        built: dict = {}

        def splits_for(strategy: str) -> dict:  # noqa: ANN202  (keyed (and the model seeded) by seed + offset - 1000)
            if strategy not in built:
                built[strategy] = (
                    {s + o - 1000: pseudo_split(ratings, attrs_of, s, scale, o, strategy)
                     for o in map(int, a.pseudo_offsets.split(",")) for s in seeds} if mode == "pseudo"
                    else {s: build_split(ratings, attrs_of, s, scale, strategy) for s in seeds})
            return built[strategy]

        splits = splits_for(a.questionnaire)
        keys = list(splits)
        base = [score_cases(splits[k], None) for k in keys]
        print(fmt(f"[{mode}] positive popularity", mean_rows(base)))
        report["results"].append({"mode": mode, "method": "positive_popularity",
                                  "mean": mean_rows(base), "per_split": dict(zip(keys, without_per_user(base)))})
        first = None
        for cand in cands:
            overrides = {k: v for k, v in cand.items() if k != "questionnaire"}
            cfg = FeatureModelConfig.from_json({**FeatureModelConfig().to_json(), **overrides})
            cand_splits = splits_for(cand.get("questionnaire", a.questionnaire))
            runs = [run(cand_splits[k], cfg, k) for k in keys]
            m = mean_rows([r["model"] for r in runs])
            fit = [r["fit_s"] for r in runs]
            print(fmt(f"[{mode}] {json.dumps(cand) if cand else 'feature model (defaults)'}"[:40], m,
                      "fit " + "/".join(f"{f:.1f}" for f in fit) + " s"), flush=True)
            if first is None:
                first = [r["model"] for r in runs]
            else:  # the same users scored by both: a paired difference tells settings apart better than two means
                diff, se = paired_rows([r["model"] for r in runs], first)
                print(f"{'  minus the first candidate':<40}" + " ".join(f"{diff[c]:+.3f}".replace("0.", ".", 1)
                                                                         for c in COLS))
                print(f"{'  ± its standard error':<40}" + " ".join("  -  " if se[c] is None else f"{se[c]:.3f}"
                                                                    for c in COLS), flush=True)
            report["results"].append({"mode": mode, "method": "feature_model", "overrides": cand,
                                      "config": cfg.to_json(), "mean": m, "fit_s": fit,
                                      "per_split": {k: without_per_user(r["model"]) for k, r in zip(keys, runs)}})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
