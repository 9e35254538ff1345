"""The `slimforge` command: serve, worker, migrate, create-key, prune, eval."""

from __future__ import annotations

import argparse
import logging
import sys
from types import FrameType

import uvicorn

from app.settings import Settings, get_settings
from workers import shutdown

log = logging.getLogger(__name__)


def _bootstrap(settings: Settings, migrate: bool) -> None:
    """Prepare the store: migrate (if asked) and make sure the default tenant has a key."""
    from app.auth import bootstrap_keys
    from app.db import make_engine, make_session_factory, session_scope
    from app.migrate import upgrade

    settings.ensure_dirs()
    if migrate:
        upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        generated = bootstrap_keys(session, settings.bootstrap_key)
    engine.dispose()
    if generated:
        bar = "=" * 72
        print(
            f"{bar}\nGenerated the first API key (shown once; only its hash is stored):\n\n"
            f"    {generated}\n\nUse it as 'Authorization: Bearer <key>'.\n{bar}",
            flush=True,
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from app.main import create_app
    from app.services import Services
    from workers.reaper import Reaper

    settings = get_settings()
    embedded = settings.embedded_broker if args.embedded_worker == "auto" else args.embedded_worker == "yes"
    if args.workers > 1 and embedded:
        print(
            "slimforge serve --workers N needs a production broker (SLIMFORGE_BROKER_URL, e.g. redis://...) and "
            "database (SLIMFORGE_DATABASE_URL) with separate `slimforge worker` processes; the embedded "
            "default runs one process.",
            file=sys.stderr,
        )
        return 2
    migrate = args.migrate if args.migrate is not None else settings.resolved_database_url.startswith("sqlite")
    _bootstrap(settings, migrate)
    services = Services.build(settings)
    Reaper(services.sessions, settings, services.enqueue).start()
    common = server_options(args.host, args.port, args.log_level, args.access_log)
    if args.workers > 1:
        # Each process builds its own app (and connection pool) from the same environment.
        uvicorn.run("app.main:create_app", factory=True, workers=args.workers, timeout_graceful_shutdown=10, **common)
        return 0
    controller = None
    if embedded:
        from app.embedded import start_worker_thread
        from workers.celery_app import celery_app
        from workers.outbox import quarantine_broken_messages

        quarantine_broken_messages(settings.broker_dir / "queue")
        controller = start_worker_thread(celery_app, settings.queue_name)
    server = HandBackServer(uvicorn.Config(create_app(settings, services), timeout_graceful_shutdown=10, **common))
    server.run()
    if controller is not None:
        shutdown.request()  # also set by the signal handler; here for any other way out of run()
        if not shutdown.wait_until_idle(settings.shutdown_grace_seconds):
            log.warning("the running job did not hand itself back in time; the reaper will re-queue it")
        controller.stop()  # type: ignore[attr-defined]
    return 0


def server_options(host: str, port: int, log_level: str, access_log: bool) -> dict[str, object]:
    """uvicorn settings of `slimforge serve` (tests that run a real server use the same)."""
    # The stdlib asyncio loop, not uvloop (which uvicorn picks when installed): under a saturating
    # closed loop, uvloop left some connections unread for up to 10 s while it served the others
    # (p99 7.2 s, timeouts), where asyncio serves the same load at the same rate with p99 174 ms
    # (docs/reliability.md). The protocol answers /healthz before the loop's queue (app.health_protocol).
    # Idle connections stay open 75 s, not uvicorn's 5 s: clients keep theirs for about 5 s (httpx,
    # aiohttp) to 60 s (load balancers), and a server that closes first races a poll sent on the
    # closing socket, which the client sees as a reset (CI's polling storm did; tests/service/
    # test_request_path.py). Outliving the client's timeout leaves the close to the client.
    return dict(
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        loop="asyncio",
        http="app.health_protocol:FastHealthProtocol",
        timeout_keep_alive=75,
    )


class HandBackServer(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT also tell the embedded worker's job to hand itself back at once."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        shutdown.request()
        super().handle_exit(sig, frame)


def cmd_worker(args: argparse.Namespace) -> int:
    from app.services import Services
    from workers.celery_app import celery_app
    from workers.reaper import Reaper

    settings = get_settings()
    settings.ensure_dirs()
    services = Services.build(settings)
    Reaper(services.sessions, settings, services.enqueue).start()
    from celery.signals import worker_shutting_down

    import workers.tasks  # noqa: F401

    # Warm shutdown (SIGTERM): the running job hands itself back instead of running to the end.
    worker_shutting_down.connect(lambda **_: shutdown.request(), weak=False)
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "-Q",
        settings.queue_name,
        f"--loglevel={args.log_level.upper()}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv += ["-n", args.hostname]
    celery_app.worker_main(argv)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import downgrade, upgrade

    settings = get_settings()
    settings.ensure_dirs()
    if args.direction == "down":
        downgrade(settings.resolved_database_url, args.revision or "base")
    else:
        upgrade(settings.resolved_database_url, args.revision or "head")
        _bootstrap(settings, migrate=False)
    print(f"database {settings.resolved_database_url.split('@')[-1]} at {args.revision or args.direction}")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.auth import create_key
    from app.db import make_engine, make_session_factory, session_scope
    from app.tenants import InvalidTenant, validate_tenant_id

    try:
        validate_tenant_id(args.tenant)
    except InvalidTenant as exc:
        print(f"slimforge create-key: {exc}", file=sys.stderr)
        return 2
    settings = get_settings()
    with session_scope(make_session_factory(make_engine(settings.resolved_database_url))) as session:
        key = create_key(session, args.tenant, name=args.name)
    print(key)
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from app.auth import revoke_key
    from app.db import make_engine, make_session_factory, session_scope

    settings = get_settings()
    with session_scope(make_session_factory(make_engine(settings.resolved_database_url))) as session:
        count = revoke_key(session, args.key)
    if not count:
        print(f"no key with public id {args.key!r}", file=sys.stderr)
        return 1
    print(f"revoked {count} key(s); other API processes stop accepting it within their cache TTL (10 s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API (embedded default: with an in-process worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--embedded-worker",
        choices=["auto", "yes", "no"],
        default="auto",
        help="run a worker thread in this process (auto: when the broker is the embedded one)",
    )
    serve.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="upgrade the database first (default: only for SQLite)",
    )
    serve.add_argument("--workers", type=int, default=1, help="API processes (production mode only)")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    serve.set_defaults(handler=cmd_serve)

    worker = sub.add_parser("worker", help="run a Celery worker (one job at a time) for production")
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--hostname", default=None, help="Celery node name, e.g. gpu0@%%h")
    worker.set_defaults(handler=cmd_worker)

    migrate = sub.add_parser("migrate", help="apply database migrations (Alembic)")
    migrate.add_argument("direction", nargs="?", choices=["up", "down"], default="up")
    migrate.add_argument("--revision", default=None, help="target revision (default: head / base)")
    migrate.set_defaults(handler=cmd_migrate)

    key = sub.add_parser("create-key", help="create an API key for a tenant and print it once")
    key.add_argument("--tenant", default="default")
    key.add_argument("--name", default="")
    key.set_defaults(handler=cmd_create_key)

    revoke = sub.add_parser("revoke-key", help="revoke an API key by its public id (sf_<public id>_...)")
    revoke.add_argument("key", help="the key's public id, or the whole key")
    revoke.set_defaults(handler=cmd_revoke_key)

    from workers.engine.cli_eval import add_eval_parser
    from workers.engine.cli_prune import add_prune_parser

    add_prune_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
