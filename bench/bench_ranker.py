"""What the cold-start ranker costs per simulated user, on a database's ratings, one CPU thread.

    python bench/bench_ranker.py --db sqlite:///DB [--user-epochs 40000] '{}' '{"users_per_batch": 1024}' ...

Reads every rating as a full retrain does, makes the questionnaire, then fits ``FeatureUserModel`` once
per candidate (JSON overrides of ``FeatureModelConfig``), each with ``max_user_epochs`` set to
``--user-epochs`` so that a run takes seconds rather than the full retrain's minute, and prints the fit
time, the simulated users trained on (epochs × users per epoch × samples per user), the time per
simulated user and the last training loss. Candidates run one after the other in this process, the
first again at the end, so that the machine's drift shows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cfb.bootstrap.fit import make_questionnaire  # noqa: E402
from cfb.cf_core.feature_model import FeatureModelConfig, FeatureUserModel  # noqa: E402
from cfb.db.engine import make_engine  # noqa: E402
from cfb.service.training import load_training_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--user-epochs", type=int, default=40_000, help="max_user_epochs of every candidate")
    ap.add_argument("candidates", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(1)
    td, read_s = load_training_data(make_engine(a.db))
    q = make_questionnaire(td.data, td.item_ids, td.attributes, scale=td.scale, tie=td.item_tie)
    args = (td.data, td.timestamps, td.attributes, q.questions, list(np.searchsorted(td.item_ids, q.items)), td.scale)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, one torch thread, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print(f"# {len(td.data):,} ratings, {td.data.n_users:,} users, {td.data.n_items:,} items (read in {read_s:.1f} s); "
          f"max_user_epochs {a.user_epochs:,}")
    cands = [json.loads(c) for c in a.candidates] or [{}]
    for cand in cands + cands[:1]:
        cfg = dataclasses.replace(FeatureModelConfig(), **{"max_user_epochs": a.user_epochs, **cand})
        model = FeatureUserModel(cfg, progress=False).fit(*args)
        n = cfg.epochs_for(td.data.n_users) * cfg.users_per_epoch(td.data.n_users) * cfg.samples_per_user
        print(f"{json.dumps(cand):<40} fit {model.fit_s_:6.2f} s  {n:,} simulated users  "
              f"{model.fit_s_ / n * 1e3:.3f} ms each  last loss {model.train_loss_[-1]:.4f}  "
              f"(load avg {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
