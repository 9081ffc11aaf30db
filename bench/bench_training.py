"""Training speed: fastai's stock collab pipeline against cfb's trainer, in one process, same split.

    python bench/bench_training.py ml100k [--data ../shared/data/ml-100k]
    python bench/bench_training.py goodbooks-like [--stock-batches 400]

Prints seconds per epoch, ratings per second, peak memory, validation RMSE, and the ratios. The stock
pipeline is ``CollabDataLoaders``' ``TabularCollab`` with ``collab_learner`` and batch size 64 (the
book's recipe); where it is too slow to finish (goodbooks-like), a fixed number of its batches is
timed and the epoch extrapolated, and the report says so."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRSS, goodbooks_like  # noqa: E402

from cfb.cf_core.split import valid_split  # noqa: E402
from cfb.db.engine import make_engine  # noqa: E402
from cfb.db.sources import Dataset, read_movielens  # noqa: E402
from cfb.service.ingest import ingest_dataset  # noqa: E402
from cfb.service.training import retrain_full  # noqa: E402


def stock_fastai(ratings: pd.DataFrame, train_idx, valid_idx, epochs: int, max_batches: int | None) -> dict:
    """The book's pipeline: TabularCollab + collab_learner, bs 64, fit_one_cycle(epochs, 5e-3, wd=0.1)."""
    from fastai.callback.core import Callback, CancelEpochException
    from fastai.collab import TabularCollab, collab_learner
    from fastai.data.block import TransformBlock
    from fastai.tabular.core import Categorify
    from fastai.torch_core import set_seed

    set_seed(42)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        df = ratings[["user", "item", "rating"]].reset_index(drop=True)
        to = TabularCollab(df, [Categorify], ["user", "item"], y_names=["rating"], y_block=TransformBlock(),
                           splits=(list(train_idx), list(valid_idx)))
        dls = to.dataloaders(bs=64)
        setup_s = time.perf_counter() - t0
        learn = collab_learner(dls, n_factors=50, y_range=(0, 5.5))

        class Clock(Callback):
            def before_fit(self):
                self.epoch_s, self.batches = [], 0

            def before_epoch(self):
                self.t0 = time.perf_counter()

            def after_batch(self):
                if self.training:
                    self.batches += 1
                    if max_batches and self.batches >= max_batches:  # time these batches only, then stop
                        self.epoch_s.append(time.perf_counter() - self.t0)
                        raise CancelEpochException()

            def after_train(self):  # (before the epoch's validation pass: cfb's epoch_s trains and validates nothing)
                if not max_batches:
                    self.epoch_s.append(time.perf_counter() - self.t0)

        clock = Clock()
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1 if max_batches else epochs, 5e-3, wd=0.1, cbs=[clock])
    n_train = len(train_idx)
    if max_batches:
        per_batch = clock.epoch_s[0] / clock.batches
        epoch_s = per_batch * len(dls.train)
        rmse, note = None, f"extrapolated from {clock.batches} of {len(dls.train)} batches"
    else:
        epoch_s = float(np.mean(clock.epoch_s))
        with learn.no_bar():
            preds, targs = learn.get_preds(dl=dls.valid)
        rmse, note = float(((preds.flatten() - targs.flatten()) ** 2).mean().sqrt()), f"{epochs} epochs"
    return {"pipeline": "fastai stock (TabularCollab, bs 64)", "setup_s": round(setup_s, 2),
            "epoch_s": round(epoch_s, 3), "ratings_per_s": round(n_train / epoch_s),
            "peak_rss_mb": round(mem.peak), "rss_rise_mb": round(mem.rise), "valid_rmse": rmse, "note": note}


def cfb_trainer(ratings: pd.DataFrame, workdir: Path, params: dict, ranker: bool) -> dict:
    """cfb: ingest into SQLite (not timed), then `retrain_full` (load from the database, fit, store)."""
    engine = make_engine(f"sqlite:///{workdir / 'bench.db'}")
    t0 = time.perf_counter()
    ingest_dataset(engine, Dataset(ratings, scale=(1.0, 5.0)))
    ingest_s = time.perf_counter() - t0
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        rep = retrain_full(engine, kind="dot", valid_pct=0.2, progress=False, ranker=ranker, **params)
        total_s = time.perf_counter() - t0
    # epochs of the served fit (every rating; the validation fit on the §7 split gives valid_rmse)
    epoch_s = float(np.mean(rep["epoch_s"]))
    return {"pipeline": f"cfb (whole-tensor batches, bs {rep['hyperparams']['bs']})", "ingest_s": round(ingest_s, 2),
            "load_s": rep["load_s"], "epoch_s": round(epoch_s, 3), "ratings_per_s": round(rep["n_ratings"] / epoch_s),
            "fit_s": rep["fit_s"], "ranker_fit_s": rep.get("ranker_fit_s"), "retrain_total_s": round(total_s, 2),
            "peak_rss_mb": round(mem.peak), "rss_rise_mb": round(mem.rise), "valid_rmse": rep["valid_rmse"],
            "epochs": rep["hyperparams"]["epochs"], "device": rep["device"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", choices=["ml100k", "goodbooks-like"])
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--stock-batches", type=int, default=None, help="time only this many stock batches")
    ap.add_argument("--stock-epochs", type=int, default=5)
    ap.add_argument("--no-ranker", action="store_true", help="cfb: skip the implicit ranking model")
    ap.add_argument("--cfb", default="{}", help='cfb trainer settings as JSON, e.g. {"bs": 16384, "lr": 0.02}')
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.dataset == "ml100k":
        ratings = read_movielens(Path(args.data)).ratings
        stock_batches = args.stock_batches
    else:
        t0 = time.perf_counter()
        ratings = goodbooks_like()
        print(f"generated {len(ratings)} synthetic ratings in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        stock_batches = args.stock_batches or 400
    train_idx, valid_idx = valid_split(len(ratings), 0.2, 42)  # protocol §7, for both pipelines
    with tempfile.TemporaryDirectory() as tmp:
        ours = cfb_trainer(ratings, Path(tmp), json.loads(args.cfb), ranker=not args.no_ranker)
    print(f"cfb: {json.dumps(ours)}", file=sys.stderr, flush=True)
    stock = stock_fastai(ratings, train_idx, valid_idx, args.stock_epochs, stock_batches)
    out = {"dataset": args.dataset, "n_ratings": len(ratings), "n_train": len(train_idx),
           "stock": stock, "cfb": ours, "epoch_speedup": round(stock["epoch_s"] / ours["epoch_s"], 1)}
    if args.json:
        print(json.dumps(out))
        return
    print(f"dataset {args.dataset}: {len(ratings)} ratings, {len(train_idx)} for training (protocol §7 split)")
    print(f"{'pipeline':<44}{'s/epoch':>9}{'ratings/s':>12}{'peak MB':>9}{'valid RMSE':>12}")
    for r in (stock, ours):
        rmse = "-" if r["valid_rmse"] is None else f"{r['valid_rmse']:.4f}"
        print(f"{r['pipeline']:<44}{r['epoch_s']:>9.3f}{r['ratings_per_s']:>12,}{r['peak_rss_mb']:>9}{rmse:>12}")
    print(f"stock: {stock['note']}; setup {stock['setup_s']} s")
    print(f"cfb: load from SQLite {ours['load_s']} s, fit {ours['fit_s']} s ({ours['epochs']} epochs), ranker "
          f"{ours['ranker_fit_s']} s, whole retrain {ours['retrain_total_s']} s on {ours['device']}")
    print(f"seconds per epoch, stock / cfb: {out['epoch_speedup']}x")


if __name__ == "__main__":
    main()
