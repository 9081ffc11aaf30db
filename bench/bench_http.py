"""`cfb serve` under load, on MovieLens 100k (CPU).

    python bench/bench_http.py                       # ingest + full retrain into a temp SQLite db (~1 min)
    python bench/bench_http.py --db /tmp/ml.db       # reuse a trained database (created there if missing)
    python bench/bench_http.py --out docs/bench/http_cpu.txt

For each server configuration (``--workers``, default 1 and 2 processes) it starts
``cfb --db URL serve`` on a free 127.0.0.1 port and measures, with 16 concurrent clients:

* ``GET /users/{user}/recommendations?n=10`` over every MovieLens user in turn (943 users, so most
  requests repeat a user whose answer the server keeps while nothing of theirs changed; the row
  "no answer cache" computes every one):
  - closed loop (each client sends its next request when the last is answered): requests/s, p50, p99.
    By Little's law the latency here is clients / throughput, so it shows queueing, not service time;
  - paced (each client waits so that the 16 together offer ``--rate`` requests/s, 300 and 600 by
    default): p50, p99 at a load the server keeps up with: the latency a user sees at that load;
  - (1 worker) closed loop while one more client posts ``--write-rate`` ratings/s (20 by default) to
    the same server: after each write the server confirms a cached answer with a database read again;
* ``POST /users`` (a signup with 4 attribute answers and 10 ratings): p50, p99, one client at a time;
* ``POST /users/{user}/ratings``: p50, one client at a time;

and beside it the wall time of one ``cfb recommend`` process and of ``serving.recommend`` in process.
Load comes from ``wrk`` (Debian package) when installed, else from an asyncio httpx loop; both are
bounded in time (``--duration``) and the httpx loop also in count. The machine is shared: the load
average is printed with every measurement."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"
CFB = [sys.executable, "-m", "cfb.cli"]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def prepare(db: Path, data: Path, log) -> str:  # noqa: ANN001
    url = f"sqlite:///{db}"
    if db.exists():
        log(f"reusing {db}")
        return url
    import torch

    torch.set_num_threads(1)
    from cfb.db.engine import make_engine
    from cfb.db.sources import read_movielens
    from cfb.service.ingest import ingest_dataset
    from cfb.service.training import retrain_full

    engine = make_engine(url)
    t0 = time.perf_counter()
    out = ingest_dataset(engine, read_movielens(data))
    t1 = time.perf_counter()
    report = retrain_full(engine, progress=False)
    t2 = time.perf_counter()
    engine.dispose()
    log(f"prepared {db}: ingest {out['ratings']} ratings in {t1 - t0:.1f} s, full retrain (version "
        f"{report['version']}) in {t2 - t1:.1f} s")
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``cfb --db URL serve --port P --workers W`` as a child process (its own process group)."""

    def __init__(self, url: str, workers: int, env_extra: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env_extra or {})}
        self.proc = subprocess.Popen(CFB + ["--db", url, "serve", "--port", str(self.port), "--workers", str(workers),
                                            "--log-level", "warning"], env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cfb serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("cfb serve did not start in 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its worker processes
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


# --- load generators ---------------------------------------------------------------------------
WRK_SCRIPT = """
local users = {%s}
local n = math.random(#users)
local pause = %s
request = function()
  n = n %% #users + 1
  return wrk.format("GET", "/users/" .. users[n] .. "/recommendations?n=10")
end
if pause > 0 then
  delay = function() return pause end
end
"""


def wrk_run(base: str, users: list[str], clients: int, duration: float, pause_ms: float, tmp: Path) -> dict:
    script = tmp / f"recs_{pause_ms:g}.lua"
    script.write_text(WRK_SCRIPT % (", ".join(json.dumps(u) for u in users), pause_ms))
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{duration:g}s", "--latency", "-s", str(script), base],
                         capture_output=True, text=True, timeout=duration + 60).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"tool": "wrk", "requests": int(total.group(1)) if total else 0, "rps": float(rps.group(1)) if rps else 0.0,
            "p50_ms": ms("50"), "p99_ms": ms("99"), "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else ""}


async def _httpx_load(base: str, users: list[str], clients: int, duration: float, pause_ms: float,
                      max_requests: int) -> dict:
    import httpx

    lat: list[float] = []
    bad = 0
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        t_end = time.perf_counter() + duration

        async def worker(k: int) -> None:
            nonlocal bad, sent
            n = k * 37
            while time.perf_counter() < t_end and sent < max_requests:
                sent += 1
                n += 1
                t0 = time.perf_counter()
                r = await client.get(f"/users/{users[n % len(users)]}/recommendations", params={"n": 10})
                lat.append((time.perf_counter() - t0) * 1e3)
                bad += r.status_code != 200
                if pause_ms:
                    await asyncio.sleep(pause_ms / 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"tool": "httpx", "requests": len(lat), "rps": len(lat) / wall, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "non_2xx": bad, "socket_errors": ""}


def load(base: str, users: list[str], clients: int, duration: float, pause_ms: float, tmp: Path,
         max_requests: int) -> dict:
    if shutil.which("wrk"):
        return wrk_run(base, users, clients, duration, pause_ms, tmp)
    return asyncio.run(_httpx_load(base, users, clients, duration, pause_ms, max_requests))


class RatingWriter:
    """A thread posting ``rate`` ratings/s (one user, every MovieLens 100k item in turn) until ``stop``."""

    USER = "bench-writer"

    def __init__(self, base: str, rate: float):
        import threading

        self.base, self.rate, self.latencies = base, rate, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base, timeout=30) as c:
            c.post("/users", json={"user": self.USER, "answers": {}})  # 201, or 409 from an earlier run
            k = 0
            while not self.done.is_set():
                t0 = time.perf_counter()
                r = c.post(f"/users/{self.USER}/ratings", json={"item": str(k % 1682 + 1), "rating": 1 + k % 5})
                self.latencies.append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 201, r.text
                k += 1
                self.done.wait(max(0.0, 1 / self.rate - (time.perf_counter() - t0)))

    def stop(self, seconds: float) -> str:
        self.done.set()
        self.thread.join(timeout=60)
        lat = self.latencies
        return (f"{len(lat) / seconds:.1f} ratings/s posted, p50 {pct(lat, 50):.2f} ms, "
                f"p99 {pct(lat, 99):.2f} ms")


