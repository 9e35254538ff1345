"""Run one job: claim it, load the model, calibrate, evaluate, prune, save, publish atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db import retry_on_disconnect, session_scope
from app.errors import is_disk_full
from app.jobs_service import add_event
from app.models import Artifact, ArtifactFile, Dataset, Job, new_id, utcnow
from app.settings import Settings
from app.webhooks import notify_terminal
from workers import shutdown
from workers.engine import pipeline
from workers.engine.artifact import checkpoint_dtype, resolve_artifact_dtype, write_artifact
from workers.engine.calibration import (
    compensation_batch,
    holdout_count,
    job_windows,
    read_calibration_file,
    self_generated_batches,
    self_generated_compensation,
    split_holdout,
)
from workers.engine.device import pick_device, pick_dtype
from workers.engine.heldout import WriterSnapshot, heldout_quality
from workers.engine.modelzoo import load_model, resolve_checkpoint
from workers.engine.search import PerplexityMeasure
from workers.engine.types import EngineError, JobCancelled
from workers.job_state import Heartbeat, JobState, LostOwnership, ProgressPlan

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(sessions: sessionmaker[Session], job_id: str) -> int | None:
    """Atomically move a queued job to running; returns this attempt's number, or None if not ours."""
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            return None  # cancelled, finished, or already running elsewhere (duplicate delivery)
        if job.attempts >= job.max_attempts:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued")
                .values(
                    status="failed",
                    finished_at=utcnow(),
                    error_code="retry_limit",
                    error_message=f"The job was attempted {job.attempts} times (limit {job.max_attempts}).",
                )
            )
            return None
        attempt = job.attempts + 1
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued", Job.attempts == job.attempts)
            .values(
                status="running",
                attempts=attempt,
                started_at=utcnow(),
                heartbeat_at=utcnow(),
                worker=worker_name(),
                stage="loading_model",
                progress=0.0,
            )
        ).rowcount
        if not claimed:
            return None
        add_event(
            session,
            job_id,
            "status",
            f"job running (attempt {attempt}) on {worker_name()}",
            stage="loading_model",
            data={"status": "running", "attempt": attempt},
        )
        return attempt


HANDED_BACK = "handed_back"
DISK_FULL_MESSAGE = (
    "The server's data directory ran out of space while writing the artifact; nothing was published. "
    "Free space (or ask the operator to), then retry the job."
)


def run_job(job_id: str, settings: Settings, sessions: sessionmaker[Session]) -> str | None:
    """Execute a job if it is ours to run; returns its terminal status, HANDED_BACK, or None when skipped."""
    if shutdown.REQUESTED.is_set():
        # Delivered while shutting down: left `queued` unclaimed. Re-sending here would loop through
        # this same stopping worker; the outbox sweeper re-sends it once a worker is up again.
        return None
    shutdown.IDLE.clear()
    try:
        status = _run_claimed(job_id, settings, sessions)
    finally:
        shutdown.IDLE.set()
    if status not in (None, HANDED_BACK):
        notify_terminal(sessions, job_id, settings.webhook_secret, allowed_networks=settings.webhook_allowed_networks)
    return status


