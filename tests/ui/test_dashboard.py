"""The dashboard in a real headless Chromium against a real `slimforge serve` (embedded default).

Set SLIMFORGE_SCREENSHOTS=docs/screenshots to also write the README's screenshots (light and dark).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import httpx

from app.api.ui import STATIC_DIR
from tests.ui.conftest import Served

SCREENSHOTS = os.environ.get("SLIMFORGE_SCREENSHOTS")
# Held-out text for perplexity: never the calibration (which is self-generated here).
EVAL_TEXT = ("A held out paragraph about pruning: the model keeps its useful layers and drops the rest. " * 60).encode()


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{job_id} still {job['status']}")


def shoot(page, name: str, phone: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Light and dark full-page screenshots, only when asked for (they are committed under docs/)."""
    if not SCREENSHOTS:
        return
    out = Path(SCREENSHOTS)
    out.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.getElementById('toast').textContent = ''")
    sizes = {"": page.viewport_size, "-phone": {"width": 390, "height": 844}} if phone else {"": page.viewport_size}
    for suffix, size in sizes.items():
        page.set_viewport_size(size)
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            page.wait_for_timeout(200)
            page.screenshot(path=str(out / f"{name}{suffix}-{scheme}.png"), full_page=True)
    page.set_viewport_size(sizes[""])
    page.emulate_media(color_scheme="light")


