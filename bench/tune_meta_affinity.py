"""Choose the metadata affinity's shrinkage and weight (``ServingConfig.metadata_affinity_*``) on
pseudo-cold items (those of ``tune_item_coldstart.py``, never the protocol's cold items).

Each seed's version is trained without its pseudo-cold items, which are then added from their
metadata alone (``metadata_rows`` + ``add_items``, as `cfb retrain` adds a new item); every trained
user's predicted ratings of them, with their affinity computed from their training ratings through
``TrainedModel.metadata_affinity`` / ``predict``, are scored by RMSE on their real ratings (pooled
over seeds 42-44). Weight 0 is the version without the term.

Measured (ml-100k): weight 0: 0.9885; (shrink, weight) = (1, 1) 0.9808, (2, 1) 0.9806, (3, 1) 0.9806,
(5, 1) 0.9808 (adopted: the most shrinkage of the flat optimum), (5, 0.5) 0.9833, (5, 1.5) 0.9811,
(5, 2) 0.9843, (10, 1) 0.9814, (20, 1) 0.9824, (50, 1) 0.9841, (100, 1) 0.9853.

Usage: PYTHONPATH=bench python bench/tune_meta_affinity.py [--data ../shared/data/ml-100k] [--cache DIR]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from cfb.cf_core.model import UserVector
from cfb.db.sources import read_movielens
from cfb.evaluation.item_coldstart import split_dataset
from cfb.cf_core.fit import encoded_metadata

from tune_item_coldstart import fitted_version, pseudo_cold_arguments, pseudo_split

GRID = [(5.0, 0.0), (1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (5.0, 1.0), (5.0, 0.5), (5.0, 1.5), (5.0, 2.0),
        (10.0, 1.0), (20.0, 1.0), (50.0, 1.0), (100.0, 1.0)]


def squared_errors(model, sp: dict, shrink: float, weight: float) -> tuple[float, int]:  # noqa: ANN001
    """(sum of squared errors, count) of the trained users' predicted ratings of the pseudo-cold items."""
    td = sp["td"]
    if model.item_meta is None:  # (a version cached by an older cfb)
        model = replace(model, item_meta=encoded_metadata(model.item_prior, td.item_attributes))
    model = replace(model, config=replace(model.config, metadata_affinity_shrink=shrink,
                                          metadata_affinity_weight=weight))
    rows, ranker_rows = model.metadata_rows(sp["cold_attrs"])
    grown = model.add_items(sp["cold_db"], rows, ranker_rows)
    cold_inner = grown.item_index(sp["cold_db"])
    col = {c: k for k, c in enumerate(sp["cold_items"])}
    cr = sp["cold_ratings"]
    cr_user = cr.user.map(sp["uid"]).to_numpy(np.int64)
    cr_item = cold_inner[cr.item.map(col).to_numpy(np.int64)]
    truth = cr.rating.to_numpy(float)
    order = np.argsort(td.data.users, kind="stable")
    bounds = np.searchsorted(td.data.users[order], np.arange(td.data.n_users + 1))
    sse, n = 0.0, 0
    for db_u in np.unique(cr_user):
        pos = int(np.searchsorted(td.user_ids, db_u))
        if pos >= len(td.user_ids) or td.user_ids[pos] != db_u:
            continue
        mine = order[bounds[pos]:bounds[pos + 1]]
        vec, bias = grown.user_factors[pos], float(grown.user_bias[pos])
        user = UserVector(vec, bias, meta_affinity=grown.metadata_affinity(td.data.items[mine], td.data.ratings[mine],
                                                                            vec, bias))
        rows_u = cr_user == db_u
        sse += float(((grown.predict(user, cr_item[rows_u]) - truth[rows_u]) ** 2).sum())
        n += int(rows_u.sum())
    return sse, n


def main() -> None:
    args = pseudo_cold_arguments(argparse.ArgumentParser()).parse_args()
    ds = read_movielens(Path(args.data))
    totals = {g: [0.0, 0] for g in GRID}
    for seed in [int(s) for s in args.seeds.split(",")]:
        warm, pseudo = pseudo_split(ds, seed)
        model = fitted_version(warm, pseudo, seed, Path(args.cache) if args.cache else None)
        sp = split_dataset(warm, pseudo)
        for g in GRID:
            sse, n = squared_errors(model, sp, *g)
            totals[g][0] += sse
            totals[g][1] += n
    print("shrink, weight | RMSE (ratings)")
    for g, (sse, n) in totals.items():
        print(f"{g} | {np.sqrt(sse / n):.4f} ({n})")


if __name__ == "__main__":
    main()