def _run_claimed(job_id: str, settings: Settings, sessions: sessionmaker[Session]) -> str | None:
    attempt = retry_on_disconnect(lambda: claim(sessions, job_id), settings.db_retry_seconds, f"claim {job_id}")
    if attempt is None:
        log.info("job %s not claimed (not queued)", job_id)
        return None
    state = JobState(sessions, job_id, attempt, db_retry_seconds=settings.db_retry_seconds)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        spec, tenant_id = dict(job.spec), job.tenant_id
    work_dir = settings.tmp_dir / f"{job_id}-{attempt}"
    try:
        with Heartbeat(state, settings.heartbeat_seconds):
            report, files = _execute(spec, tenant_id, settings, state, work_dir / "artifact")
        return _publish(sessions, state, tenant_id, work_dir, report, files, settings)
    except JobCancelled:
        return _end(sessions, state, "cancelled")
    except shutdown.HandBack:
        try:
            state.hand_back()
        except LostOwnership:
            return None
        log.info("job %s handed back: this worker is shutting down", job_id)
        return HANDED_BACK
    except LostOwnership:
        log.warning("job %s attempt %s lost ownership; abandoning", job_id, attempt)
        return None
    except EngineError as exc:
        return _end(sessions, state, "failed", code=exc.code, message=exc.message)
    except torch.cuda.OutOfMemoryError as exc:
        return _end(sessions, state, "failed", code="out_of_memory", message=f"The device ran out of memory: {exc}")
    except Exception as exc:
        if is_disk_full(exc):  # also safetensors' own error type, which wraps ENOSPC in a message
            return _end(sessions, state, "failed", code="disk_full", message=DISK_FULL_MESSAGE)
        log.exception("job %s failed", job_id)
        return _end(sessions, state, "failed", code="internal_error", message=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _end(
    sessions: sessionmaker[Session], state: JobState, status: str, code: str | None = None, message: str | None = None
) -> str | None:
    values: dict[str, Any] = {}
    if code:
        values = {"error_code": code, "error_message": message, "error_stage": state.stage}

    def write() -> None:
        with session_scope(sessions) as session:
            state.finish(session, status, **values)

    try:
        retry_on_disconnect(write, state.db_retry_seconds, f"end job {state.job_id}")
        return status
    except LostOwnership:
        return None


def _execute(
    spec: dict[str, Any], tenant_id: str, settings: Settings, state: JobState, out_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    device = pick_device(settings.device)
    timer = StageTimer()
    state.progress("loading_model", 0.0, f"loading {spec['model']} on {device}")
    with timer("loading_model"):
        model, tokenizer = load_model(
            spec["model"],
            allowed_roots=settings.allowed_model_roots,
            cache_dir=settings.models_dir,
            device=device,
            dtype=pick_dtype(device),
        )
        source = resolve_checkpoint(spec["model"], settings.allowed_model_roots, settings.models_dir)
        artifact_dtype = resolve_artifact_dtype(
            spec.get("artifact_dtype", "auto"), checkpoint_dtype(spec["model"], source), next(model.parameters()).dtype
        )
    state.plan = ProgressPlan.for_spec(spec, getattr(model.config, "num_hidden_layers", None))
    state.progress("loading_model", 1.0)
    if state.should_cancel():
        raise JobCancelled()

    with timer("calibrating"):
        calibration, heldout_ids, disjoint, compensation = _calibration(
            spec, tenant_id, settings, model, tokenizer, state
        )
    heldout = HeldOut(spec["calibration"], heldout_ids, state.should_cancel, disjoint)
    with timer("heldout"):
        heldout.measure("dense", model)
    evaluation = spec.get("evaluation")
    with timer("evaluating_dense"):
        dense_eval = _evaluate(model, tokenizer, evaluation, spec, tenant_id, settings, state, dense=True)

    compensation_on = bool(spec["options"].get("compensation"))
    snapshot = WriterSnapshot(model) if compensation_on else None
    stages: dict[str, Any] = {}
    recovery = spec.get("recovery")
    recovery_texts = None
    if recovery and recovery.get("dataset_id"):
        dataset = _dataset(recovery["dataset_id"], tenant_id, settings, state.sessions)
        recovery_texts = read_calibration_file(settings.data_dir / dataset.path)
    common: dict[str, Any] = {
        "method": spec["method"],
        "sparsity_basis": spec["sparsity_basis"],
        "options": spec["options"],
        "progress": state.progress,
        "should_cancel": state.should_cancel,
        "seed": spec.get("seed", 0),
        "tokenizer": tokenizer,
        "recovery": recovery,
        "recovery_texts": recovery_texts,
        "compensation_data": compensation,
    }

    def after_pruning(pruned: Any) -> None:
        # Dense -> pruned -> compensated -> recovered: measured here, before recovery changes weights.
        with timer("heldout"):
            if snapshot is not None and pruned.report.get("compensation", {}).get("kept"):
                with snapshot.original(pruned.model):
                    heldout.measure("pruned", pruned.model)
                heldout.measure("compensated", pruned.model)
            else:
                heldout.measure("pruned", pruned.model)
        if evaluation and recovery:
            stages["after_pruning"] = _evaluate(
                pruned.model, tokenizer, evaluation, spec, tenant_id, settings, state, dense=False
            )

    with timer("pruning_total"):
        if spec.get("target"):
            measure = _target_measure(spec["target"], tokenizer, tenant_id, settings, state)
            if isinstance(measure, PerplexityMeasure):
                measure.dense_cache = _dense_search_cache(measure, spec["model"], settings, model)
            outcome = pipeline.search(model, calibration, target=spec["target"], measure=measure, **common)
        else:
            outcome = pipeline.prune(
                model, calibration, target_sparsity=spec["target_sparsity"], after_pruning=after_pruning, **common
            )
    snapshot = None  # release the copy of the original writer weights
    with timer("heldout"):
        if "recovery" in outcome.report:
            heldout.measure("recovered", outcome.model)
        elif "pruned" not in heldout.points:  # a quality search publishes its chosen candidate
            heldout.measure("pruned", outcome.model)
    outcome.report["heldout"] = heldout.report()
    if evaluation:
        with timer("evaluating_pruned"):
            pruned_eval = _evaluate(outcome.model, tokenizer, evaluation, spec, tenant_id, settings, state, dense=False)
        outcome.report["evaluation"] = {"before": dense_eval, **stages, "after": pruned_eval}
    outcome.report["calibration"] = {**spec["calibration"], "tokens_sha256": tensor_sha256(calibration)}
    if compensation is not None:
        outcome.report["calibration"]["compensation_windows"] = int(compensation.shape[0])
        outcome.report["calibration"]["compensation_tokens_sha256"] = tensor_sha256(compensation)

    state.progress("saving", 0.0, "writing artifact")
    if state.should_cancel():
        raise JobCancelled()
    # Engine timings (scoring, compensating, ...) stay; the job-level stages are added beside them.
    outcome.report["timings"] = {**outcome.report.get("timings", {}), **timer.seconds()}
    with timer("saving"):
        files = write_artifact(outcome, tokenizer, out_dir, model_id=spec["model"], dtype=artifact_dtype)
    state.progress("saving", 0.9)
    outcome.report["timings"]["saving"] = timer.seconds()["saving"]
    return outcome.report, files


class HeldOut:
    """Held-out calibration rows and the quality measured on them at each point of the job."""

    def __init__(self, cal: dict[str, Any], ids: torch.Tensor, should_cancel: Any, disjoint: bool) -> None:
        self.cal = cal
        self.disjoint = disjoint
        self.ids = ids
        self.should_cancel = should_cancel
        self.points: dict[str, dict[str, Any]] = {}

    def measure(self, name: str, model: Any) -> None:
        self.points[name] = heldout_quality(model, self.ids, self.should_cancel)

    def report(self) -> dict[str, Any]:
        return {
            "source": self.cal["source"],
            "samples": int(self.ids.shape[0]),
            "seq_len": int(self.ids.shape[1]),
            # Self-generated rows are separate samples; dataset rows share no token with calibration
            # unless the upload is too short for that (then `disjoint` is false: read it with care).
            "disjoint": self.disjoint,
            "note": "rows drawn beside the calibration batch, never given to the method",
            **self.points,
        }


class StageTimer:
    """Wall seconds per job stage (summed when a stage runs more than once)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - started

    def seconds(self) -> dict[str, float]:
        return {stage: round(value, 3) for stage, value in self._seconds.items()}


def _dataset(dataset_id: str, tenant_id: str, settings: Settings, sessions: sessionmaker[Session]) -> Dataset:
    with sessions() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise EngineError("dataset_not_found", f"Dataset {dataset_id!r} no longer exists.")
    return dataset


def _calibration(
    spec: dict[str, Any], tenant_id: str, settings: Settings, model: Any, tokenizer: Any, state: JobState
) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
    """(calibration batch, held-out rows, disjoint, compensation windows or None): the held-out rows
    never reach the method.

    Compensation gets its own, larger budget (`compensation_samples` windows) from the same source:
    the calibration windows, then more from the dataset (never the held-out ones) or more
    self-generated text. Self-generated tokens are cached per (model, seed, count, length).
    """
    cal, seed, model_id = spec["calibration"], spec.get("seed", 0), spec["model"]
    n_heldout = holdout_count(cal["n_samples"])
    options = spec.get("options") or {}
    n_compensation = int(options.get("compensation_samples", 0)) if options.get("compensation") else 0
    state.progress("calibrating", 0.0, f"building {cal['n_samples']}x{cal['seq_len']} calibration tokens")
    if cal["source"] == "dataset":
        dataset = _dataset(cal["dataset_id"], tenant_id, settings, state.sessions)
        texts = read_calibration_file(settings.data_dir / dataset.path)
        n_extra = max(0, n_compensation - cal["n_samples"])
        calibration, heldout, extra, disjoint = job_windows(
            tokenizer, texts, cal["n_samples"], n_heldout, n_extra, cal["seq_len"], seed=seed
        )
        state.progress("calibrating", 1.0)
        compensation = compensation_batch(calibration, extra, n_compensation) if n_compensation else None
        return calibration, heldout, disjoint, compensation

    sampling = {
        "progress": state.progress,
        "should_cancel": state.should_cancel,
        "cache_dir": settings.data_dir / "calibration-cache",
        "model_key": dense_model_key(model_id, settings, model),
    }
    n_rows = n_heldout + cal["n_samples"]
    batch = self_generated_batches(model, tokenizer, n_rows, cal["seq_len"], seed=seed, **sampling)
    calibration, heldout = split_holdout(batch, n_heldout)
    compensation = None
    if n_compensation:
        compensation = self_generated_compensation(model, tokenizer, calibration, n_compensation, seed, **sampling)
    state.progress("calibrating", 1.0)
    return calibration, heldout, True, compensation


def _target_measure(target: dict[str, Any], tokenizer: Any, tenant_id: str, settings: Settings, state: JobState) -> Any:
    """The quality measure of a quality-targeted job (validated at submit: no overlap with training text)."""
    from workers.engine.evaluation import builtin_text, tokenize_text
    from workers.engine.search import perplexity_measure, zero_shot_measure

    if target.get("max_perplexity_ratio") is None:
        if settings.eval_data_dir is None:
            raise EngineError("eval_data_missing", "Zero-shot targets need SLIMFORGE_EVAL_DATA_DIR on the server.")
        return zero_shot_measure(tokenizer, target["tasks"], settings.eval_data_dir / "eval", target["limit"])
    name = target["perplexity_set"]
    if name.startswith("dataset:"):
        dataset = _dataset(name.removeprefix("dataset:"), tenant_id, settings, state.sessions)
        text = "\n\n".join(read_calibration_file(settings.data_dir / dataset.path))
    else:
        if settings.eval_data_dir is None:
            raise EngineError("eval_data_missing", f"Perplexity set {name!r} needs SLIMFORGE_EVAL_DATA_DIR.")
        text = builtin_text(name, settings.eval_data_dir)
    ids = tokenize_text(tokenizer, text, target["eval_tokens"])
    return perplexity_measure(ids, target["seq_len"])


def tensor_sha256(tokens: torch.Tensor) -> str:
    """Fingerprint of the exact calibration tokens, so two reports can be compared."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _evaluate(
    model: Any,
    tokenizer: Any,
    evaluation: dict[str, Any] | None,
    spec: dict[str, Any],
    tenant_id: str,
    settings: Settings,
    state: JobState,
    dense: bool,
) -> dict[str, Any] | None:
    if not evaluation:
        return None
    from workers.engine.evaluation import EvaluationConfig, builtin_text, cached_evaluate, evaluate

    config = EvaluationConfig.model_validate(evaluation)
    texts: dict[str, str] = {}
    for name in config.perplexity:
        if name.startswith("dataset:"):
            dataset = _dataset(name.removeprefix("dataset:"), tenant_id, settings, state.sessions)
            texts[name] = "\n\n".join(read_calibration_file(settings.data_dir / dataset.path))
        else:
            if settings.eval_data_dir is None:
                raise EngineError(
                    "eval_data_missing", f"Perplexity set {name!r} needs SLIMFORGE_EVAL_DATA_DIR on the server."
                )
            texts[name] = builtin_text(name, settings.eval_data_dir)
    if config.tasks and settings.eval_data_dir is None:
        raise EngineError("eval_data_missing", "Zero-shot tasks need SLIMFORGE_EVAL_DATA_DIR on the server.")
    data_dir = settings.eval_data_dir / "eval" if settings.eval_data_dir else None

    def compute() -> dict[str, Any]:
        return evaluate(
            model,
            tokenizer,
            config,
            texts=texts,
            data_dir=data_dir,
            progress=state.progress,
            should_cancel=state.should_cancel,
        )

    if not dense:
        return compute()
    # Dataset ids name immutable uploads, so every config (including "dataset:<id>" texts) caches safely.
    return cached_evaluate(settings.eval_cache_dir, dense_model_key(spec["model"], settings, model), config, compute)


def _dense_search_cache(measure: Any, model_id: str, settings: Settings, model: Any) -> Any:
    """The dense side of a perplexity budget, cached like dense evaluations: by model and exact tokens."""
    from workers.engine.evaluation import cached_evaluate

    config = {"search_dense_perplexity": tensor_sha256(measure.ids), "seq_len": measure.seq_len}
    key = dense_model_key(model_id, settings, model)
    return lambda compute: cached_evaluate(settings.eval_cache_dir, key, config, compute)


def dense_model_key(model_id: str, settings: Settings, model: Any) -> str:
    """Identify the dense weights and numerics: the id, plus a fingerprint of local files, plus device/dtype."""
    param = next(model.parameters())
    key = f"{model_id}|{param.device.type}|{param.dtype}"
    if model_id.startswith(("/", ".", "~")):
        root = Path(model_id).expanduser().resolve()
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file())
        key += "|" + hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
    return key