def sign_in(page, served: Served, key: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(served.base_url + "/")
    assert page.url.endswith("/ui/")
    page.fill("#api-key", key)
    page.click("form.signin button[type=submit]")


def test_submit_watch_inspect_download_and_compare(served: Served, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    api = served.client()
    evalset = api.post("/v1/datasets", files={"file": ("heldout.txt", EVAL_TEXT)}).json()["id"]
    evaluation = {"perplexity": [f"dataset:{evalset}"], "seq_lens": [32], "max_tokens": 1024, "speed": False}
    # A second job to compare with; the form's job queues behind it, so its progress is seen from 0.
    other = api.post(
        "/v1/jobs",
        json={
            "model": served.model,
            "method": "shortgpt",
            "target_sparsity": 0.5,
            "evaluation": evaluation,
            "calibration": {"source": "self_generated", "n_samples": 2, "seq_len": 32},
        },
    ).json()["id"]

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, served, served.key_a)
    page.wait_for_selector("h1:text('Jobs')")
    assert page.evaluate("sessionStorage.getItem('slimforge.apiKey')") == served.key_a
    assert page.evaluate("localStorage.length") == 0

    # The form: model from the catalog (a local path here), method options from their schema.
    page.click("a.button:text('New job')")
    page.wait_for_selector("#opt-score", state="attached")
    page.select_option("#model", "__other__")
    page.fill("#model-path", served.model)
    page.select_option("#method", "gradmap")
    page.fill("#target_sparsity", "1.5")
    page.click("#preview-button")
    assert "between 0 and 1" in page.inner_text("#err-target_sparsity")  # checked before any request
    page.fill("#target_sparsity", "0.25")
    page.click("summary:text('Method options')")
    page.fill("#opt-protect_first", "7")  # valid alone, impossible with 2 of 8 layers to remove: the API says so
    page.click("#preview-button")
    page.wait_for_selector("#err-target_sparsity:text('impossible')")
    page.fill("#opt-protect_first", "0")
    # A nullable switch offers "automatic" (its default, then not sent) besides on and off.
    assert page.input_value("#opt-compensate_in_loop") == ""
    page.fill("#cal-n_samples", "4")
    page.fill("#cal-seq_len", "32")
    page.check("#eval-on")
    page.check(f"input[value='dataset:{evalset}']")
    page.fill("#eval-seq_lens", "32")
    page.fill("#eval-max_tokens", "1024")
    page.uncheck("#eval-speed")
    page.click("#preview-button")
    plan = page.wait_for_selector("[data-testid=preview]:has-text('8 → 6')")
    assert "remove 2" in plan.inner_text()
    shoot(page, "form")

    page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page
    page.click("#submit-button")
    page.wait_for_selector("#toast:text('Submitted job_')")
    job_id = re.search(r"job_\w+", page.inner_text("#toast")).group(0)
    row = f"tr[data-job='{job_id}']"
    page.wait_for_selector(row)
    # Record every progress value the row shows while it runs.
    page.evaluate(
        """(row) => { window.__progress = [];
          const note = () => { const bar = document.querySelector(row + ' [role=progressbar]');
            if (bar) window.__progress.push(Number(bar.getAttribute('aria-valuenow'))); };
          note();
          new MutationObserver(note).observe(document.querySelector('table.jobs'), {subtree: true, childList: true});
        }""",
        row,
    )
    page.wait_for_selector(f"{row}[data-status='succeeded']", timeout=120_000)
    seen = page.evaluate("window.__progress")
    assert page.evaluate("window.__sameDocument") is True
    assert any(0 < value < 100 for value in seen), seen  # the bar moved through intermediate values
    assert seen[-1] == 100 and len(set(seen)) >= 3, seen
    assert "2 layers" in page.inner_text(row)
    wait_status(api, other, {"succeeded"})
    page.wait_for_selector(f"tr[data-job='{other}'][data-status='succeeded']", timeout=30_000)
    shoot(page, "list", phone=True)

    # The job page: layer chart (one crossed cell per removal), model stack, evaluation table.
    page.click(f"{row} a")
    page.wait_for_selector("[data-testid=layer-chart]")
    assert page.locator("[data-testid=layer-chart] rect.chosen").count() == 2
    assert page.locator("[data-testid=model-stack] .layer.removed").count() == 2
    table = page.inner_text("[data-testid=evaluation-table]")
    assert f"perplexity · dataset:{evalset} @ 32" in table
    assert re.search(r"\d+\.\d+\s+\d+\.\d+", table), table  # before and after numbers
    assert "Compensation" in page.inner_text("main")
    shoot(page, "job")

    # Download through the link; the bytes match the sha256 shown and the API's listing.
    file_row = page.locator("tr[data-file='config.json']")
    with page.expect_download() as info:
        file_row.locator("a").click()
    saved = tmp_path / "config.json"
    info.value.save_as(saved)
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert digest == file_row.locator("[data-testid=sha256]").inner_text().strip()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["options"]["compensate_in_loop"] is None  # left automatic: in-loop follows compensation
    artifact = api.get(f"/v1/artifacts/{job['artifact_id']}").json()
    assert digest == next(f["sha256"] for f in artifact["files"] if f["path"] == "config.json")

    # Compare the two jobs on the same model: one table row and one chart point each.
    page.goto(f"{served.base_url}/ui/#/compare?ids={job_id},{other}")
    page.wait_for_selector("[data-testid=compare-table] tbody tr >> nth=1")
    compared = page.inner_text("[data-testid=compare-table]")
    assert "gradmap" in compared and "shortgpt" in compared and "25.0 %" in compared and "50.0 %" in compared
    assert page.locator("[data-testid=compare-chart] circle").count() == 3  # two methods + the dense point
    shoot(page, "compare")
    assert not errors, errors
    context.close()


def test_other_tenant_job_is_not_found_and_a_wrong_key_is_explained(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    job_a = (
        served.client()
        .post(
            "/v1/jobs",
            json={
                "model": served.model,
                "method": "last_k",
                "target_sparsity": 0.25,
                "calibration": {"source": "self_generated", "n_samples": 1, "seq_len": 16},
            },
        )
        .json()["id"]
    )
    context = browser.new_context(viewport={"width": 390, "height": 844})  # phone width
    page = context.new_page()
    sign_in(page, served, "sf_not_a_real_key")
    alert = page.wait_for_selector("#key-error:text('not accepted')")
    assert "Invalid or revoked API key" in alert.inner_text()
    assert page.evaluate("sessionStorage.length") == 0  # a rejected key is not kept

    page.fill("#api-key", served.key_b)
    page.click("form.signin button[type=submit]")
    page.wait_for_selector("h1:text('Jobs')")
    page.goto(f"{served.base_url}/ui/#/jobs/{job_a}")
    page.wait_for_selector("[data-testid=not-found]")
    assert "Job not found" in page.inner_text("main")
    page.goto(f"{served.base_url}/ui/#/jobs")
    page.wait_for_selector("p[role=status]:text('No jobs match')")  # tenant B sees none of A's jobs

    page.click("#sign-out")
    page.wait_for_selector("#key-error:text('Signed out')")
    assert page.evaluate("sessionStorage.length") == 0
    context.close()


def test_cancel_retry_and_polling_when_the_event_stream_is_blocked(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    api = served.client(served.key_b)
    calibration = {"source": "self_generated", "n_samples": 4, "seq_len": 32}
    body = {"model": served.model, "target_sparsity": 0.25, "calibration": calibration}
    # Runs first (generating 32 calibration samples takes a while): the watched job waits behind it.
    api.post("/v1/jobs", json={**body, "method": "gradmap", "calibration": {**calibration, "n_samples": 32}})
    job = api.post("/v1/jobs", json={**body, "method": "last_k"}).json()["id"]
    context = browser.new_context()
    context.route("**/events/stream*", lambda route: route.abort())  # as behind a proxy that breaks SSE
    page = context.new_page()
    polled: list[str] = []
    page.on("request", lambda r: polled.append(r.url) if r.url.endswith(f"/v1/jobs/{job}") else None)
    sign_in(page, served, served.key_b)
    page.wait_for_selector("h1:text('Jobs')")
    page.goto(f"{served.base_url}/ui/#/jobs/{job}")
    page.click("button:text('Cancel job')")  # still queued behind the first job
    page.wait_for_selector("[data-slot=status] :text('cancelled')")
    assert api.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"
    page.click("button:text('Retry job')")
    page.wait_for_selector("[data-slot=status] :text('succeeded')", timeout=120_000)
    assert len(polled) >= 3, polled  # page loads plus polls: no stream ever reached the page
    assert page.locator("[data-testid=artifact]").count() == 1  # re-rendered in full once it ended
    context.close()


def test_root_redirects_and_the_page_loads_nothing_from_outside(served: Served) -> None:
    with httpx.Client(base_url=served.base_url) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/ui/js/app.js").headers["content-type"].startswith("text/javascript")
    external = re.compile(
        r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//|fetch\(\s*["']https?:"""
    )
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            assert not external.search(path.read_text()), f"{path} loads something from outside"
