"""Ratings-ingest speed on a MovieLens-25M-shaped release (synthetic rows, the real file layout).

    python bench/bench_ingest.py [--rows 3000000] [--db sqlite:///...] [--keep DIR | --data DIR] [--json]

Writes ``ratings.csv`` (``userId,movieId,rating,timestamp``, half stars, sorted by user then movie, as
the release) and ``movies.csv`` into a temporary folder, with a realistic skew: movie popularity
follows a Zipf law, user activity a log-normal with at least 20 ratings per user (25M: 162k users,
62k movies, 25M ratings). Then it times

- the whole ``cfb ingest movielens DIR --quiet --json`` process into a fresh SQLite database, and
- the same ingest in this process, phase by phase: reading the files, ``store.ensure_ids`` (users
  and items) and ``ratings_io.write_ratings`` (into ``--db``: a temporary SQLite file, or e.g. an empty
  PostgreSQL database), then reading every rating back as a full retrain does (``read_back``),

and prints ratings per second for each (the target is >= 500k ratings/s for the whole ingest), with
the CLI process's CPU time and peak memory and the load average (on a shared machine, wall time
counts other jobs' time too).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HALF_STARS = np.arange(1, 11) / 2
# share of each half-star value in MovieLens 25M (0.5 .. 5.0), rounded
STAR_SHARE = np.array([1.6, 3.3, 1.7, 6.8, 4.9, 19.6, 12.8, 26.6, 8.8, 13.9])


def generate(folder: Path, rows: int, seed: int = 0) -> dict:
    """Write a 25M-shaped ratings.csv and movies.csv with about ``rows`` ratings; returns their shape."""
    rng = np.random.default_rng(seed)
    n_users = max(rows // 154, 10)  # 25M: 154 ratings per user on average
    n_items = int(min(62_423, max(rows // 400, 2_000)))
    # movie popularity: Zipf over a random order of the ids
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.05
    pop /= pop.sum()
    item_ids = rng.permutation(np.arange(1, n_items + 1))
    # user activity: log-normal, at least 20 ratings, scaled to about ``rows`` in all
    act = np.exp(rng.normal(0, 1.1, n_users))
    pairs = pd.DataFrame({"userId": [], "movieId": []}, dtype=np.int64)
    for _ in range(6):  # popular movies repeat within a user: top up until about ``rows`` distinct pairs
        missing = rows - len(pairs)
        if missing < rows * 0.01:
            break
        counts = np.maximum(20 if pairs.empty else 0, np.round(act / act.sum() * missing * 1.1)).astype(np.int64)
        counts = np.minimum(counts, n_items // 2)
        users = np.repeat(np.arange(1, n_users + 1), counts)
        items = item_ids[rng.choice(n_items, size=len(users), p=pop)]
        pairs = pd.concat([pairs, pd.DataFrame({"userId": users, "movieId": items})]).drop_duplicates()
    pairs = pairs.iloc[:rows]
    pairs = pairs.sort_values(["userId", "movieId"], kind="stable").reset_index(drop=True)
    n = len(pairs)
    pairs["rating"] = rng.choice(HALF_STARS, size=n, p=STAR_SHARE / STAR_SHARE.sum())
    pairs["timestamp"] = rng.integers(789_652_009, 1_574_327_703, size=n)
    folder.mkdir(parents=True, exist_ok=True)
    pairs.to_csv(folder / "ratings.csv", index=False, float_format="%.1f")
    movies = pd.DataFrame({"movieId": np.arange(1, n_items + 1),
                           "title": [f"Movie {i}, The ({1900 + i % 120})" for i in range(1, n_items + 1)],
                           "genres": rng.choice(["Drama", "Comedy|Romance", "Action|Sci-Fi|Thriller",
                                                 "(no genres listed)"], size=n_items)})
    movies.to_csv(folder / "movies.csv", index=False)
    return {"ratings": n, "users": int(pairs["userId"].nunique()), "items": n_items,
            "ratings_csv_mb": round((folder / "ratings.csv").stat().st_size / 2**20, 1)}


def timed_cli(folder: Path, url: str) -> tuple[dict, dict]:
    """({seconds, cpu_s, peak_rss_mib}, the command's JSON output) of one `cfb ingest movielens`."""
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd + ["--db", url, "ingest", "movielens", str(folder), "--quiet", "--json"],
                         capture_output=True, text=True)
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"cfb ingest failed: {res.stderr.strip()}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return ({"seconds": round(took, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": after.ru_maxrss // 1024},
            json.loads(res.stdout))


