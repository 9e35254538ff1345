"""What keeps hundreds of streams and a saturating load from stalling the API: shared reads, paced
fan-out, refresh-ahead key cache, a bound on requests per loop turn and the collector policy
(app.event_pages, app.events, app.auth, app.turns, app.heap). The load figures themselves are in
bench/load.py and docs/reliability.md."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

from sqlalchemy import update

from app.auth import KEY_CACHE, hash_key
from app.db import session_scope
from app.event_pages import EVENT_PAGES
from app.events import DELIVERY_BATCH, Hub, _deliver_paced
from app.job_views import JOB_VIEWS
from app.models import ApiKey
from app.turns import TurnBudget
from tests.service.conftest import KEY_A, Api, tiny_job


def test_streams_of_one_job_share_one_catch_up_read_until_an_event_is_heard(api: Api, model_root: Path) -> None:
    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    api.post(f"/v1/jobs/{job_id}/cancel")
    services = api.client.app.state.services
    reads: list[int] = []
    original = EVENT_PAGES.read

    def counting(sessions, wanted, after):  # type: ignore[no-untyped-def]
        reads.append(after)
        time.sleep(0.1)  # every stream below asks while the read runs
        return original(sessions, wanted, after)

    async def streams_open(count: int) -> list[list[int]]:
        pages = await asyncio.gather(*(EVENT_PAGES.after(services.sessions, job_id, 0, 5.0) for _ in range(count)))
        return [[seq for seq, _ in page.frames] for page in pages]

    JOB_VIEWS.invalidate(job_id)  # a fresh epoch: nothing cached from the requests above
    EVENT_PAGES.read = counting  # type: ignore[method-assign]
    try:
        assert asyncio.run(streams_open(200)) == [[1, 2]] * 200
        assert reads == [0]  # 200 streams, one read
        assert asyncio.run(streams_open(5)) == [[1, 2]] * 5 and reads == [0]  # still current: from memory
        JOB_VIEWS.invalidate(job_id)  # an event of the job was heard: the page may be missing it
        assert asyncio.run(streams_open(5)) == [[1, 2]] * 5 and reads == [0, 0]
    finally:
        del EVENT_PAGES.read
    page = asyncio.run(EVENT_PAGES.after(services.sessions, job_id, 0, 5.0))
    assert page.terminal and page.frames[-1][1].startswith("id: 2\nevent: status\ndata: {")


def test_an_event_for_many_streams_is_delivered_a_batch_per_loop_turn() -> None:
    hub = Hub()

    async def scenario() -> tuple[int, int]:
        subs = [hub.subscribe("job-1", owner=f"key-{i}", limit=10) for i in range(3 * DELIVERY_BATCH + 1)]
        _deliver_paced(subs, {"job_id": "job-1", "seq": 1})
        first_turn = sum(not s.queue.empty() for s in subs)
        for _ in range(5):
            await asyncio.sleep(0)  # let the loop run the follow-up batches
        return first_turn, sum(s.queue.qsize() for s in subs)

    first_turn, delivered = asyncio.run(scenario())
    assert first_turn == DELIVERY_BATCH and delivered == 3 * DELIVERY_BATCH + 1


def requests_per_turn(per_turn: int, count: int) -> list[tuple[int, int]]:
    """(request, the loop turn it started its work in) for `count` requests sent at once."""
    turn = 0
    started: list[tuple[int, int]] = []

    async def inner(scope, receive, send):  # type: ignore[no-untyped-def]
        started.append((scope["n"], turn))  # a cached poll: all of its work, no await

    async def scenario() -> None:
        nonlocal turn
        gate = TurnBudget(inner, per_turn=per_turn)
        requests = [asyncio.create_task(gate({"type": "http", "n": n}, None, None)) for n in range(count)]  # type: ignore[arg-type]
        while not all(r.done() for r in requests):
            await asyncio.sleep(0)  # one turn; the loop reads its sockets between turns
            turn += 1
        await asyncio.gather(*requests)

    asyncio.run(scenario())
    return started


def test_a_loop_turn_starts_at_most_its_budget_of_requests_in_their_order() -> None:
    started = requests_per_turn(per_turn=3, count=10)
    turns = [t for _, t in started]
    assert [n for n, _ in started] == list(range(10))  # deferred requests keep their place
    assert max(turns.count(t) for t in turns) == 3 and len(set(turns)) == 4  # 3+3+3+1
    unbounded = [t for _, t in requests_per_turn(per_turn=0, count=10)]
    assert len(set(unbounded)) == 1  # 0 turns the bound off: all in one turn


def test_a_cached_key_is_refreshed_before_it_expires_and_a_revoked_one_then_fails(api: Api) -> None:
    digest = hash_key(KEY_A)
    assert api.get("/v1/jobs").status_code == 200

    def make_due() -> None:  # the entry in the last quarter of its life
        tenant, _expiry = KEY_CACHE._entries[digest]
        KEY_CACHE._entries[digest] = (tenant, time.monotonic() + KEY_CACHE.ttl / 8)

    make_due()
    assert api.get("/v1/jobs").status_code == 200  # answered from the entry; a refresh starts behind it
    deadline = time.monotonic() + 10
    while KEY_CACHE.due(digest) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not KEY_CACHE.due(digest) and KEY_CACHE.get(digest) == "default"

    # Revoked in the store by another process (this process's cache is not told).
    with session_scope(api.client.app.state.services.sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == digest).values(revoked=True))
    make_due()
    api.get("/v1/jobs")  # within the entry's life either answer is allowed; it triggers the refresh
    deadline = time.monotonic() + 10
    while KEY_CACHE.get(digest) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    denied = api.get("/v1/jobs")
    assert denied.status_code == 401 and denied.json()["code"] == "unauthorized"


def test_what_survives_a_full_collection_is_frozen_and_a_periodic_sweep_unfreezes_it() -> None:
    from app import heap

    heap.freeze_survivors_of_full_passes()
    keep = [[i] for i in range(5_000)]  # long-lived objects made after start-up
    gc.unfreeze()
    gc.collect()
    frozen = gc.get_freeze_count()
    assert frozen >= len(keep)  # the next full pass will not walk them again
    saved = heap._last_full_sweep
    heap._last_full_sweep = time.monotonic() - heap.FULL_SWEEP_SECONDS - 1
    try:
        gc.collect()  # due for a complete sweep: this pass thaws everything for the next one
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert gc.get_freeze_count() >= len(keep)
    finally:
        heap._last_full_sweep = saved
    del keep


def _raw_exchange(base: str, payload: bytes, until: bytes, timeout: float = 10.0) -> bytes:
    """Write raw HTTP bytes on one connection; read until `until` has been seen (or EOF)."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while until not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_healthz_is_answered_by_the_protocol_with_the_routes_exact_response(live_server: tuple[str, Api]) -> None:
    import httpx

    base, api = live_server
    with httpx.Client(base_url=base) as client:
        for _ in range(3):  # one kept-alive connection: the protocol's answer leaves it usable
            health = client.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert health.headers["content-type"] == "application/json" and "date" in health.headers
        assert client.get("/v1/jobs", headers=api.headers()).status_code == 200  # the app, same connection
        head = client.head("/healthz")
        assert head.status_code == 200 and head.content == b""
        assert client.post("/healthz").status_code == 405  # other methods still reach the app
    assert api.client.get("/healthz").content == b'{"status":"ok"}'  # the route the protocol stands in for
    # HTTP/1.0: answered, then closed.
    closed = _raw_exchange(base, b"GET /healthz HTTP/1.0\r\n\r\n", b"\r\n\r\n{")
    assert closed.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in closed
    # Pipelined behind an application request: both answered, in order.
    key = api.headers()["Authorization"].encode()
    jobs = b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: " + key + b"\r\n\r\n"
    both = _raw_exchange(base, jobs + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b'{"status":"ok"}')
    assert both.count(b"HTTP/1.1 200 OK") == 2 and both.index(b'"items"') < both.index(b'{"status":"ok"}')
