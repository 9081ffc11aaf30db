"""Select the item prior's settings on pseudo-cold items, never on the protocol's cold items (§8).

For each protocol seed s, the real cold items of s are removed from the data altogether; a tenth of the
remaining (warm) items, chosen by ``default_rng(s + 1000)`` over their ids sorted as strings, are
pseudo-cold; a version is trained on the other warm items (cached under --cache, keyed by seed) and
every candidate prior is fitted on it and scored on the pseudo-cold items exactly as §8 scores cold
items (with the baselines on the same pseudo split).

Usage:
    python bench/tune_item_coldstart.py [--data ../shared/data/ml-100k] [--seeds 42,43,44]
        [--cache /tmp/cfb-item-tune] '{"mode": "ridge"}' '{"l2": 1e-3}' ...
(no candidate: the defaults). Each candidate after the first is also shown as its paired NDCG@10 difference
from the first on the same users (mean over seeds, ± a standard error clustered by user: the seeds share
users): pass '{}' first to compare candidates with the defaults.
"""
from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from cfb.cf_core.item_prior import ItemPriorConfig
from cfb.db.sources import Dataset, read_movielens
from cfb.evaluation.item_coldstart import METHOD_NAMES, METHODS, cold_items, mean_over_seeds, run_seed, split_dataset
from cfb.evaluation.metrics import clustered_standard_error, paired_values


def pseudo_split(ds: Dataset, seed: int) -> tuple[Dataset, set[str]]:
    """The data without seed's real cold items, and the pseudo-cold items among the rest."""
    items = sorted(ds.ratings.item.astype(str).unique().tolist())
    cold = cold_items(items, seed)
    keep = ~ds.ratings.item.astype(str).isin(cold)
    warm = Dataset(ds.ratings[keep], ds.items, ds.users, ds.scale, ds.name, step=ds.step)
    warm_items = sorted(set(items) - cold)
    rng = np.random.default_rng(seed + 1000)
    return warm, set(rng.choice(warm_items, size=len(warm_items) // 10, replace=False).tolist())


def fitted_version(warm: Dataset, pseudo: set[str], seed: int, cache: Path | None, kind: str = "dot"):  # noqa: ANN201
    from cfb.cf_core.fit import fit_model

    path = None if cache is None else cache / f"pseudo_seed{seed}{'' if kind == 'dot' else '_' + kind}.pkl"
    if path is not None and path.exists():
        return pickle.loads(path.read_bytes())
    model = fit_model(split_dataset(warm, pseudo)["td"], kind, None, seed, progress=False)[0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(model))
    return model


def pseudo_cold_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--data, --seeds and --cache: what every pseudo-cold item tuner takes."""
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--seeds", default="42,43,44", help="comma-separated")
    ap.add_argument("--cache", default=None,
                    help="keep the versions trained here (pickles) and reuse them: only while the training code does "
                         "not change (a stale folder once made a tuner measure a days-old model)")
    return ap


def main() -> None:
    torch.set_num_threads(1)
    ap = pseudo_cold_arguments(argparse.ArgumentParser())
    ap.add_argument("--kind", choices=("dot", "nn"), default="dot", help="the rating model")
    ap.add_argument("candidates", nargs="*")
    args = ap.parse_args()
    ds = read_movielens(Path(args.data))
    cands = [json.loads(c) for c in args.candidates] or [{}]
    seeds = [int(x) for x in args.seeds.split(",")]
    splits = {s: pseudo_split(ds, s) for s in seeds}
    models = {s: fitted_version(*splits[s], s, Path(args.cache) if args.cache else None, args.kind) for s in seeds}
    baselines_shown = False
    first = None
    for cand in cands:
        t0 = time.time()
        cfg = ItemPriorConfig.from_json(cand)
        runs = [run_seed(splits[s][0], s, prior_config=cfg, fitted=models[s], cold=splits[s][1]) for s in seeds]
        m = mean_over_seeds(runs)
        if not baselines_shown:
            for name in METHODS[1:]:
                print(f"{METHOD_NAMES[name]:<22} NDCG@10 {m[name]['ndcg@10']:.4f}  Rec@10 {m[name]['recall@10']:.4f}  "
                      f"RMSE {m[name]['rmse']:.4f}", flush=True)
            baselines_shown = True
        per = " ".join(f"{r['seed']}:{r['cfb']['ndcg@10']:.4f}/{r['cfb']['rmse']:.4f}" for r in runs)
        print(f"cfb {json.dumps(cand):<60} NDCG@10 {m['cfb']['ndcg@10']:.4f}  Rec@10 {m['cfb']['recall@10']:.4f}  "
              f"RMSE {m['cfb']['rmse']:.4f}  [{per}]  {time.time() - t0:.0f}s", flush=True)
        if first is None:
            first = runs
        else:  # the same users scored by both: a paired difference tells settings apart better than two means
            samples = [paired_values(r["cfb"], f["cfb"]) for r, f in zip(runs, first)]
            diff = float(np.mean([d.mean() for _, d in samples]))
            print(f"    minus the first candidate: NDCG@10 {diff:+.4f} ± {clustered_standard_error(samples):.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
