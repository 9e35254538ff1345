"""Load benchmark: the API under its own users (polling dashboards, SSE streams, submissions, lists).

    .venv/bin/python bench/load.py --mode embedded   --out bench/results/load-embedded.json
    .venv/bin/python bench/load.py --mode production --out bench/results/load-production.json

`embedded` runs `slimforge serve` on the default (SQLite + in-process worker). `production` runs
`slimforge serve --workers 2` on PostgreSQL (127.0.0.1:5432, a fresh database) + Redis
(127.0.0.1:6379, a fresh queue name) with one `slimforge worker`. Load comes from `hey` on loopback,
bounded in time. Load comes from `wrk` (bench/wrk/pollers.lua) on loopback; `hey` gives one extra
row (synchronised bursts). Scenarios (targets from issue #9, figures in docs/reliability.md):
  polling       200 pollers at 1 req/s each on GET /v1/jobs/{id}    p99 <= 50 ms, 0 errors
                (each poller starts at a random moment of the first second, as independent
                dashboards do)
  polling_many  the same 200 pollers spread over 50 different jobs  (no target; not one hot job)
  polling_burst `hey -c 200 -q 1`: 200 tickers that fire in the same few milliseconds every second
                (no target; a worst case no real fleet produces)
  saturation    200 concurrent, closed loop, same route              >= 800 req/s (production), p99 <= 1 s
  health        /healthz at 5 req/s on each of 2 connections during polling and saturation
                                                                     p99 <= 100 ms
  streams       a long job running: polling, then 500 SSE subscribers open and polling again,
                alternating 3 rounds; the ratio is of the median p99s
                                                                     polling p99 <= 2x without streams
  submissions   20 POST /v1/jobs during polling                      all 202, each job run exactly once
  lists         GET /v1/jobs?limit=50 with 10,000 jobs in the table, 10 concurrent, closed loop
                                                                     p99 <= 100 ms
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny_models import make_tiny_llama_dir  # noqa: E402

KEY = "sf_bench_key_for_load_tests"
STREAM_ROUNDS = 3
STREAM_SETTLE_SECONDS = 3.0  # after 500 streams open or close, before the next window starts
SECOND_KEY = "sf_bench_second_key_for_streams"
PG_ADMIN = os.environ.get("SLIMFORGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("SLIMFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def slimforge() -> str:
    return str(Path(sys.executable).parent / "slimforge")


POLLERS_LUA = REPO / "bench" / "wrk" / "pollers.lua"


def wrk(
    url: str, seconds: int, connections: int, period_ms: int = 0, key: str = KEY, paths: list[str] | None = None
) -> dict[str, Any]:
    """Run wrk with bench/wrk/pollers.lua; period_ms > 0: each connection sends one request per period
    (random phase), 0: closed loop; `paths`: requests take them in turn. Returns requests/s, latency
    percentiles (ms) and error counts."""
    threads = 2 if connections >= 2 else 1
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(POLLERS_LUA)]
    args += ["-H", f"Authorization: Bearer {key}", url, "--", str(period_ms), str(connections // threads)]
    args += [",".join(paths)] if paths else []
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {out[-2000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    result["errors"] = sum(result.pop("errors").values())  # connect, read, write, timeout, non-2xx/3xx
    return result


def hey(url: str, seconds: int, concurrency: int, qps: float | None = None, key: str = KEY) -> dict[str, Any]:
    """Run hey and parse its summary: requests/s, latency percentiles (ms), status codes, errors."""
    args = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-t", "10", "-H", f"Authorization: Bearer {key}"]
    if qps:
        args += ["-q", str(qps)]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    result: dict[str, Any] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct, secs in re.findall(r"^\s+(\d+)% in ([\d.]+) secs", out, re.M):
        result[f"p{pct}_ms"] = round(float(secs) * 1000, 1)
    result["status"] = {code: int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    errors = out.split("Error distribution:")[1].strip().splitlines() if "Error distribution:" in out else []
    result["errors"] = sum(int(m.group(1)) for line in errors if (m := re.match(r"\s*\[(\d+)\]", line)))
    result["non_2xx"] = sum(n for code, n in result["status"].items() if not code.startswith(("2", "3")))
    return result


class Stack:
    """The servers of one mode, started in a temp dir and stopped at the end."""

    def __init__(self, mode: str, workdir: Path, baseline: Path | None = None) -> None:
        self.mode, self.workdir, self.baseline = mode, workdir, baseline
        self.port = 18000 + os.getpid() % 1000
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pg_db: str | None = None
        models = workdir / "models"
        make_tiny_llama_dir(models / "tiny-llama")
        self.model = str(models / "tiny-llama")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMFORGE_")}
        self.env.update(
            SLIMFORGE_DATA_DIR=str(workdir / "data"),
            SLIMFORGE_BOOTSTRAP_KEY=KEY,
            SLIMFORGE_ALLOWED_MODEL_ROOTS=str(models),
            # The benchmark is one client address and one key at dashboard-fleet rates.
            SLIMFORGE_RATE_LIMIT_PER_ADDRESS="0",
            SLIMFORGE_RATE_LIMIT_PER_KEY="0",
            OMP_NUM_THREADS="1",
        )
        if baseline:  # an older checkout's code, run by this environment's interpreter
            self.env["PYTHONPATH"] = str(baseline)
        if mode == "production":
            import psycopg

            self.pg_db = f"slimforge_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_db}"')
            self.env.update(
                SLIMFORGE_DATABASE_URL=PG_ADMIN.rsplit("/", 1)[0] + f"/{self.pg_db}",
                SLIMFORGE_BROKER_URL=REDIS,
                SLIMFORGE_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:8]}",
            )

    def _spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        handle = (self.workdir / log).open("wb")
        proc = subprocess.Popen([slimforge(), *args], env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> Stack:
        serve = ["serve", "--port", str(self.port)]
        if self.mode == "production":
            subprocess.run([slimforge(), "migrate"], env=self.env, check=True, capture_output=True)
            self._spawn("worker", log="worker.log")
            serve += ["--workers", "2"]
        serve += ["--no-access-log"]  # a baseline checkout must be from after both flags (2624d98 or later)
        self._spawn(*serve, log="serve.log")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError((self.workdir / "serve.log").read_text()[-3000:])
        subprocess.run(
            [slimforge(), "create-key", "--tenant", "default", "--name", "streams"],
            env=self.env,
            check=True,
            capture_output=True,
        )
        return self

    def second_key(self) -> str:
        out = subprocess.run(
            [slimforge(), "create-key", "--tenant", "default"], env=self.env, check=True, capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.pg_db:
            import psycopg

            with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')


def job_body(model: str, seq_len: int = 16) -> dict[str, Any]:
    return {
        "model": model,
        "method": "last_k",
        "target_sparsity": 0.34,
        "calibration": {"source": "self_generated", "n_samples": 2, "seq_len": seq_len},
    }


def submit(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    try:
        return client.post("/v1/jobs", json=body)
    except httpx.HTTPError as exc:  # a frozen server (the baseline): counted as a lost submission
        return httpx.Response(599, text=str(exc))


def wait_terminal(client: httpx.Client, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            jobs = {i: client.get(f"/v1/jobs/{i}").json() for i in job_ids}
        except httpx.HTTPError:
            time.sleep(1.0)
            continue
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
            return jobs
        time.sleep(1.0)
    return jobs


def statuses(client: httpx.Client, job_ids: list[str]) -> list[str]:
    """Status (and stage) of each job, e.g. to show a window ran while the same stage ran."""
    jobs = [client.get(f"/v1/jobs/{i}").json() for i in job_ids]
    return [f"{j['status']}/{j['stage']}/{j['progress']}" for j in jobs]


def wait_status(client: httpx.Client, job_id: str, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != status:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} never reached {status}")
        time.sleep(0.5)


def running_events(client: httpx.Client, job_id: str) -> int:
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    return sum(1 for e in events if e["kind"] == "status" and e["data"]["status"] == "running")


async def hold_streams(base: str, paths: list[tuple[str, str]], ready: threading.Event, stop: threading.Event) -> int:
    """Open one raw SSE connection per (path, key), all at once; count those answered 200; hold until `stop`."""
    host, port = base.removeprefix("http://").split(":")

    async def open_one(path: str, key: str) -> asyncio.StreamWriter | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=30)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), timeout=30)
            return writer if b" 200 " in status else None
        except (OSError, TimeoutError):
            return None

    writers = [w for w in await asyncio.gather(*(open_one(p, k) for p, k in paths)) if w is not None]
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.2)
    for writer in writers:
        writer.close()
    return len(writers)


def median_round(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The window with the median polling p99 (its whole record, so its figures agree)."""
    return sorted(windows, key=lambda w: w["route"]["p99_ms"])[len(windows) // 2]


def run(mode: str, seconds: int, baseline: Path | None = None, streams_only: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"slimforge-load-{mode}-"))
    stack = Stack(mode, workdir, baseline).start()
    results: dict[str, Any] = {"mode": mode, "seconds_per_scenario": seconds, "baseline": str(baseline or "")}
    try:
        client = httpx.Client(base_url=stack.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        target = submit(client, job_body(stack.model)).json()["id"]
        wait_terminal(client, [target], 300)
        job_url = f"{stack.base}/v1/jobs/{target}"
        health_url = f"{stack.base}/healthz"
        others = [submit(client, job_body(stack.model)).json()["id"] for _ in range(49)]
        wait_terminal(client, others, 600)
        wrk(job_url, 5, 50, period_ms=100)  # warm-up: first-time code paths, connection pools

        def with_health(route_url: str, connections: int, period_ms: int) -> dict[str, Any]:
            health: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: health.update(wrk(health_url, seconds, 2, period_ms=200)))
            thread.start()
            out = wrk(route_url, seconds, connections, period_ms=period_ms)
            thread.join()
            return {"route": out, "healthz": health}

        if not streams_only:
            results["polling"] = with_health(job_url, 200, 1000)
            many = [f"/v1/jobs/{j}" for j in [target, *others]]
            results["polling_many"] = {"jobs": len(many), **wrk(job_url, seconds, 200, period_ms=1000, paths=many)}
            results["polling_burst"] = hey(job_url, seconds, 200, qps=1)
            results["saturation"] = with_health(job_url, 200, 0)

            # Submissions during polling: every one accepted, every job run exactly once.
            accepted: list[httpx.Response] = []

            def submit_during() -> None:
                for _ in range(20):
                    accepted.append(submit(client, job_body(stack.model)))
                    time.sleep(seconds / 25)

            submitter = threading.Thread(target=submit_during)
            submitter.start()
            results["polling_with_submissions"] = wrk(job_url, seconds, 200, period_ms=1000)
            submitter.join()
            ids = [r.json()["id"] for r in accepted if r.status_code == 202]
            done = wait_terminal(client, ids, 300)
            runs = {i: running_events(client, i) for i in ids}
            results["submissions"] = {
                "sent": 20,
                "accepted": len(ids),
                "codes": sorted({r.status_code for r in accepted}),
                "succeeded": sum(j.get("status") == "succeeded" for j in done.values()),
                "ran_exactly_once": sum(n == 1 for n in runs.values()),
            }

        # 500 SSE streams on jobs that stay open (a long job runs, a second waits behind it). The
        # running job costs CPU (in embedded mode inside the API process), so the comparison is
        # polling with that job running, without streams and then with them. One p99 of 3,000
        # polls moves by 2x between identical windows (measured: 1.2x-3.5x over six runs), so the
        # two conditions alternate for STREAM_ROUNDS rounds and the ratio is of the median p99s.
        # 16 x 8,000 self-generated tokens: every window falls in the same stage (calibrating), so
        # the job costs the same CPU in each and only the streams differ.
        long_body = job_body(stack.model, seq_len=8000)
        long_body["calibration"]["n_samples"] = 16
        long_ids = [submit(client, long_body).json()["id"] for _ in range(2)]
        wait_status(client, long_ids[0], "running", 120)
        keys = [KEY, stack.second_key()]
        paths = [(f"/v1/jobs/{long_ids[i % 2]}/events/stream", keys[i % 2]) for i in range(500)]
        rounds = []
        for _ in range(STREAM_ROUNDS):
            without = with_health(job_url, 200, 1000)
            without["long_jobs_after"] = statuses(client, long_ids)
            ready, stop = threading.Event(), threading.Event()
            opened: list[int] = []
            streams = hold_streams(stack.base, paths, ready, stop)
            holder = threading.Thread(target=lambda s=streams, out=opened: out.append(asyncio.run(s)))
            holder.start()
            ready.wait(300)
            time.sleep(STREAM_SETTLE_SECONDS)
            with_streams: dict[str, Any] = {"requested": len(paths), **with_health(job_url, 200, 1000)}
            stop.set()
            holder.join()
            with_streams["opened"] = opened[0] if opened else 0
            with_streams["long_jobs_after"] = statuses(client, long_ids)
            rounds.append({"without": without, "with": with_streams})
            time.sleep(STREAM_SETTLE_SECONDS)  # the closed streams' tasks end before the next window
        results["stream_rounds"] = rounds
        results["polling_job_running"] = median_round([r["without"] for r in rounds])
        results["streams"] = median_round([r["with"] for r in rounds])
        for job_id in long_ids:
            client.post(f"/v1/jobs/{job_id}/cancel")
        # The lists are measured alone: in embedded mode a job that is still decoding shares the
        # API's process (and its GIL) with them.
        ended = wait_terminal(client, long_ids, 120)

        if not streams_only:  # lists with 10,000 jobs in the table
            insert_jobs(stack, 10_000)
            results["lists"] = wrk(f"{stack.base}/v1/jobs?limit=50", seconds, 10)
            results["lists"]["long_jobs_before"] = [ended.get(i, {}).get("status") for i in long_ids]
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def insert_jobs(stack: Stack, count: int) -> None:
    """Bulk-insert finished jobs straight into the store (the API path is measured, not the inserts)."""
    from sqlalchemy import insert

    from app.db import make_engine
    from app.models import Job, new_id, utcnow
    from app.settings import Settings

    settings = Settings(
        data_dir=Path(stack.env["SLIMFORGE_DATA_DIR"]), database_url=stack.env.get("SLIMFORGE_DATABASE_URL")
    )
    engine = make_engine(settings.resolved_database_url)
    spec = {"calibration": {"source": "self_generated"}, "options": {}, "evaluation": None, "seed": 0}
    rows = [
        dict(
            id=new_id("job"),
            tenant_id="default",
            status="succeeded",
            progress=100.0,
            model=stack.model,
            method="last_k",
            target_sparsity=0.34,
            sparsity_basis="layers",
            spec=spec,
            attempts=1,
            max_attempts=2,
            created_at=utcnow(),
            updated_at=utcnow(),
            event_count=0,
        )
        for _ in range(count)
    ]
    with engine.begin() as conn:
        conn.execute(insert(Job), rows)
    if engine.dialect.name == "postgresql":
        # What autovacuum does within a minute of a bulk load; without fresh statistics the planner
        # sorts the whole table for every page (8.2 ms instead of 0.07 ms per list query).
        from sqlalchemy import text

        with engine.begin() as conn:
            conn.execute(text("ANALYZE jobs"))
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["embedded", "production"], required=True)
    parser.add_argument("--seconds", type=int, default=20, help="duration of each load scenario")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--baseline", type=Path, default=None, help="checkout of an older commit to measure instead (before/after)"
    )
    parser.add_argument(
        "--streams-only",
        action="store_true",
        help="only the streams scenario (polling with a job running, then with streams)",
    )
    args = parser.parse_args()
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get install {tool} (scripts/system-deps.sh)", file=sys.stderr)
            return 2
    results = run(args.mode, args.seconds, args.baseline, args.streams_only)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
