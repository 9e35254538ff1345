"""Run one job: claim it, load the model, calibrate, evaluate, prune, save, publish atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.jobs_service import add_event
from app.models import Artifact, ArtifactFile, Dataset, Job, new_id, utcnow
from app.settings import Settings
from app.webhooks import notify_terminal
from workers.engine import pipeline
from workers.engine.artifact import write_artifact
from workers.engine.calibration import read_calibration_file, self_generated_batches, token_batches
from workers.engine.device import pick_device, pick_dtype
from workers.engine.modelzoo import load_model
from workers.engine.types import EngineError, JobCancelled
from workers.job_state import Heartbeat, JobState, LostOwnership

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


def run_job(job_id: str, settings: Settings, sessions: sessionmaker[Session]) -> str | None:
    """Execute a job if it is ours to run; returns its terminal status (None when skipped)."""
    status = _run_claimed(job_id, settings, sessions)
    if status is not None:
        notify_terminal(sessions, job_id, settings.webhook_secret)
    return status


def _run_claimed(job_id: str, settings: Settings, sessions: sessionmaker[Session]) -> str | None:
    attempt = claim(sessions, job_id)
    if attempt is None:
        log.info("job %s not claimed (not queued)", job_id)
        return None
    state = JobState(sessions, job_id, attempt)
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
    except LostOwnership:
        log.warning("job %s attempt %s lost ownership; abandoning", job_id, attempt)
        return None
    except EngineError as exc:
        return _end(sessions, state, "failed", code=exc.code, message=exc.message)
    except torch.cuda.OutOfMemoryError as exc:
        return _end(sessions, state, "failed", code="out_of_memory", message=f"The device ran out of memory: {exc}")
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _end(sessions, state, "failed", code="internal_error", message=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _end(
    sessions: sessionmaker[Session], state: JobState, status: str, code: str | None = None, message: str | None = None
) -> str | None:
    try:
        with session_scope(sessions) as session:
            values: dict[str, Any] = {}
            if code:
                values = {"error_code": code, "error_message": message, "error_stage": state.stage}
            state.finish(session, status, **values)
        return status
    except LostOwnership:
        return None


def _execute(
    spec: dict[str, Any], tenant_id: str, settings: Settings, state: JobState, out_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    device = pick_device(settings.device)
    state.progress("loading_model", 0.0, f"loading {spec['model']} on {device}")
    model, tokenizer = load_model(
        spec["model"],
        allowed_roots=settings.allowed_model_roots,
        cache_dir=settings.models_dir,
        device=device,
        dtype=pick_dtype(device),
    )
    state.progress("loading_model", 1.0)
    if state.should_cancel():
        raise JobCancelled()

    calibration = _calibration(spec["calibration"], tenant_id, settings, model, tokenizer, state, spec.get("seed", 0))
    evaluation = spec.get("evaluation")
    dense_eval = _evaluate(model, tokenizer, evaluation, spec, tenant_id, settings, state, dense=True)

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
    }
    if spec.get("target"):
        measure = _target_measure(spec["target"], tokenizer, tenant_id, settings, state)
        outcome = pipeline.search(model, calibration, target=spec["target"], measure=measure, **common)
    else:

        def evaluate_unrecovered(pruned: Any) -> None:
            # Dense -> pruned (+ compensated) -> recovered: the middle step is only distinct with recovery.
            if evaluation and recovery:
                stages["after_pruning"] = _evaluate(
                    pruned.model, tokenizer, evaluation, spec, tenant_id, settings, state, dense=False
                )

        outcome = pipeline.prune(
            model, calibration, target_sparsity=spec["target_sparsity"], after_pruning=evaluate_unrecovered, **common
        )
    if evaluation:
        pruned_eval = _evaluate(outcome.model, tokenizer, evaluation, spec, tenant_id, settings, state, dense=False)
        outcome.report["evaluation"] = {"before": dense_eval, **stages, "after": pruned_eval}
    outcome.report["calibration"] = {**spec["calibration"], "tokens_sha256": tensor_sha256(calibration)}

    state.progress("saving", 0.0, "writing artifact")
    if state.should_cancel():
        raise JobCancelled()
    files = write_artifact(outcome, tokenizer, out_dir, model_id=spec["model"])
    state.progress("saving", 0.9)
    return outcome.report, files


def _dataset(dataset_id: str, tenant_id: str, settings: Settings, sessions: sessionmaker[Session]) -> Dataset:
    with sessions() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise EngineError("dataset_not_found", f"Dataset {dataset_id!r} no longer exists.")
    return dataset


def _calibration(
    cal: dict[str, Any], tenant_id: str, settings: Settings, model: Any, tokenizer: Any, state: JobState, seed: int
) -> torch.Tensor:
    state.progress("calibrating", 0.0, f"building {cal['n_samples']}x{cal['seq_len']} calibration tokens")
    if cal["source"] == "dataset":
        dataset = _dataset(cal["dataset_id"], tenant_id, settings, state.sessions)
        texts = read_calibration_file(settings.data_dir / dataset.path)
        batch = token_batches(tokenizer, texts, cal["n_samples"], cal["seq_len"], seed=seed)
    else:
        batch = self_generated_batches(
            model,
            tokenizer,
            cal["n_samples"],
            cal["seq_len"],
            seed=seed,
            progress=state.progress,
            should_cancel=state.should_cancel,
        )
    state.progress("calibrating", 1.0)
    return batch


def _target_measure(
    target: dict[str, Any], tokenizer: Any, tenant_id: str, settings: Settings, state: JobState
) -> Any:
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
    try:
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
        return "succeeded"
    except BaseException:
        shutil.rmtree(final_dir, ignore_errors=True)
        raise


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The job's result: the report minus bulky per-decision details (those stay in the artifact)."""
    keep = {k: v for k, v in report.items() if k not in ("decisions", "versions")}
    return keep
