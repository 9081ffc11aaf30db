"""How far a cold user's predicted rating should lean on the items' damped means (pseudo-cold users).

Usage: python bench/tune_cold_mean.py [--seeds 42,43,44] [--data DIR] [--no-attributes] [--kind dot|nn] [--out FILE]

For each seed the warm users of protocol seed SEED are split again with SEED + 1000; a dot model with
its ranker (or the NN, ``--kind nn``) is trained on the pseudo-warm users (``fit_model``, the defaults) and every pseudo-cold user
is served as `cfb onboard` serves them (``TrainedModel.user_vector``): questionnaire answers from their
answer pool at Q = 0/5/15/30 (§4b) and their first n ratings in time order at n = 0/1/3/5/10 (§5).
Each candidate is a ``ServingConfig`` whose weight w moves a cold user's prediction toward the item's
damped mean (``TrainedModel.predict``, which serves it): w = c × k / (k + n) (n: the user's known
ratings) or c × k / (k + n + a) (a: the attribute answers the questionnaire takes); "today" is the
trained version's own settings. ``--no-attributes`` drops every
user's attributes (training and test): data without demographics. Prints RMSE per condition pooled
over the seeds; writes per-candidate (squared-error sum, count) per condition as JSON."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse
import json
import time
from dataclasses import replace

import numpy as np

from cfb.cf_core.data import CollabData, index_ids
from cfb.cf_core.model import UserHistory
from cfb.cf_core.split import cold_users
from cfb.db.sources import read_movielens
from cfb.cf_core.fit import TrainingData, fit_model

sys.path.insert(0, str(Path(__file__).parent))
from common import BUDGETS, STEPS, cold_cases  # noqa: E402

# candidate -> (c, k, the attribute answers counted) as ServingConfig's cold_mean_* settings; None: as trained
CANDIDATES = {"today": None, "w=0": (0.0, 1.0, False), **{f"k/(k+n), k={k:g}": (1.0, k, False) for k in (1.0, 3.0)},
              **{f"k/(k+n+a), k={k:g}": (1.0, k, True) for k in (1.0, 3.0)},
              **{f"{c:g}·k/(k+n+a), k={k:g}": (c, k, True) for c, k in ((0.5, 1.0), (0.5, 2.0), (0.5, 4.0),
                                                                         (0.7, 1.0), (0.7, 2.0), (0.3, 4.0))}}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--data", default="../shared/data/ml-100k", help="a MovieLens folder (any release)")
    ap.add_argument("--no-attributes", action="store_true", help="drop every user's attributes")
    ap.add_argument("--kind", choices=("dot", "nn"), default="dot", help="the rating model")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def run_seed(ds, seed: int, no_attributes: bool, kind: str, acc: dict) -> None:  # noqa: ANN001
    """Train on seed's pseudo-warm users and add every candidate's squared errors to ``acc``."""
    r = ds.ratings.assign(user=ds.ratings.user.astype(str), item=ds.ratings.item.astype(str))
    attrs = {str(u): {} for u in r.user.unique()}
    if ds.users is not None and not no_attributes:
        attrs.update({str(u): dict(a) for u, a in zip(ds.users.user, ds.users.attributes)})
    cold = cold_users(r.user.unique().tolist(), seed)
    warm = r[~r.user.isin(cold)]
    pusers = sorted(warm.user.unique())
    pcold = cold_users(pusers, seed + 1000)
    tr, ev = warm[~warm.user.isin(pcold)], warm[warm.user.isin(pcold)]
    uindex = {x: k for k, x in enumerate(pusers)}
    scale = tuple(ds.scale) if ds.scale is not None else (float(r.rating.min()), float(r.rating.max()))
    uids, u = index_ids(tr.user.to_numpy())
    iids, i = index_ids(tr.item.to_numpy())
    td = TrainingData(CollabData(u, i, tr.rating.to_numpy(), len(uids), len(iids)), np.arange(len(uids)),
                      np.array([int(x) for x in iids]), tr.timestamp.to_numpy(), [attrs[x] for x in uids],
                      scale, 0)
    t0 = time.time()
    model, _ = fit_model(td, kind, {}, progress=False, ranker=True, seed=seed)
    print(f"seed {seed}: fit {time.time() - t0:.1f}s", flush=True)
    damped = model.damped_means()
    served = {name: model if rule is None else replace(model, config=replace(
        model.config, cold_mean_weight=rule[0], cold_mean_count=rule[1], cold_mean_answer_weight=float(rule[2])))
        for name, rule in CANDIDATES.items()}

    for case in cold_cases(ev, uindex, seed + 1000, list(model.questionnaire.items), model.item_index):
        history = UserHistory(attrs[case.user], case.items, case.ratings,
                              signup_items=frozenset(case.items.tolist()) if case.signup else frozenset(),
                              asked=case.asked)
        uv = model.user_vector(history, affinity=False)  # (the same for every candidate: they differ in serving)
        for name, candidate in served.items():
            pred = candidate.predict(uv, case.test).astype(np.float64)
            se, m = acc.setdefault(name, {}).get(case.condition, (0.0, 0))
            acc[name][case.condition] = (se + float(((pred - case.truth) ** 2).sum()), m + len(case.truth))
        se, m = acc.setdefault("popularity (damped mean)", {}).get(case.condition, (0.0, 0))
        acc["popularity (damped mean)"][case.condition] = (
            se + float(((damped[case.test] - case.truth) ** 2).sum()), m + len(case.truth))


def main() -> None:
    args = parse()
    ds = read_movielens(args.data)
    acc: dict = {}
    t0 = time.time()
    for seed in (int(s) for s in args.seeds.split(",")):
        run_seed(ds, seed, args.no_attributes, args.kind, acc)
    conds = [f"Q={q}" for q in BUDGETS] + [f"n={n}" for n in STEPS]
    print(f"RMSE, pseudo-cold users of seeds {args.seeds} pooled{' (no attributes)' if args.no_attributes else ''}"
          f" ({time.time() - t0:.0f} s)")
    print(f"{'candidate':28} " + " ".join(f"{c:>7}" for c in conds))
    for name, by in acc.items():
        print(f"{name:28} " + " ".join(f"{(by[c][0] / by[c][1]) ** 0.5:7.4f}" for c in conds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(acc, f)


if __name__ == "__main__":
    main()
