"""Select cold-start settings on warm users only (pseudo-cold), never on the protocol's cold users.

For each protocol seed, the warm users of that seed's split are split again (seed + 1000) into
pseudo-warm and pseudo-cold users, and the protocol is run on that; candidates are compared by
NDCG@10 and RMSE. Usage: python bench/tune_coldstart.py [DATA_FOLDER] [--seeds=42,43,44] [--baselines]
'{"popularity_weight": 1.0}' ... (the folder: MovieLens 100k, default ../shared/data/ml-100k)."""
from __future__ import annotations

import json
import sys
import time

from cfb.cf_core.split import cold_users
from cfb.db.sources import Dataset, read_movielens
from cfb.evaluation.coldstart import mean_over_seeds, run_seed


def warm_only(ds: Dataset, seed: int) -> Dataset:
    cold = cold_users(ds.ratings.user.unique().tolist(), seed)
    keep = ~ds.ratings.user.isin(cold)
    return Dataset(ds.ratings[keep], ds.items, ds.users[~ds.users.user.isin(cold)], ds.scale, ds.name, step=ds.step)


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    ds = read_movielens(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1][0] not in "{-" else "../shared/data/ml-100k")
    candidates = [json.loads(a) for a in sys.argv[1:] if a.startswith("{")] or [{}]
    for c in candidates:
        c.setdefault("fold", [0, 1, 3, 5, 10])
    seeds = next((tuple(int(x) for x in a.split("=", 1)[1].split(",")) for a in sys.argv if a.startswith("--seeds=")),
                 (42,))
    for cand in candidates:
        t0 = time.time()
        train = cand.pop("train", {})
        fold = tuple(cand.pop("fold", ()))
        runs = [run_seed(warm_only(ds, s), s + 1000, fold_steps=fold, serving=cand, train_params=train) for s in seeds]
        m = mean_over_seeds(runs)
        row = {q: (b["cfb"]["ndcg@10"], b["cfb"]["rmse"]) for q, b in m["budgets"].items()}
        fold_row = {n: (b["cfb"]["ndcg@10"], b["cfb"]["rmse"]) for n, b in m["fold_in"].items()}
        if "--baselines" in sys.argv:
            for name in ("popularity", "demographic_popularity", "average_user"):
                print(name, {q: (b[name]["ndcg@10"], b[name]["rmse"]) for q, b in m["budgets"].items()},
                      {n: b[name]["ndcg@10"] for n, b in m["fold_in"].items() if name in b})
        print(json.dumps({"serving": cand, "train": train}), row, fold_row, f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
