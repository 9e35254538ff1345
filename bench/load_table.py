"""Markdown table of bench/load.py results, one column per results file (for docs/reliability.md).

.venv/bin/python bench/load_table.py bench/results/load-embedded.json bench/results/load-production.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def latency(run: dict[str, Any]) -> str:
    errors = run.get("errors", 0)
    return f"{run['rps']:.0f} req/s, p50 {run['p50_ms']:.1f} ms, **p99 {run['p99_ms']:.1f} ms**, {errors} errors"


def round_ratios(result: dict[str, Any]) -> str:
    """Each alternating round's own with/without p99 ratio, where the run recorded rounds."""
    rounds = result.get("stream_rounds") or []
    ratios = [r["with"]["route"]["p99_ms"] / r["without"]["route"]["p99_ms"] for r in rounds]
    return f"; rounds {', '.join(f'{x:.2f}x' for x in ratios)}" if ratios else ""


def rows(result: dict[str, Any]) -> dict[str, str]:
    streams, running = result["streams"], result["polling_job_running"]
    ratio = streams["route"]["p99_ms"] / running["route"]["p99_ms"]
    subs = result["submissions"]
    return {
        "polling: 200 pollers x 1 req/s, one job (p99 <= 50 ms, 0 errors)": latency(result["polling"]["route"]),
        "polling, the 200 pollers over 50 jobs": latency(result["polling_many"]),
        "polling, `hey -q 1` synchronised bursts of 200": latency(result["polling_burst"]),
        "/healthz during polling (p99 <= 100 ms)": latency(result["polling"]["healthz"]),
        "saturation: 200 concurrent, closed loop (>= 800 req/s, p99 <= 1 s)": latency(result["saturation"]["route"]),
        "/healthz during saturation (p99 <= 100 ms)": latency(result["saturation"]["healthz"]),
        "polling while a long job runs, no streams": latency(running["route"]),
        "the same with 500 SSE streams open (p99 <= 2x)": f"{streams['opened']} opened; "
        + latency(streams["route"])
        + f" (**{ratio:.2f}x**{round_ratios(result)})",
        "20 submissions during polling (all succeed, each once)": f"{subs['accepted']}/{subs['sent']} accepted, "
        f"{subs['succeeded']} succeeded, {subs['ran_exactly_once']} ran exactly once",
        "`GET /v1/jobs?limit=50`, 10,000 jobs, 10 concurrent (p99 <= 100 ms)": latency(result["lists"]),
    }


def main(paths: list[str]) -> int:
    results = [json.loads(Path(p).read_text()) for p in paths]
    tables = [rows(r) for r in results]
    print("| scenario (target) | " + " | ".join(Path(p).stem for p in paths) + " |")
    print("|---|" + "---|" * len(paths))
    for name in tables[0]:
        print(f"| {name} | " + " | ".join(t.get(name, "-") for t in tables) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
