"""Rating-model prior for cold users from the ranker's user vector (pseudo-cold tuning + real test).

Usage: python bench/tune_rating_prior.py SEED [--real] [--out FILE] [--grid wide|narrow|folds|attrprior] [--params JSON]

Pseudo-cold (default): the warm users of protocol seed SEED are split again with SEED + 1000; the
models are trained on the pseudo-warm users; ridge priors are fitted on them with reveals simulated
(questionnaire answered from a random half, Q in 0/5/15/30; first n in time order, n in 0/1/3/5/10);
pseudo-cold users are scored by protocol §4b (RMSE, Q = 0/5/15/30) and §5 (RMSE, n = 0/1/3/5/10).
--real: the same on the protocol split (train on every warm user, score the real cold users), in
memory (no database, no incremental retrain between fold-in steps).
Writes per-candidate (SE sum, count) per condition as JSON."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse
import json
import time

import numpy as np
import torch

torch.set_num_threads(1)

from cfb.cf_core.data import CollabData, index_ids  # noqa: E402
from cfb.cf_core.feature_model import Reveal  # noqa: E402
from cfb.cf_core.model import UserHistory  # noqa: E402
from cfb.cf_core.rating import FoldInConfig  # noqa: E402
from cfb.cf_core.split import cold_users  # noqa: E402
from cfb.db.sources import read_movielens  # noqa: E402
from cfb.cf_core.fit import TrainingData, fit_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import BUDGETS, STEPS, cold_cases  # noqa: E402

ALPHAS = (10.0, 100.0, 1000.0)
FOLDS = {"nofold": None, "f20_100": (20.0, 100.0), "f50_100": (50.0, 100.0), "f20_30": (20.0, 30.0),
         "f100_300": (100.0, 300.0), "f50_30": (50.0, 30.0)}
BASE_FOLDS = {"base": (20.0, 100.0), "base_f20_30": (20.0, 30.0), "base_f20_10": (20.0, 10.0),
              "base_f50_30": (50.0, 30.0), "base_f10_100": (10.0, 100.0)}
SHRINK = [(w0, k) for w0 in (0.3, 0.5, 0.7, 1.0) for k in (3.0, 10.0, 30.0)]
OFF_C = 5.0  # offset feature: Σ(r − item damped mean) / (n + OFF_C)


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("seed", type=int)
    ap.add_argument("--data", default="../shared/data/ml-100k", help="a MovieLens 100k folder")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=2, help="simulated reveal draws per training user")
    ap.add_argument("--kind", choices=("dot", "nn"), default="dot", help="the rating model")
    ap.add_argument("--params", default="{}", help="the rating model's settings, as JSON (e.g. '{\"wd\": 1.0}')")
    ap.add_argument("--grid", choices=("wide", "narrow", "folds", "attrprior"), default="narrow",
                    help="wide: round 1 (every feature set, α 10–1000, six fold-ins, 12 shrinks); narrow: round 2; "
                         "folds: today's prior with a grid of fold-in shrinkages, with and without the ranker term; "
                         "attrprior: today's prior against one from the attribute answers alone (the fold-in then "
                         "counts each revealed rating once), over a grid of fold-in shrinkages")
    return ap.parse_args()


def main():
    args = parse()
    seed = args.seed
    t_start = time.time()
    ds = read_movielens(args.data)
    r = ds.ratings.assign(user=ds.ratings.user.astype(str), item=ds.ratings.item.astype(str))
    attrs = dict(zip(ds.users.user, ds.users.attributes))
    cold = cold_users(r.user.unique().tolist(), seed)
    warm = r[~r.user.isin(cold)]
    if args.real:
        tr, ev = warm, r[r.user.isin(cold)]
        split_seed = seed
        uindex = {x: k for k, x in enumerate(sorted(r.user.unique()))}
    else:
        pusers = sorted(warm.user.unique())
        pcold = cold_users(pusers, seed + 1000)
        tr, ev = warm[~warm.user.isin(pcold)], warm[warm.user.isin(pcold)]
        split_seed = seed + 1000
        uindex = {x: k for k, x in enumerate(pusers)}
    uids, u = index_ids(tr.user.to_numpy())
    iids_s, i = index_ids(tr.item.to_numpy())
    item_db = np.array([int(x) for x in iids_s])
    td = TrainingData(CollabData(u, i, tr.rating.to_numpy(), len(uids), len(iids_s)), np.arange(len(uids)), item_db,
                      tr.timestamp.to_numpy(), [attrs[x] for x in uids], (1.0, 5.0), 0)
    t0 = time.time()
    model, rep = fit_model(td, args.kind, json.loads(args.params), progress=False, ranker=True, seed=seed)
    print(f"fit {time.time() - t0:.1f}s", rep, flush=True)
    boot, enc = model.bootstrap, model.bootstrap.encoder
    q_items = list(model.questionnaire.items)
    damped_inner = model.damped_means()
    targets = np.concatenate([model.user_factors, model.user_bias[:, None]], axis=1)

    def feats(attributes, db_items, ratings, signup):
        """Features of one reveal: ranker vector, answer encoding, offset features; plus inner items."""
        db_items = np.asarray(db_items, np.int64)
        ratings = np.asarray(ratings, np.float32)
        h = UserHistory(attributes, db_items, ratings, signup_items=frozenset(db_items.tolist()) if signup else frozenset())
        inner = model.item_index(db_items)
        known = inner >= 0
        budget = model.budget_of(h)
        rv = model.ranker.user_vectors([Reveal(attributes, inner[known], ratings[known], budget)])[0]
        answers = {int(a): float(b) for a, b in zip(db_items, ratings)}
        af = enc.transform([attributes], [answers])[0]  # budget None, as user_vector serves it
        n = int(known.sum())
        off = float((ratings[known] - damped_inner[inner[known]]).sum() / (n + OFF_C)) if n else 0.0
        of = np.array([off, np.log1p(n), off * n / (n + 10.0)])
        return rv, af, of, h, inner, known

    # --- simulated reveals on training users ---------------------------------------------------
    t0 = time.time()
    rng = np.random.default_rng(seed + 7)
    rows = {"R": [], "A": [], "O": [], "y": []}
    trs = tr.assign(s_item=tr.item)
    for x, g in trs.groupby("user"):
        ui = int(np.searchsorted(uids, x))
        gi = g.sort_values("item")
        items_db = gi.item.astype(int).to_numpy()
        rats = gi.rating.to_numpy(np.float32)
        tl = g.sort_values(["timestamp", "item"], kind="stable")
        for rep_k in range(args.reps):
            half = rng.permutation(len(items_db))[: len(items_db) // 2]
            pool = dict(zip(items_db[half].tolist(), rats[half].tolist()))
            for q in BUDGETS:
                given = [(it, pool[it]) for it in q_items[:q] if it in pool]
                its = np.array([a for a, _ in given], np.int64)
                rs = np.array([b for _, b in given], np.float32)
                rv, af, of, *_ = feats(attrs[x], its, rs, True)
                rows["R"].append(rv); rows["A"].append(af); rows["O"].append(of); rows["y"].append(targets[ui])
            if rep_k == 0:
                for n in STEPS:
                    its = tl.item.astype(int).to_numpy()[:n]
                    rs = tl.rating.to_numpy(np.float32)[:n]
                    rv, af, of, *_ = feats(attrs[x], its, rs, False)
                    rows["R"].append(rv); rows["A"].append(af); rows["O"].append(of); rows["y"].append(targets[ui])
    X = {k: np.array(v, np.float64) for k, v in rows.items()}
    print(f"sim rows {len(X['y'])} in {time.time() - t0:.1f}s", flush=True)

    global ALPHAS, FOLDS, BASE_FOLDS, SHRINK
    featsets = {"R": ["R"], "RA": ["R", "A"], "AO": ["A", "O"], "RAO": ["R", "A", "O"], "RO": ["R", "O"]}
    zbetas = ()
    if args.grid == "narrow":
        featsets = {"R": ["R"], "RO": ["R", "O"]}
        ALPHAS = (1000.0, 3000.0, 10000.0, 30000.0)
        FOLDS = {"nofold": None, "f20_100": (20.0, 100.0), "f20_30": (20.0, 30.0), "f30_50": (30.0, 50.0)}
        BASE_FOLDS = {"base": (20.0, 100.0), "base_f20_30": (20.0, 30.0)}
        SHRINK = [(0.5, 3.0), (0.3, 10.0), (0.5, 10.0)]
        zbetas = (0.05, 0.1, 0.2)
    elif args.grid == "folds":
        featsets, FOLDS, SHRINK, zbetas = {}, {}, [], (0.05, 0.1, 0.15)
        BASE_FOLDS = {f"base_f{int(a)}_{int(b)}": (a, b) for a, b in
                      ((20.0, 100.0), (10.0, 30.0), (10.0, 50.0), (20.0, 30.0), (7.0, 30.0))}
        if args.kind == "nn":  # (no user bias: the second number is unused)
            BASE_FOLDS = {f"base_f{int(a)}": (a, 30.0) for a in (100.0, 200.0, 300.0, 600.0)}
            SHRINK, zbetas = [(0.5, 3.0), (0.5, 10.0), (1.0, 3.0), (1.0, 10.0), (1.0, 30.0)], (0.025, 0.05)
    elif args.grid == "attrprior":
        featsets, FOLDS, SHRINK, zbetas = {}, {}, [], (0.1,)
        BASE_FOLDS = {f"{p}_f{int(a)}_{int(b)}": (a, b) for p in ("base", "attr") for a, b in
                      ((10.0, 30.0), (5.0, 30.0), (5.0, 15.0), (10.0, 15.0), (20.0, 30.0), (3.0, 10.0))}
    ridges = {}
    from sklearn.linear_model import Ridge
    for name, parts in featsets.items():
        M = np.concatenate([X[p] for p in parts], axis=1)
        mu, sd = M.mean(0), M.std(0)
        sd[sd < 1e-8] = 1.0
        for a in ALPHAS:
            rd = Ridge(alpha=a).fit((M - mu) / sd, X["y"])
            W = rd.coef_ / sd[None, :]  # folded scaler: y = M @ W.T + b
            b = rd.intercept_ - W @ mu
            ridges[f"{name}_a{int(a)}"] = (parts, W, b)

    # --- evaluate ------------------------------------------------------------------------------
    acc: dict = {}

    def add(cand, cond, pred, truth):
        se, n = acc.setdefault(cand, {}).get(cond, (0.0, 0))
        acc[cand][cond] = (se + float(((pred - truth) ** 2).sum()), n + len(truth))

    def score(cond, attributes, its, rs, signup, ti, truth):
        rv, af, of, h, inner, known = feats(attributes, its, rs, signup)
        n = int(known.sum())
        dm = damped_inner[ti]
        add("popularity", cond, dm, truth)
        preds = {}
        for bname, (rg, rb) in BASE_FOLDS.items():
            inn = model.item_index(h.items)
            revealed = {} if bname.startswith("attr") else {int(a): float(c) for a, c in zip(its, rs)}
            v, bb = boot.initial_factors([attributes], [revealed])
            vec, bias = model.rating.fold_in(inn[inn >= 0], h.ratings[inn >= 0], v[0], float(bb[0]),
                                             FoldInConfig(rg, rb))
            preds[bname] = model.rating.predict(vec, bias, ti)
        fv = {"R": rv, "A": af, "O": of}
        for rname, (parts, W, b) in ridges.items():
            y = np.concatenate([fv[p] for p in parts]) @ W.T + b
            pv, pb = y[:-1].astype(np.float32), float(y[-1])
            for fname, f in FOLDS.items():
                if f is None:
                    vec, bias = pv, pb
                else:
                    vec, bias = model.rating.fold_in(inner[known], h.ratings[known], pv, pb, FoldInConfig(*f))
                preds[f"{rname}_{fname}"] = model.rating.predict(vec, bias, ti)
        z = None
        if zbetas:  # the ranker's score of each test item, standardised over the catalogue
            sc = model.ranker.item_scores(rv[None])[0].astype(np.float64)
            z = (sc[ti] - sc.mean()) / sc.std()
        for c, p in preds.items():
            add(c, cond, p, truth)
            if args.grid in ("narrow", "folds", "attrprior") or c == "base" or c.endswith(("_f20_100", "_nofold", "_f50_100")):
                for w0, k in SHRINK:
                    w = w0 * k / (k + n)
                    add(f"{c}+s{w0}_{int(k)}", cond, (1 - w) * p + w * dm, truth)
                    for beta in zbetas:
                        add(f"{c}+s{w0}_{int(k)}+z{beta}", cond, (1 - w) * p + w * dm + beta * z, truth)
                for beta in zbetas:
                    add(f"{c}+z{beta}", cond, p + beta * z, truth)

    t0 = time.time()
    for case in cold_cases(ev, uindex, split_seed, q_items, model.item_index):
        score(case.condition, attrs[case.user], case.items, case.ratings, case.signup, case.test, case.truth)
    print(f"eval {time.time() - t0:.1f}s total {time.time() - t_start:.1f}s", flush=True)
    out = args.out or f"/tmp/rp/{'real' if args.real else 'pseudo'}_{args.grid}_{seed}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(acc, open(out, "w"))
    conds = [f"Q={q}" for q in BUDGETS] + [f"n={n}" for n in STEPS]
    for c in [c for c in ("popularity", "base", "R_a1000_nofold", "R_a1000_f20_100") if c in acc]:
        print(c, [round((acc[c][d][0] / acc[c][d][1]) ** 0.5, 4) for d in conds])


if __name__ == "__main__":
    main()
