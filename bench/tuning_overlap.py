"""How much did tuning on pseudo-cold users flatter the reported cold-start figures?

Usage: python bench/tuning_overlap.py [--data DIR] [--seeds 42,43,44] [--out FILE | --cells FILE]

Settings were chosen on pseudo-cold users: each protocol seed's warm users split again with seed +
1000, + 2000 (and, for the questionnaire's choice, + 3000, + 4000). A seed's warm users are partly the
other seeds' cold users, so some of the real cold users the protocol scores were also tuned on. This
runs the protocol (``evaluation.coldstart.run_seed``, the whole pipeline) and splits each seed's real
cold users in two: those in some seed's pseudo-cold set ("tuned on") and the others ("never seen").
If tuning had fitted its users, cfb's lead over positive popularity (paired, per user) would be larger
on the users it was tuned on. Reports, per budget and fold-in step, the lead in each group and the
difference between the groups, with standard errors clustered by user: once for the six sets most
settings were chosen on (+ 1000, + 2000) and once for all twelve. ``--out`` keeps the protocol's
per-user cells; ``--cells`` reads them back instead of running the protocol again."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse
import json
from pathlib import Path

import numpy as np

from cfb.cf_core.split import cold_users
from cfb.db.sources import read_movielens
from cfb.evaluation.coldstart import run_seed
from cfb.evaluation.metrics import PER_USER, clustered_standard_error, paired_values

TUNING_OFFSETS = {"+1000, +2000": (1000, 2000), "+1000 to +4000": (1000, 2000, 3000, 4000)}


def tuned_users(all_users: list[str], seeds: list[int], offsets: tuple[int, ...]) -> set[str]:
    """Every user in some seed's pseudo-cold tuning set (that seed's warm users split again)."""
    out: set[str] = set()
    for seed in seeds:
        cold = set(cold_users(all_users, seed))
        warm = sorted(u for u in all_users if u not in cold)
        for offset in offsets:
            out |= set(cold_users(warm, seed + offset))
    return out


def group_lead(group_cells: list[dict], keep: set[str]) -> tuple[float, float | None, int]:
    """cfb's NDCG@10 minus positive popularity's on the users in ``keep``: the mean over seeds of each
    seed's mean (as the protocol's means are made), its standard error clustered by user
    (``metrics.clustered_standard_error``, as the reported ones) and the distinct users."""
    samples = []
    for cell in group_cells:
        users, diff = paired_values(cell["cfb"], cell["positive_popularity"])
        mask = np.array([str(u) in keep for u in users], bool)
        samples.append(([u for u, k in zip(users, mask) if k], diff[mask]))
    means = [float(d.mean()) for _, d in samples if len(d)]
    distinct = {u for users, _ in samples for u in users}
    if not means:
        return float("nan"), None, 0
    return float(np.mean(means)), clustered_standard_error(samples), len(distinct)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--out", default=None, help="also write the per-seed cells as JSON")
    ap.add_argument("--cells", default=None, help="read the cells written by --out instead of running the protocol")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ds = read_movielens(Path(args.data))
    users = sorted(ds.ratings.user.astype(str).unique().tolist())
    if args.cells:
        cells = json.loads(Path(args.cells).read_text())
    else:
        cells = {}
        for seed in seeds:
            res = run_seed(ds, seed)
            for q, cell in res["budgets"].items():
                cells.setdefault(f"Q={q}", []).append(cell)
            for n, cell in res.get("fold_in", {}).items():
                cells.setdefault(f"n={n}", []).append(cell)
            print(f"seed {seed} done", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(cells))
    real_cold = {u for seed in seeds for u in cold_users(users, seed)}
    for label, offsets in TUNING_OFFSETS.items():
        tuned = tuned_users(users, seeds, offsets)
        print(f"\nseeds {seeds}, pseudo-cold sets seed {label}: {len(real_cold)} distinct real cold users, "
              f"{len(real_cold & tuned)} of them tuned on")
        print("cfb − positive popularity, NDCG@10, mean ± SE clustered by user [users]")
        print(f"{'cell':6} | {'tuned on':24} | {'never seen':24} | tuned on − never seen")
        for name, group in cells.items():
            scored = {str(u) for cell in group for u in cell["cfb"][PER_USER]["user"]}
            (m1, s1, n1) = group_lead(group, scored & tuned)
            (m2, s2, n2) = group_lead(group, scored - tuned)
            both = s1 is not None and s2 is not None  # (one seed: no user was tuned on; an empty group: no figure)
            print(f"{name:6} | {lead_shown(m1, s1, n1)} | {lead_shown(m2, s2, n2)} | "
                  + (f"{m1 - m2:+.4f} ± {np.hypot(s1, s2):.4f}" if both else "–"))


def lead_shown(mean: float, se: float | None, users: int) -> str:
    """One group's lead as the table shows it ("–" for a group without a standard error)."""
    return f"{mean:+.4f} ± {se:.4f} [{users:3}]" if se is not None else f"{'–':<17} [{users:3}]"


if __name__ == "__main__":
    main()