def describe(folder: Path) -> dict:
    """The shape of a release written before."""
    ratings = pd.read_csv(folder / "ratings.csv", usecols=["userId", "movieId"])
    return {"ratings": len(ratings), "users": int(ratings["userId"].nunique()),
            "items": len(pd.read_csv(folder / "movies.csv", usecols=["movieId"])),
            "ratings_csv_mb": round((folder / "ratings.csv").stat().st_size / 2**20, 1)}


def timed_phases(folder: Path, url: str) -> dict:
    from cfb.db import ratings_io, store
    from cfb.db.engine import make_engine
    from cfb.db.sources import read_movielens
    from cfb.service.ingest import ingest_dataset
    from cfb.service.training import load_training_data

    spent: dict[str, float] = {"ensure_ids": 0.0, "write_ratings": 0.0}

    def timer(name, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapped

    t = time.perf_counter()
    ds = read_movielens(folder)
    spent["read"] = time.perf_counter() - t
    engine = make_engine(url, bulk=True)  # as `cfb ingest` does
    orig = store.ensure_ids, ratings_io.write_ratings
    store.ensure_ids, ratings_io.write_ratings = timer("ensure_ids", orig[0]), timer("write_ratings", orig[1])
    try:
        t = time.perf_counter()
        res = ingest_dataset(engine, ds)
        spent["ingest_total"] = time.perf_counter() - t
        if res["new_ratings"] != res["ratings"]:  # (a database already holding them: a re-ingest, not a load)
            raise SystemExit(f"--db {url} already held {res['ratings'] - res['new_ratings']:,} of these ratings: "
                             "the bench times a first ingest, give an empty database")
    finally:
        store.ensure_ids, ratings_io.write_ratings = orig
        engine.dispose()
    spent["other"] = spent["ingest_total"] - spent["ensure_ids"] - spent["write_ratings"]
    engine = make_engine(url)
    try:  # what a full retrain then reads: every rating, as arrays
        t = time.perf_counter()
        load_training_data(engine)
        spent["read_back"] = time.perf_counter() - t
    finally:
        engine.dispose()
    return {k: round(v, 2) for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000, help="about this many ratings")
    ap.add_argument("--db", help="database URL for the in-process run (default: a temporary SQLite file)")
    ap.add_argument("--keep", type=Path, help="write the generated release here and keep it")
    ap.add_argument("--data", type=Path, help="time this release (e.g. one written by --keep) instead")
    ap.add_argument("--no-cli", action="store_true", help="skip the whole-process run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cfb-bench-ingest-"))
    try:
        folder = args.data or args.keep or tmp / "ml-25m-shaped"
        t = time.perf_counter()
        shape = describe(folder) if args.data else generate(folder, args.rows, args.seed)
        out: dict = {"shape": shape, "generator_seed": None if args.data else args.seed,
                     "generate_s": round(time.perf_counter() - t, 1)}
        n = shape["ratings"]
        if not args.no_cli:
            load = os.getloadavg()
            cli, res = timed_cli(folder, f"sqlite:///{tmp / 'cli.db'}")
            assert res["ratings"] == n, res
            out["cli"] = {**cli, "ratings_per_s": int(n / cli["seconds"]),
                          "load_average": [round(x, 2) for x in (*load, *os.getloadavg())]}
            (tmp / "cli.db").unlink(missing_ok=True)
        phases = timed_phases(folder, args.db or f"sqlite:///{tmp / 'phases.db'}")
        out["phases_s"] = phases
        out["ratings_per_s"] = {k: int(n / v) for k, v in phases.items() if v > 0 and k != "other"}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{n:,} ratings, {shape['users']:,} users, {shape['items']:,} movies "
                  f"({shape['ratings_csv_mb']} MiB ratings.csv"
                  + ("" if args.data else f"; generator seed {args.seed}") + ")")
            if "cli" in out:
                cli = out["cli"]
                print(f"cfb ingest movielens (whole process): {cli['seconds']} s, {cli['ratings_per_s']:,} ratings/s "
                      f"(CPU {cli['cpu_s']} s, peak RSS {cli['peak_rss_mib']:,} MiB; load average before "
                      f"{'/'.join(map(str, cli['load_average'][:3]))}, after {'/'.join(map(str, cli['load_average'][3:]))})")
            for k, v in phases.items():
                rate = out["ratings_per_s"].get(k)
                print(f"  {k:<14} {v:>7.2f} s" + (f"  ({rate:,} ratings/s)" if rate else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
