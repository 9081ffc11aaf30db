"""Full retrain at real size: goodbooks-10k-shaped (6M ratings) and MovieLens-25M-shaped (25M ratings).

    python bench/bench_retrain_scale.py --shape goodbooks            # 53k users, 10k books, 6M ratings
    python bench/bench_retrain_scale.py --shape ml25m                # 162k users, 59k movies, 25M ratings
    python bench/bench_retrain_scale.py --shape goodbooks --rows 1000000 --out FILE

Writes a synthetic release in the real file layout (goodbooks v2 ``ratings.csv`` + ``books.csv`` with
authors and year; MovieLens ``ratings.csv`` + ``movies.csv`` with genres) with taste structure (each user
belongs to one of 20 taste groups whose item popularity is a Zipf law over a group-specific blend of the
global order; ratings depend on the group's affinity for the item) and popularity skew, then runs the CLI
as a user would, each command its own process, on a fresh SQLite database:

  cfb ingest … DIR --quiet --json; cfb retrain --full --valid-pct 0 --quiet --json (training and storing
  the version, without the §7 measurement; phase timings from its report, peak RSS of its largest process and
  of all its processes together); cfb recommend USER --json; cfb rate USER ITEM R + cfb retrain --quiet --json (an
  incremental retrain after one rating), also with the page cache dropped first when run as root.

Targets (issue #11, 2 cores): goodbooks-shaped full retrain < 30 s; 25M-shaped < 5 min with peak memory
< 8 GB; recommend and incremental retrain as fast as on MovieLens 100k. Synthetic data measures speed and
memory only, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

SHAPES = {  # users, items, ratings, rating values (with their shares)
    "goodbooks": (53_424, 10_000, 5_976_479, np.arange(1, 6, dtype=float)),
    "ml25m": (162_541, 59_047, 25_000_095, np.arange(1, 11) / 2),
}
GROUPS = 20


GENERATOR_SEED = 0  # the synthetic release's random draws (reported in the output)


def generate(folder: Path, shape: str, rows: int | None, seed: int = GENERATOR_SEED) -> dict:
    """Write the synthetic release; returns its size."""
    n_users, n_items, n_rows, values = SHAPES[shape]
    if rows:  # a smaller set of the same shape: users and items shrink with the ratings
        f = rows / n_rows
        n_users, n_items, n_rows = max(int(n_users * f), 50), max(int(n_items * f ** 0.5), 100), rows
    rng = np.random.default_rng(seed)
    group = rng.integers(0, GROUPS, n_users)
    act = np.exp(rng.normal(0, 0.9, n_users))
    per_user = np.maximum(np.round(act / act.sum() * n_rows * 1.3), 5).astype(np.int64)  # repeats are dropped
    per_user = np.minimum(per_user, n_items // 3)
    base_rank = rng.permutation(n_items)  # the global popularity order
    parts = []
    for g in range(GROUPS):
        users = np.flatnonzero(group == g)
        # the group's order: the global order with a random share of items moved up
        key = base_rank + rng.exponential(n_items / 8, n_items) * (rng.random(n_items) < 0.3) * -1
        order = np.argsort(key)
        p = np.empty(n_items)
        p[order] = 1.0 / np.arange(1, n_items + 1) ** 0.9
        p /= p.sum()
        counts = per_user[users]
        u = np.repeat(users, counts)
        i = rng.choice(n_items, size=len(u), p=p)
        affinity = np.zeros(n_items)
        affinity[order[: n_items // 5]] = 0.6
        parts.append(pd.DataFrame({"u": u, "i": i, "a": affinity[i]}))
    df = pd.concat(parts).drop_duplicates(["u", "i"])
    df = df.sample(n=min(n_rows, len(df)), random_state=seed).sort_values(["u", "i"], kind="stable")
    user_bias = rng.normal(0, 0.4, n_users)
    raw = 0.55 + 0.35 * (df["a"].to_numpy() + user_bias[df["u"].to_numpy()]) + rng.normal(0, 0.18, len(df))
    ratings = values[np.clip(np.round(raw * (len(values) - 1)), 0, len(values) - 1).astype(int)]
    folder.mkdir(parents=True, exist_ok=True)
    uid, iid = df["u"].to_numpy() + 1, df["i"].to_numpy() + 1
    if shape == "goodbooks":
        pd.DataFrame({"user_id": uid, "book_id": iid, "rating": ratings.astype(int)}).to_csv(
            folder / "ratings.csv", index=False)
        authors = rng.integers(0, n_items // 3, n_items)
        pd.DataFrame({"book_id": np.arange(1, n_items + 1), "goodreads_book_id": np.arange(1, n_items + 1) + 10**6,
                      "title": [f"Book {k}" for k in range(1, n_items + 1)],
                      "authors": [f"Author {a}" for a in authors],
                      "original_publication_year": rng.integers(1900, 2018, n_items)}).to_csv(
            folder / "books.csv", index=False)
    else:
        ts = rng.integers(789_652_009, 1_574_327_703, len(df))
        pd.DataFrame({"userId": uid, "movieId": iid, "rating": ratings, "timestamp": ts}).to_csv(
            folder / "ratings.csv", index=False, float_format="%.1f")
        genres = np.array(["Drama", "Comedy|Romance", "Action|Sci-Fi|Thriller", "Horror", "Animation|Children"])
        pd.DataFrame({"movieId": np.arange(1, n_items + 1),
                      "title": [f"Movie {k} ({1900 + k % 120})" for k in range(1, n_items + 1)],
                      "genres": genres[rng.integers(0, len(genres), n_items)]}).to_csv(folder / "movies.csv", index=False)
    return {"ratings": len(df), "users": int(df["u"].nunique()), "items": n_items}


def tree_rss_gb(root: int) -> float:
    """Resident memory of a process and all its descendants (Linux ``/proc``), in GB."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(pid, [])
    return total / 2**30