def _publish(
    sessions: sessionmaker[Session],
    state: JobState,
    tenant_id: str,
    work_dir: Path,
    report: dict[str, Any],
    files: list[dict[str, Any]],
    settings: Settings,
) -> str | None:
    """Move the finished directory into place and record it in one transaction; undo the move on failure."""
    artifact_id = new_id("art")
    final_dir = settings.artifacts_dir / artifact_id
    artifact = Artifact(
        id=artifact_id,
        tenant_id=tenant_id,
        job_id=state.job_id,
        path=final_dir.relative_to(settings.data_dir).as_posix(),
        total_bytes=sum(f["size"] for f in files),
    )
    os.replace(work_dir / "artifact", final_dir)

    def record() -> None:
        with session_scope(sessions) as session:
            if state.should_cancel():
                raise JobCancelled()
            session.add(artifact)
            session.flush()
            session.add_all(
                ArtifactFile(artifact_id=artifact.id, path=f["path"], size_bytes=f["size"], sha256=f["sha256"])
                for f in files
            )
            result = summarise(report)
            state.finish(session, "succeeded", artifact_id=artifact.id, result=result, progress=100.0, stage=None)

    try:
        retry_on_disconnect(record, settings.db_retry_seconds, f"publish {state.job_id}")
        return "succeeded"
    except BaseException:
        shutil.rmtree(final_dir, ignore_errors=True)
        raise


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The job's result: the report minus bulky per-decision details (those stay in the artifact)."""
    keep = {k: v for k, v in report.items() if k not in ("decisions", "versions")}
    return keep
