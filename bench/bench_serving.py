"""Serving speed: a whole `cfb recommend` process (median of several runs) and one in-process call.

    python bench/bench_serving.py [--data ../shared/data/ml-100k] [--runs 15]

Builds a temporary database (MovieLens 100k, default retrain) unless --db points at one."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cfb.db.engine import make_engine
from cfb.db.sources import read_movielens
from cfb.service.ingest import ingest_dataset
from cfb.service.serving import recommend
from cfb.service.training import retrain_full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--db", help="an existing database URL with a trained model")
    ap.add_argument("--user", default="1")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db
        if not url:
            url = f"sqlite:///{Path(tmp) / 'serve.db'}"
            engine = make_engine(url)
            ingest_dataset(engine, read_movielens(Path(args.data)))
            retrain_full(engine, progress=False)
            engine.dispose()
        exe = Path(sys.executable).with_name("cfb")
        cmd = [str(exe), "--db", url, "recommend", args.user, "--json"]
        subprocess.run(cmd, check=True, capture_output=True)  # warm the OS file cache
        walls = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        bare = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - t0)
        engine = make_engine(url)
        with engine.connect() as conn:
            recommend(conn, args.user)  # loads the item factors once
            calls = []
            for _ in range(200):
                t0 = time.perf_counter()
                recommend(conn, args.user)
                calls.append(time.perf_counter() - t0)
        engine.dispose()
    out = {"process_median_s": round(statistics.median(walls), 3), "process_min_s": round(min(walls), 3),
           "python_startup_median_s": round(statistics.median(bare), 3),
           "in_process_call_median_ms": round(statistics.median(calls) * 1000, 2), "runs": args.runs}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"whole `cfb recommend {args.user}` process: median {out['process_median_s']} s "
              f"(min {out['process_min_s']} s; bare python start {out['python_startup_median_s']} s), {args.runs} runs")
        print(f"in-process recommend call (factors loaded): median {out['in_process_call_median_ms']} ms, 200 calls")


if __name__ == "__main__":
    main()
