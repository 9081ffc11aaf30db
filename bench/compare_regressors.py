"""Which bootstrap regressor? Compare candidates on pseudo-cold users (warm users only, never the
protocol's cold users), with the same features, targets, fold-in and ranking as the product.

    python bench/compare_regressors.py [--data ../shared/data/ml-100k]

For each protocol seed (42, 43, 44) the seed's warm users are split again (seed + 1000); a model is
trained on the pseudo-warm users through `retrain_full`, each candidate is fitted to the same
simulated questionnaire answers, and each pseudo-cold user is onboarded with it at Q = 0 and Q = 30."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tune_coldstart import warm_only  # noqa: E402

from cfb.bootstrap.fit import simulated_answers  # noqa: E402
from cfb.bootstrap.regressor import RidgeBootstrap  # noqa: E402
from cfb.cf_core.foldin import fold_in_user  # noqa: E402
from cfb.cf_core.split import answer_pool_split, cold_users  # noqa: E402
from cfb.db import versions  # noqa: E402
from cfb.db.engine import make_engine  # noqa: E402
from cfb.db.sources import Dataset, read_movielens  # noqa: E402
from cfb.evaluation.coldstart import Catalogue, _top  # noqa: E402
from cfb.evaluation.metrics import ndcg_at_k  # noqa: E402
from cfb.service.ingest import ingest_dataset  # noqa: E402
from cfb.service.state import foldin_params, load_state  # noqa: E402
from cfb.service.training import load_training_data, retrain_full  # noqa: E402


def candidates() -> dict:
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.multioutput import MultiOutputRegressor
    from sklearn.neighbors import KNeighborsRegressor

    return {
        "ridge a=3": RidgeBootstrap(3.0), "ridge a=30 (cfb)": RidgeBootstrap(30.0), "ridge a=300": RidgeBootstrap(300.0),
        "kNN k=50": KNeighborsRegressor(50, weights="distance"),
        "random forest": RandomForestRegressor(100, min_samples_leaf=20, n_jobs=2, random_state=0),
        "hist gradient boosting": MultiOutputRegressor(HistGradientBoostingRegressor(max_iter=60, random_state=0)),
    }


def evaluate(ds: Dataset, seed: int, workdir: Path) -> dict:
    pseudo = warm_only(ds, seed)
    pseed = seed + 1000
    users = sorted(pseudo.ratings.user.unique().tolist())
    cold = cold_users(users, pseed)
    engine = make_engine(f"sqlite:///{workdir / f'cmp{seed}.db'}")
    keep = ~pseudo.ratings.user.isin(cold)
    ingest_dataset(engine, Dataset(pseudo.ratings[keep], ds.items, pseudo.users[~pseudo.users.user.isin(cold)], ds.scale))
    retrain_full(engine, valid_pct=0.0, progress=False, seed=pseed)
    data, user_ids, item_ids, attributes, *_ = load_training_data(engine)
    with engine.connect() as conn:
        state = load_state(conn)
        rows = versions.load_users(conn, state.version)
        cat = Catalogue(conn, state)
    encoder = state.bootstrap.encoder
    Y = np.concatenate([rows.factors, rows.bias[:, None]], axis=1)
    su, sq, sa = simulated_answers(data, encoder.questionnaire.items, rng=np.random.default_rng(pseed))
    X = np.concatenate([encoder.transform([attributes[u]], [a], budget=q) for u, q, a in zip(su, sq, sa)])
    attrs = dict(zip(ds.users.user, ds.users.attributes))
    index = {u: k for k, u in enumerate(users)}
    by_user = {u: g.sort_values("item") for u, g in pseudo.ratings[~keep].groupby("user")}
    out = {}
    for name, model in candidates().items():
        t0 = time.perf_counter()
        model.fit(X, Y[su])
        fit_s = time.perf_counter() - t0
        res = {"fit_s": round(fit_s, 2)}
        for q in (0, 30):
            asked = set(encoder.questionnaire.items[:q])
            ndcgs, se = [], []
            for u in sorted(cold):
                g = by_user[u]
                pool, test = answer_pool_split(index[u], g["item"].tolist(), pseed)
                gi = g.set_index("item")
                inner_pool = cat.index(pool)
                given = {int(i): float(gi.loc[e, "rating"]) for e, i in zip(pool, inner_pool) if i in asked}
                x = encoder.transform([attrs[u]], [given], budget=q)
                prior = model.predict(x)[0]
                items = np.array(list(given), dtype=np.int64)
                vec, bias = fold_in_user(state.scoring, items, np.array(list(given.values())), prior[:-1].astype(np.float32),
                                         float(prior[-1]), **foldin_params(state.hyperparams))
                scores = state.ranking_scores(vec, bias)
                ranked = _top(scores, np.concatenate([items, inner_pool]), cat)
                rel = set(gi.loc[test][gi.loc[test, "rating"] >= 4].index)
                if rel:
                    ndcgs.append(ndcg_at_k(ranked, rel))
                ti = cat.index(test)
                ok = ti >= 0
                se += list((state.scoring.predict_user(vec, bias, ti[ok]) - gi.loc[test, "rating"].to_numpy()[ok]) ** 2)
            res[f"Q={q}"] = (round(float(np.mean(ndcgs)), 4), round(float(np.sqrt(np.mean(se))), 4))
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    args = ap.parse_args()
    ds = read_movielens(Path(args.data))
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (42, 43, 44):
            per_seed.append(evaluate(ds, seed, Path(tmp)))
    print("pseudo-cold users, mean of seeds 42-44: (NDCG@10, RMSE)")
    print(f"{'regressor':<24}{'Q=0':>18}{'Q=30':>18}{'fit s':>8}")
    for name in per_seed[0]:
        cells = []
        for q in ("Q=0", "Q=30"):
            nd = np.mean([r[name][q][0] for r in per_seed])
            rm = np.mean([r[name][q][1] for r in per_seed])
            cells.append(f"{nd:.4f} / {rm:.4f}")
        fit = np.mean([r[name]["fit_s"] for r in per_seed])
        print(f"{name:<24}{cells[0]:>18}{cells[1]:>18}{fit:>8.2f}")


if __name__ == "__main__":
    main()
