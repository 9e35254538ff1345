"""Time one /metrics body (`job_registry`) over many finished jobs with large results, on SQLite or
PostgreSQL. `--tree` imports the app from another checkout, to compare two versions in one run:

    .venv/bin/python bench/metrics_scrape.py --url sqlite:////tmp/m.db --tree /tmp/old
    .venv/bin/python bench/metrics_scrape.py --url sqlite:////tmp/m.db
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="database URL; filled with jobs on the first run")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from sqlalchemy import create_engine, func, select
    from sqlalchemy.orm import Session

    from app.metrics import job_registry
    from app.models import Base, Job, Tenant, utcnow

    engine = create_engine(args.url)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        if not session.scalar(select(func.count()).select_from(Job)):
            session.add(Tenant(id="bench"))
            session.flush()  # no ORM relationship orders the tenant before its jobs
            now = utcnow()
            curve = [{"k": k, "loss": 1.0 + k / 1000, "layers": list(range(20))} for k in range(300)]  # ~40 KiB
            for i in range(args.jobs):
                session.add(
                    Job(
                        tenant_id="bench",
                        status="succeeded",
                        model="m",
                        method="gradmap",
                        target_sparsity=0.2,
                        sparsity_basis="layers",
                        spec={},
                        created_at=now,
                        started_at=now,
                        finished_at=now,
                        result={"timings": {"scoring": 1.0 + i % 7}, "report": {"curve": curve}},
                    )
                )
            session.commit()
        seconds = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            job_registry(session)
            seconds.append(time.perf_counter() - started)
    print(json.dumps({"tree": str(args.tree), "url": args.url, "jobs": args.jobs, "seconds": sorted(seconds)}))


if __name__ == "__main__":
    main()
