"""A rough time estimate of a recovery run for the dry-run plan (compute-bound model)."""

from __future__ import annotations

from typing import Any

from workers.engine.recovery.config import RecoveryConfig

# Sustained training throughput in FLOP/s; CPU measured on SmolLM2-135M (docs/benchmarks/recovery.md).
THROUGHPUT = {"cpu": 2.0e10, "cuda": 5.0e13}


def flops_per_token(n_params: int, config: RecoveryConfig) -> float:
    """Forward = 2N FLOPs/token; the student's backward ~2N more (activations only, LoRA) or 4N (blocks)."""
    student = 2 * n_params + (2 * n_params if config.train == "lora" else 4 * n_params)
    teacher = 2 * n_params if config.method == "distill" else 0
    return float(student + teacher)


def estimate(config: RecoveryConfig, n_params: int, device: str = "cpu") -> dict[str, Any]:
    tokens = config.planned_steps * config.tokens_per_step
    flops = tokens * flops_per_token(n_params, config)
    generated = config.n_samples if config.data == "self_generated" else 0
    if config.data == "mix":
        generated = round(config.n_samples * config.mix_fraction)
    # Sampling text costs one forward per new token (with KV cache), batch-parallel.
    flops += generated * config.seq_len * 2 * n_params
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return {
        # The resolved default, so the plan shows the loss that will run.
        "ce_weight": config.ce_weight_in_use,
        "steps": config.planned_steps,
        "tokens": tokens,
        "self_generated_sequences": generated,
        "estimated_seconds": round(flops / THROUGHPUT[kind], 1),
        "estimate_device": kind,
    }
