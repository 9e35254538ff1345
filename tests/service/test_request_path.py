"""The request path under its users: cached auth, ETag polls, SSE fan-out, broker sweeps, no starvation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.auth import KEY_CACHE, generate_key, hash_key, public_id, revoke_key
from app.db import session_scope
from app.main import create_app
from app.models import ApiKey
from tests.service.conftest import (
    KEY_A,
    KEY_B,
    REDIS_URL,
    Api,
    make_settings,
    prepare_store,
    redis_settings,
    serving,
    tiny_job,
)
from tests.service.test_celery_workers import start_worker
from workers.outbox import broker_task_ids, resend_lost_jobs


def test_job_reads_carry_an_etag_and_unchanged_polls_get_304(api: Api, model_root: Path) -> None:
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    first = api.get(f"/v1/jobs/{job_id}")
    etag = first.headers["etag"]
    assert first.status_code == 200 and "no-cache" in first.headers["cache-control"]
    again = api.client.get(f"/v1/jobs/{job_id}", headers={**api.headers(), "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    api.post(f"/v1/jobs/{job_id}/cancel")
    changed = api.client.get(f"/v1/jobs/{job_id}", headers={**api.headers(), "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["status"] == "cancelled"


def test_generated_keys_store_only_a_public_id_and_revocation_applies_at_once(api: Api) -> None:
    key = generate_key()
    with session_scope(api.client.app.state.services.sessions) as session:
        from app.auth import create_key

        create_key(session, "default", key=key)
    row_prefix = public_id(key)
    secret = key.split("_", 2)[2]
    assert row_prefix == key.split("_")[1] and row_prefix not in secret
    assert public_id(KEY_A).startswith("h") and public_id(KEY_A)[1:] == hash_key(KEY_A)[:11]
    assert api.get("/v1/jobs", key=key).status_code == 200
    assert KEY_CACHE.get(hash_key(key)) == "default"  # the next request costs no database read
    with session_scope(api.client.app.state.services.sessions) as session:
        assert revoke_key(session, row_prefix) == 1
        stored = session.query(ApiKey).filter_by(prefix=row_prefix).one()
        assert stored.revoked and secret not in stored.prefix
    denied = api.get("/v1/jobs", key=key)
    assert denied.status_code == 401 and denied.json()["code"] == "unauthorized"


def _read_sse(client: TestClient, url: str, headers: dict[str, str], out: list[dict]) -> None:
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line.removeprefix("data: ")))


def test_sse_streams_hold_no_database_connection_and_get_live_events(api: Api, model_root: Path) -> None:
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    engine = api.client.app.state.services.engine
    received: list[list[dict]] = [[] for _ in range(50)]  # more streams than the connection pool holds
    threads = [
        threading.Thread(target=_read_sse, args=(api.client, f"/v1/jobs/{job_id}/events/stream", api.headers(), out))
        for out in received
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while not all(received) and time.monotonic() < deadline:  # each saw the backlog ("job queued")
        time.sleep(0.05)
    assert all(received)
    assert engine.pool.checkedout() == 0, "open streams must not hold pooled connections"
    started = time.monotonic()
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200
    assert time.monotonic() - started < 5
    api.post(f"/v1/jobs/{job_id}/cancel")  # the live event ends every stream
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    for events in received:
        assert [e["seq"] for e in events] == [1, 2]
        assert events[-1]["data"]["status"] == "cancelled"


def test_sse_resumes_after_last_event_id_and_refuses_a_malformed_one(api: Api, model_root: Path) -> None:
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    api.post(f"/v1/jobs/{job_id}/cancel")
    url = f"/v1/jobs/{job_id}/events/stream"
    resumed: list[dict] = []
    _read_sse(api.client, url, {**api.headers(), "Last-Event-ID": "1"}, resumed)
    assert [e["seq"] for e in resumed] == [2]
    bad = api.client.get(url, headers={**api.headers(), "Last-Event-ID": "abc"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_last_event_id"
    huge = api.client.get(f"{url}?after=2147483648", headers=api.headers())
    assert huge.status_code == 422


def test_a_stream_catches_up_at_its_keep_alive_on_an_event_that_was_never_published(
    database_url: str, tmp_path: Path, model_root: Path
) -> None:
    """Pub/sub is fire-and-forget: an event whose message is lost still reaches the stream."""
    from sqlalchemy import update

    from app.db import make_session_factory
    from app.jobs_service import add_event
    from app.models import Job

    settings = make_settings(tmp_path / "data", database_url, model_root, sse_heartbeat_seconds=0.5)
    with serving(settings) as api:
        client = api.client
        job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
        received: list[dict] = []
        reader = threading.Thread(
            target=_read_sse, args=(client, f"/v1/jobs/{job_id}/events/stream", api.headers(), received)
        )
        reader.start()
        while not received:
            time.sleep(0.05)
        # A session without the publisher hook: the event is committed but never published.
        with session_scope(make_session_factory(client.app.state.services.engine)) as session:
            session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
            add_event(session, job_id, "status", "cancelled behind the hub", data={"status": "cancelled"})
        reader.join(timeout=30)
        assert not reader.is_alive(), "the stream never caught up on the unpublished event"
        assert [e["seq"] for e in received] == [1, 2] and received[-1]["data"]["status"] == "cancelled"


def test_streams_per_key_are_capped_with_429(database_url: str, tmp_path: Path, model_root: Path) -> None:
    settings = make_settings(tmp_path / "data", database_url, model_root, max_streams_per_key=2)
    with serving(settings) as api:
        client = api.client
        job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
        url = f"/v1/jobs/{job_id}/events/stream"
        outs: list[list[dict]] = [[], []]
        threads = [threading.Thread(target=_read_sse, args=(client, url, api.headers(), o)) for o in outs]
        for thread in threads:
            thread.start()
        while not all(outs):
            time.sleep(0.05)
        third = client.get(url, headers=api.headers())
        assert third.status_code == 429 and third.json()["code"] == "too_many_streams"
        assert third.headers["retry-after"]
        api.post(f"/v1/jobs/{job_id}/cancel")
        for thread in threads:
            thread.join(timeout=60)


def test_hundreds_of_concurrent_polls_never_starve_the_api(live_server: tuple[str, Api], model_root: Path) -> None:
    """The old request path deadlocked at ~80 concurrent requests (sessions waiting for threads)."""
    base, api = live_server
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=base, headers=api.headers(), timeout=60, limits=limits) as client:
            polls = [client.get(f"/v1/jobs/{job_id}") for _ in range(300)]
            lists = [client.get("/v1/jobs?limit=5") for _ in range(50)]
            return await asyncio.gather(*polls, *lists, client.get("/healthz"))

    answers = asyncio.run(storm())
    refused = [(r.request.url.path, r.status_code, r.text[:300]) for r in answers if r.status_code != 200]
    assert not refused, refused[:5]


def test_an_idle_connection_outlives_the_clients_keepalive(live_server: tuple[str, Api]) -> None:
    """A poll sent on a connection idle for longer than httpx's 5 s keep-alive still gets its answer.

    With uvicorn's default 5 s the server closed such connections as the client reused them: the
    storm above failed with ReadError whenever it ran longer than 5 s on a loaded machine.
    """
    base, api = live_server
    with httpx.Client(base_url=base, headers=api.headers(), limits=httpx.Limits(keepalive_expiry=60)) as client:
        first = client.get("/v1/jobs?limit=1")
        time.sleep(6)
        again = client.get("/v1/jobs?limit=1")
        assert (first.status_code, again.status_code) == (200, 200)
        ports = [r.extensions["network_stream"].get_extra_info("client_addr")[1] for r in (first, again)]
        assert ports[0] == ports[1], "the server closed the idle connection: the second poll needed a new one"


def test_sweeper_resends_exactly_the_queued_jobs_redis_lost(tmp_path: Path, model_root: Path) -> None:
    from tests.service.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        queue = f"sweep-{uuid.uuid4().hex[:8]}"
        settings = make_settings(
            tmp_path / "data", url, model_root, broker_url=REDIS_URL, queue_name=queue, requeue_grace_seconds=0.0
        )
        prepare_store(settings)
        app = create_app(settings)
        services = app.state.services
        with TestClient(app) as client:
            api = Api(client, settings)
            kept, lost = (api.post("/v1/jobs", json=tiny_job(model_root, seed=i)).json()["id"] for i in range(2))
            assert {kept, lost} <= broker_task_ids(settings)  # type: ignore[operator]
            assert resend_lost_jobs(services.sessions, settings, services.enqueue) == []
            import redis

            client_redis = redis.Redis.from_url(REDIS_URL)
            for raw in client_redis.lrange(queue, 0, -1):  # the broker forgets one message
                if json.loads(raw)["headers"]["id"] == lost:
                    client_redis.lrem(queue, 1, raw)
            assert lost not in broker_task_ids(settings)  # type: ignore[operator]
            assert resend_lost_jobs(services.sessions, settings, services.enqueue) == [lost]
            assert {kept, lost} <= broker_task_ids(settings)  # type: ignore[operator]
            client_redis.delete(queue)
        services.engine.dispose()


def test_worker_events_reach_sse_subscribers_through_redis(tmp_path: Path, model_root: Path) -> None:
    from tests.service.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        settings = make_settings(
            tmp_path / "data", url, model_root, broker_url=REDIS_URL, queue_name=f"fanout-{uuid.uuid4().hex[:8]}"
        )
        prepare_store(settings)
        app = create_app(settings)
        with TestClient(app) as client:
            api = Api(client, settings)
            worker = start_worker(settings, tmp_path, "w1")
            try:
                job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
                events: list[dict] = []
                _read_sse(client, f"/v1/jobs/{job_id}/events/stream", api.headers(), events)
            finally:
                worker.stop()
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(1, len(seqs) + 1)), seqs  # each once, in order, none missing
            assert events[-1]["data"]["status"] == "succeeded"
            assert seqs == [e["seq"] for e in api.get(f"/v1/jobs/{job_id}/events").json()]
        app.state.services.engine.dispose()


def _write_behind_the_api(api: Api, job_id: str, **values: object) -> None:
    """A change to the row that publishes no event (like a heartbeat or a progress tick)."""
    from sqlalchemy import update

    from app.models import Job

    with session_scope(api.client.app.state.services.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_polls_served_from_memory_are_never_older_than_the_max_age(api: Api, model_root: Path) -> None:
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.0
    _write_behind_the_api(api, job_id, progress=42.0)
    time.sleep(api.settings.job_read_max_age_seconds + 0.05)
    polled = api.get(f"/v1/jobs/{job_id}")
    assert polled.json()["progress"] == 42.0
    # The list shows the same body as the poll, and the page document is well formed.
    page = api.get("/v1/jobs").json()
    assert page["items"] == [polled.json()] and page["next_cursor"] is None
    assert api.get(f"/v1/jobs/{job_id}", key=KEY_B).status_code == 404  # another tenant's job stays hidden


def test_a_job_event_reaches_a_cached_poll_at_once(api: Api, model_root: Path) -> None:
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    with session_scope(api.client.app.state.services.sessions) as session:
        from app.jobs_service import add_event

        _write_behind_the_api(api, job_id, status="running")  # not yet seen: no event
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        add_event(session, job_id, "log", "something happened")
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # well within the max age


def test_concurrent_polls_of_a_stale_job_share_one_check(api: Api, model_root: Path) -> None:
    from app.job_views import JOB_VIEWS

    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    JOB_VIEWS.invalidate(job_id)
    checks: list[str] = []
    original = JOB_VIEWS.check

    def counting(sessions, wanted):  # type: ignore[no-untyped-def]
        checks.append(wanted)
        time.sleep(0.2)  # a slow store: every poll below arrives while the check runs
        return original(sessions, wanted)

    services = api.client.app.state.services

    async def polls() -> list[str]:
        views = await asyncio.gather(*(JOB_VIEWS.get(services.sessions, job_id, 0.5) for _ in range(50)))
        return [view.tenant_id for view in views if view is not None]

    JOB_VIEWS.check = counting  # type: ignore[method-assign]
    try:
        owners = asyncio.run(polls())
    finally:
        del JOB_VIEWS.check
    assert owners == ["default"] * 50 and checks == [job_id]


def test_an_event_from_another_process_reaches_this_process_cache_through_redis(
    tmp_path: Path, model_root: Path
) -> None:
    import subprocess
    import sys

    from tests.service.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        settings = redis_settings(
            tmp_path / "data",
            url,
            model_root,
            job_read_max_age_seconds=10.0,  # only the event can refresh the poll within this test
        )
        prepare_store(settings)
        app = create_app(settings)
        with TestClient(app) as client:
            api = Api(client, settings)
            job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
            assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            writer = (
                "import sys\n"
                "from sqlalchemy import update\n"
                "from app.db import make_engine, session_scope\n"
                "from app.jobs_service import add_event\n"
                "from app.models import Job\n"
                "from app.services import session_factory\n"
                "from app.settings import Settings\n"
                "settings = Settings(database_url=sys.argv[1], broker_url=sys.argv[2], queue_name=sys.argv[3],\n"
                "                    data_dir=sys.argv[4])\n"
                "with session_scope(session_factory(settings, make_engine(sys.argv[1]))) as session:\n"
                "    session.execute(update(Job).where(Job.id == sys.argv[5]).values(status='running'))\n"
                "    add_event(session, sys.argv[5], 'status', 'running', data={'status': 'running'})\n"
            )
            args = [url, REDIS_URL, settings.queue_name, str(tmp_path / "data"), job_id]
            subprocess.run([sys.executable, "-c", writer, *args], check=True, cwd=Path(__file__).parents[2])
            deadline = time.monotonic() + 5
            while api.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
                assert time.monotonic() < deadline, "the relayed event never dropped the cached view"
                time.sleep(0.02)
        app.state.services.engine.dispose()


def test_a_check_that_raced_an_event_is_not_served_as_fresh(api: Api, model_root: Path) -> None:
    """A check that read the row before a change committed must not hide that change for max_age."""
    from app.job_views import JOB_VIEWS

    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    sessions = api.client.app.state.services.sessions
    JOB_VIEWS.invalidate(job_id)
    epoch = JOB_VIEWS.epoch(job_id)
    JOB_VIEWS.invalidate(job_id)  # an event lands while that check is still running
    JOB_VIEWS._store(job_id, JOB_VIEWS.check(sessions, job_id), time.monotonic(), epoch)  # type: ignore[arg-type]
    assert JOB_VIEWS.fresh(job_id, 10.0) is None
    assert JOB_VIEWS.check(sessions, job_id) is not None and JOB_VIEWS.fresh(job_id, 10.0) is not None