def cfb(url: str, *args: str, env: dict | None = None) -> tuple[float, float, float, dict | str]:
    """Run one cfb command in its own process (``env``: its environment, default ours): (seconds, peak
    RSS of its largest process in GB, peak RSS of its whole process tree in GB (sampled twice a
    second), JSON or text)."""
    exe = Path(sys.executable).with_name("cfb")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]) + ["--db", url, *args]
    t = time.perf_counter()
    # a fresh child per command: RUSAGE_CHILDREN's peak is the largest child so far, so read it in a wrapper
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr); "
               "sys.exit(r.returncode)")
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    tree_peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            tree_peak[0] = max(tree_peak[0], tree_rss_gb(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    took = time.perf_counter() - t  # (before joining the sampler, which may still be asleep)
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {stderr.strip()[-2000:]}")
    rss_gb = int(stderr.strip().splitlines()[-1]) / 2**20
    try:
        return took, rss_gb, tree_peak[0], json.loads(stdout)
    except json.JSONDecodeError:
        return took, rss_gb, tree_peak[0], stdout.strip()


def blob_mb(url: str) -> float:
    """Size of the serving version's stored arrays in MB (SQLite database)."""
    import sqlite3

    with sqlite3.connect(url.removeprefix("sqlite:///")) as con:
        (size,) = con.execute("SELECT length(a.data) FROM model_arrays a JOIN settings s ON s.key = 'serving_version' "
                              "AND a.version_id = CAST(s.value AS INTEGER) WHERE a.name = 'model.npz'").fetchone()
    return size / 2**20


def measure_serving(url: str, user: str, value: str, log) -> None:  # noqa: ANN001
    """`cfb recommend` with and without the local copy, then `cfb rate` + incremental `cfb retrain`; medians of 3."""
    from cfb.db.array_cache import CACHE_FROM_BYTES

    size = blob_mb(url)
    copied = size * 2**20 >= CACHE_FROM_BYTES
    seconds: dict[str, list[float]] = {"cached": [], "uncached": []}
    answers = []
    for _ in range(3):  # median of three of each: one process start is noisy on a shared machine
        for label, env in (("cached", None), ("uncached", {**os.environ, "CFB_MODEL_CACHE": "0"})):
            took, _, _, rec = cfb(url, "recommend", user, "-n", "10", "--json", env=env)
            seconds[label].append(took)
            answers.append(rec)
    assert all(a == answers[0] for a in answers)  # the same recommendations either way
    rec = answers[0]
    took, uncached = float(np.median(seconds["cached"])), float(np.median(seconds["uncached"]))
    how = ("mapping the local copy the retrain wrote" if copied else
           f"read from the database: under the {CACHE_FROM_BYTES >> 20} MB the local copy starts at")
    log(f"cfb recommend {user}: {took:.2f} s (process, median of 3, version {size:.1f} MB, {how}); "
        f"{uncached:.2f} s with CFB_MODEL_CACHE=0")
    incremental = []
    for k in range(3):  # a new rating, then an incremental retrain; median of three
        cfb(url, "rate", user, str(rec[0]["items"][k]["item"]), value)
        took, _, _, inc = cfb(url, "retrain", "--quiet", "--json")
        assert inc.get("mode") == "incremental", inc
        incremental.append(took)
    log(f"cfb retrain after a new rating: {float(np.median(incremental)):.2f} s (process, median of 3), "
        f"incremental, up to version {inc.get('version')}")
    cold, work = [], []
    for k in range(3, 6):  # the same from a cold page cache (root only): the database's pages read from disk
        cfb(url, "rate", user, str(rec[0]["items"][k]["item"]), value)
        if not drop_page_cache():
            return
        # the program's own files back in the cache (its imports), so that this measures the database's
        subprocess.run([sys.executable, "-c", "import cfb.cli.main, cfb.service.incremental, cfb.service.state"],
                       check=True)
        took, _, _, inc = cfb(url, "retrain", "--quiet", "--json")
        cold.append(took)
        work.append(inc["total_s"])
    log(f"cfb retrain after a new rating, page cache dropped first: {float(np.median(cold)):.2f} s "
        f"(process, median of 3; the retrain's own work {float(np.median(work)):.3f} s), up to version {inc.get('version')}")


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root); False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="goodbooks")
    ap.add_argument("--rows", type=int, default=None, help="fewer ratings, same shape")
    ap.add_argument("--keep", default=None, help="folder for the data and database (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--reference", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/ml-100k"),
                    help="a MovieLens 100k folder: recommend and incremental retrain measured on it too, beside "
                         "(default ../shared/data/ml-100k; skipped when absent)")
    a = ap.parse_args()
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="cfb-scale-"))
    try:
        run(a, tmp)
    finally:
        if not a.keep:  # (gigabytes at full size: the data, the database, the model cache)
            shutil.rmtree(tmp, ignore_errors=True)