def signups(base: str, count: int, seed: int = 0) -> dict:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=30) as c:
        q = c.get("/questionnaire", params={"budget": 30}).json()
        cats = {a["name"]: a.get("values") for a in q["attributes"]}
        items = [i["item"] for i in q["items"]]
        lat, rate_lat = [], []
        for k in range(count):
            answers = {}
            for name, values in cats.items():
                if values:
                    answers[name] = rng.choice(values)
                elif name == "age":
                    answers[name] = rng.randint(15, 70)
                else:
                    answers[name] = f"{rng.randint(10000, 99999)}"
            ratings = {i: rng.randint(1, 5) for i in rng.sample(items, 10)}
            t0 = time.perf_counter()
            r = c.post("/users", json={"answers": answers, "ratings": ratings})
            lat.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 201, r.text
            user = r.json()["user"]
            t0 = time.perf_counter()
            r = c.post(f"/users/{user}/ratings", json={"item": rng.choice(items), "rating": rng.randint(1, 5)})
            rate_lat.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 201, r.text
    return {"signups": count, "signup_p50_ms": pct(lat, 50), "signup_p99_ms": pct(lat, 99),
            "rating_p50_ms": pct(rate_lat, 50), "rating_p99_ms": pct(rate_lat, 99)}


def cli_recommend_time(url: str, runs: int = 5) -> dict:
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(CFB + ["--db", url, "recommend", "1", "-n", "10", "--json"], check=True,
                       capture_output=True, timeout=120)
        walls.append(time.perf_counter() - t0)
    from cfb.db.engine import make_engine
    from cfb.service.serving import recommend

    engine = make_engine(url)
    with engine.connect() as conn:
        recommend(conn, "1", 10)
        t0 = time.perf_counter()
        for u in range(1, 201):
            recommend(conn, str(u), 10)
        per_call = (time.perf_counter() - t0) / 200
    engine.dispose()
    return {"cli_process_s_median": statistics.median(walls), "cli_process_s_min": min(walls),
            "in_process_ms": per_call * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--db", type=Path, help="SQLite file to reuse (created and trained there if missing)")
    ap.add_argument("--workers", default="1,2", help="server processes to measure, comma-separated")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    ap.add_argument("--rate", default="300,600", help="offered requests/s (all clients together) of the paced runs")
    ap.add_argument("--max-requests", type=int, default=200_000, help="bound of the httpx load loop")
    ap.add_argument("--write-rate", type=float, default=20.0,
                    help="ratings/s posted during the 'ratings posted meanwhile' run (0: no such run)")
    ap.add_argument("--signups", type=int, default=200)
    ap.add_argument("--threadpool", action="store_true",
                    help="also measure recommendations computed in the thread pool (CFB_HTTP_READS=thread)")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()

    lines: list[str] = []

    def log(msg: str = "") -> None:
        print(msg, flush=True)
        lines.append(msg)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    log(f"# cfb serve on MovieLens 100k, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log(f"# machine: {os.cpu_count()} CPUs ({cpu}), shared with other jobs (load average at start: {loadavg()}); "
        f"Python {platform.python_version()}")
    log(f"# command: python bench/bench_http.py {' '.join(sys.argv[1:])}")
    log(f"# load generator: {'wrk (1 thread)' if shutil.which('wrk') else 'asyncio httpx'}, "
        f"{args.clients} concurrent clients, {args.duration:g} s per run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db = args.db or tmp / "ml100k.db"
        url = prepare(db, args.data, log)
        users = [str(u) for u in range(1, 944)]
        # (name, server processes, server environment, ratings/s posted during the closed loop)
        configs = [(f"{w} worker{'s' if int(w) > 1 else ''}", int(w), {}, 0.0)
                   for w in args.workers.split(",") if w.strip()]
        configs.insert(1, ("1 worker, no answer cache", 1, {"CFB_HTTP_CACHE": "0"}, 0.0))
        if args.write_rate > 0:
            configs.insert(2, (f"1 worker, {args.write_rate:g} ratings/s", 1, {}, args.write_rate))
        if args.threadpool:
            configs.append(("1 worker, thread pool", 1, {"CFB_HTTP_READS": "thread"}, 0.0))
        notes = []
        log("")
        log("GET /users/{user}/recommendations?n=10 (every user in turn)")
        log(f"{'server':<27}{'mode':<22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'requests':>10}{'errors':>8}  load avg")
        results = {}
        for name, workers, env, write_rate in configs:
            server = Server(url, workers, env)
            try:  # warm up (the model loads in each worker), then measure
                load(server.base, users, args.clients, min(3.0, args.duration), 0, tmp, args.max_requests)
                writer = RatingWriter(server.base, write_rate) if write_rate else None
                closed = load(server.base, users, args.clients, args.duration, 0, tmp, args.max_requests)
                runs = [("closed loop" + (" + writes" if writer else ""), closed, loadavg())]
                rates = [float(r) for r in args.rate.split(",") if r.strip()]
                if writer is not None:  # the closed loop alone
                    notes.append(f"{name}: during the closed loop, {writer.stop(args.duration)}")
                    rates = []
                for rate in rates:
                    paced = load(server.base, users, args.clients, args.duration, args.clients / rate * 1e3, tmp,
                                 args.max_requests)
                    runs.append((f"paced {rate:g}/s offered", paced, loadavg()))
                results[name] = {mode: r for mode, r, _ in runs}
                for mode, r, avg in runs:
                    log(f"{name:<27}{mode:<22}{r['rps']:>8.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                        f"{r['requests']:>10}{r['non_2xx']:>8}  {avg}")
                if name == "1 worker":
                    results[name]["signups"] = {**signups(server.base, args.signups), "load": loadavg()}
            finally:
                server.stop()
        for note in notes:
            log(note)
        one = results.get("1 worker", {}).get("signups")
        if one:
            log("")
            log(f"POST /users (4 answers + 10 ratings), one client, {one['signups']} signups: "
                f"p50 {one['signup_p50_ms']:.2f} ms, p99 {one['signup_p99_ms']:.2f} ms")
            log(f"POST /users/{{user}}/ratings, one client: p50 {one['rating_p50_ms']:.2f} ms, "
                f"p99 {one['rating_p99_ms']:.2f} ms   (load avg {one['load']})")
        c = cli_recommend_time(url)
        log("")
        log(f"for comparison: `cfb recommend 1 -n 10 --json` as a process: median {c['cli_process_s_median']:.2f} s "
            f"(min {c['cli_process_s_min']:.2f} s); serving.recommend in process: {c['in_process_ms']:.2f} ms per call")
        log("")
        log("targets: p50 < 5 ms, p99 < 25 ms, >= 1000 req/s, signup p50 < 20 ms")
        log("note: in the closed loop every client always has a request in flight, so p50 ~ clients / (req/s)")
        log(f"(Little's law: {args.clients} clients at 1000 req/s wait ~{args.clients / 1000 * 1e3:.0f} ms); "
            "the paced rows are the latency at a load the server keeps up with.")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
        print(json.dumps(results, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
