"""Signed webhooks on a job's terminal state.

The body is the job JSON wrapped as {"event": "job.<status>", "job": {...}}. The header
`X-Slimforge-Signature: t=<unix time>,v1=<hex>` carries HMAC-SHA256(secret, "<t>.<body>"), so a
receiver can check both origin and freshness. Delivery runs in a background thread with retries
and records its outcome as a job event. Only global addresses are contacted (app/netguard.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.models import Job
from app.netguard import WebhookTargetRefused, parse_networks, pinned_url, resolve_checked

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Slimforge-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """Receiver-side check (also used by the tests)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def _post_checked(url: str, body: bytes, headers: dict[str, str], allowed_networks: list[str]) -> httpx.Response:
    """POST to the address the host resolves to, after checking it (no redirects are followed)."""
    address = resolve_checked(url, parse_networks(allowed_networks))
    parts = urlsplit(url)
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" and parts.hostname else None
    with httpx.Client(timeout=10.0) as client:
        return client.post(
            pinned_url(url, address), content=body, headers={**headers, "Host": host_header}, extensions=extensions
        )


def _deliver(
    url: str, body: bytes, secret: str, attempts: int, backoff_s: float, allowed_networks: list[str]
) -> tuple[bool, str]:
    last = ""
    for attempt in range(1, attempts + 1):
        headers = {"content-type": "application/json", SIGNATURE_HEADER: sign(secret, int(time.time()), body)}
        try:
            response = _post_checked(url, body, headers, allowed_networks)
            if response.status_code < 300:
                return True, f"delivered (HTTP {response.status_code}, attempt {attempt})"
            last = f"HTTP {response.status_code}"
        except WebhookTargetRefused as exc:
            return False, f"refused: {exc}"  # retrying cannot make the address acceptable
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(backoff_s * attempt)
    return False, f"failed after {attempts} attempts: {last}"


def notify_terminal(
    sessions: sessionmaker[Session],
    job_id: str,
    secret: str | None,
    attempts: int = 3,
    backoff_s: float = 2.0,
    allowed_networks: list[str] | None = None,
) -> threading.Thread | None:
    """If the job asked for a webhook, deliver its terminal state in the background.

    `allowed_networks` defaults to SLIMFORGE_WEBHOOK_ALLOWED_NETWORKS from the environment.
    """
    from app.jobs_service import add_event
    from app.schemas import JobOut

    if allowed_networks is None:
        from app.settings import get_settings

        allowed_networks = get_settings().webhook_allowed_networks

    with sessions() as session:
        job = session.get(Job, job_id)
        url = job.spec.get("webhook_url") if job else None
        if job is None or not url or not secret:
            return None
        payload = {"event": f"job.{job.status}", "job": JobOut.from_row(job).model_dump(mode="json")}
    body = json.dumps(payload, sort_keys=True).encode()

    def run() -> None:
        ok, message = _deliver(url, body, secret, attempts, backoff_s, allowed_networks)
        try:
            with session_scope(sessions) as session:
                add_event(session, job_id, "webhook", f"webhook {message}", data={"url": url, "delivered": ok})
        except Exception:
            log.exception("could not record webhook outcome for %s", job_id)

    thread = threading.Thread(target=run, name=f"webhook-{job_id}", daemon=True)
    thread.start()
    return thread