def run(a: argparse.Namespace, tmp: Path) -> None:
    """The bench, its data and database in ``tmp``."""
    os.environ["CFB_HOME"] = str(tmp / "home")  # the commands' model cache
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    log(f"# cfb full retrain at size, {a.shape}-shaped synthetic data, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log(f"# machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load avg {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    shape = generate(tmp / "data", a.shape, a.rows, seed=GENERATOR_SEED)
    log(f"generated {shape} (generator seed {GENERATOR_SEED}) in {time.perf_counter() - t:.1f} s")
    url = f"sqlite:///{tmp / 'cfb.db'}"
    kind = "goodbooks" if a.shape == "goodbooks" else "movielens"
    took, rss, _, out = cfb(url, "ingest", kind, str(tmp / "data"), "--quiet", "--json")
    log(f"ingest: {took:.1f} s ({shape['ratings'] / took:,.0f} ratings/s), peak RSS {rss:.2f} GB")
    took, rss, tree, rep = cfb(url, "retrain", "--full", "--valid-pct", "0", "--quiet", "--json")
    phases = {k: rep.get(k) for k in ("load_s", "fit_s", "bootstrap_s", "item_prior_rating_s", "ranker_fit_s",
                                      "item_prior_s")}
    log(f"full retrain: {took:.1f} s wall (process), peak RSS {rss:.2f} GB (largest process), "
        f"{tree:.2f} GB (all its processes); phases (s): {phases}; ranker beside the rating model: "
        f"{bool(rep.get('side_by_side'))}; rating model: bs {rep['hyperparams'].get('bs')}, "
        f"epochs {rep['hyperparams'].get('epochs')}  (load avg {os.getloadavg()[0]:.2f})")
    measure_serving(url, "1", str(float(SHAPES[a.shape][3][-1])), log)
    if a.reference and Path(a.reference, "u.data").exists():  # the same measurements on MovieLens 100k, now
        ref = f"sqlite:///{tmp / 'ml100k.db'}"
        cfb(ref, "ingest", "movielens", a.reference, "--quiet", "--json")
        took, _, _, _ = cfb(ref, "retrain", "--full", "--valid-pct", "0", "--quiet", "--json")
        log(f"reference: MovieLens 100k (folder {Path(a.reference).name}), full retrain {took:.1f} s")
        measure_serving(ref, "1", "5.0", log)
    elif a.reference:
        log(f"reference: no MovieLens 100k at {a.reference} (u.data missing); not measured")
    log("targets: goodbooks-shaped full retrain < 30 s; 25M-shaped < 300 s and < 8 GB peak")
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
