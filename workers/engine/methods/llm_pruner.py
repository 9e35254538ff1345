"""LLM-Pruner: structured width pruning of attention groups and MLP channels (DESIGN.md §1.2)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from transformers import PretrainedConfig

from workers.engine.params import count_parameters
from workers.engine.registry import Method, register
from workers.engine.types import EngineError, MethodOptions, PruneContext, PruneOutcome, SparsityBasis
from workers.engine.width.export import PLAIN_LOADING, REMOTE_LOADING, saver_for
from workers.engine.width.groups import BlockGeometry, decoder_layers, model_geometry
from workers.engine.width.importance import (
    GRADIENT_IMPORTANCE,
    collect_gradients,
    layer_scores,
    target_linears,
)
from workers.engine.width.plan import WidthPlan, resolve_layer_range, solve_plan
from workers.engine.width.prune import prune_block, update_config
from workers.engine.width.recovery import lora_recover


class LLMPrunerOptions(MethodOptions):
    importance: Literal["element1", "element2", "vector", "l2", "random"] = Field(
        "element1", description="Group importance: Taylor element-wise 1st/2nd order, vector-wise, L2, random."
    )
    aggregation: Literal["sum", "max", "prod", "last"] = Field(
        "sum", description="How a group's member scores (q/k/v/o or gate/up/down) are combined."
    )
    widths: Literal["uniform", "per_layer"] = Field(
        "uniform",
        description="uniform (default): prune every block at the same ratio, so the artifact is a plain checkpoint "
        "that stock from_pretrained and serving engines load; per_layer: the LLM-Pruner paper's protocol (first 4 "
        "and last 2 blocks kept whole), whose artifact needs from_pretrained(path, trust_remote_code=True).",
    )
    layer_start: int | None = Field(
        None,
        ge=0,
        description="First pruned block (default: 0 with uniform widths; 4 with per_layer, fewer under 12 blocks).",
    )
    layer_end: int | None = Field(
        None,
        description="End (exclusive) of the pruned blocks; negative counts from the end (default: all blocks with "
        "uniform widths; all but the last 2 with per_layer).",
    )
    prune_attention: bool = Field(True, description="Prune attention heads.")
    prune_mlp: bool = Field(True, description="Prune MLP channels.")
    prune_kv_heads: bool = Field(
        True,
        description="Remove whole KV groups (KV head + its query heads); off: keep KV heads and remove the "
        "same number of query heads in every KV group.",
    )
    channel_multiple: int = Field(1, ge=1, le=4096, description="Kept MLP channels are a multiple of this.")
    allow_per_layer_widths: bool = Field(
        True,
        description="Allow a layer range that leaves blocks unpruned (artifact then needs trust_remote_code); "
        "off: only all-block ranges, giving a plain checkpoint.",
    )
    sparsity_scope: Literal["total", "without_embeddings"] = Field(
        "total", description="Parameter count target_sparsity refers to."
    )
    scoring_batch_size: int = Field(4, ge=1, le=4096, description="Calibration samples per backward pass.")
    recovery: bool = Field(False, description="LoRA recovery after pruning, merged into the weights.")
    recovery_steps: int = Field(50, ge=1, le=1_000_000)
    recovery_lr: float = Field(2e-4, gt=0.0, le=1.0)
    recovery_batch_size: int = Field(4, ge=1, le=4096)
    recovery_seq_len: int | None = Field(None, ge=8, le=1_000_000, description="Default: the data's length.")
    lora_r: int = Field(8, ge=1, le=4096)
    lora_alpha: int = Field(16, ge=1, le=65536)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _range(self) -> LLMPrunerOptions:
        if self.layer_start is not None and self.layer_end is not None and 0 <= self.layer_end <= self.layer_start:
            raise ValueError(f"layer_end ({self.layer_end}) must be greater than layer_start ({self.layer_start})")
        return self


def _require_parameters_basis(basis: SparsityBasis) -> None:
    if basis != "parameters":
        raise EngineError(
            "unsupported_basis",
            "llm_pruner removes heads and channels, not whole layers: use sparsity_basis='parameters'.",
        )


def _solve(
    geoms: list[BlockGeometry], counts: dict[str, int], target: float, opts: LLMPrunerOptions
) -> tuple[WidthPlan, int]:
    start, end = opts.layer_start, opts.layer_end
    if opts.widths == "uniform":  # every block by default: the widths stay the same in all of them
        start = 0 if start is None else start
        end = len(geoms) if end is None else end
    pruned = resolve_layer_range(len(geoms), start, end)
    if not opts.allow_per_layer_widths and len(pruned) < len(geoms):
        raise EngineError(
            "per_layer_widths_not_allowed",
            f"Pruning blocks {pruned[0]}..{pruned[-1]} of {len(geoms)} gives per-layer widths, which need the "
            "artifact's own loader; set layer_start=0 and layer_end to the layer count, or allow_per_layer_widths.",
        )
    reference = counts["total"] if opts.sparsity_scope == "total" else counts["without_embeddings"]
    removed_target = round(target * reference)
    plan = solve_plan(
        geoms,
        pruned,
        removed_target,
        reference,
        prune_attention=opts.prune_attention,
        prune_mlp=opts.prune_mlp,
        prune_kv_heads=opts.prune_kv_heads,
        channel_multiple=opts.channel_multiple,
    )
    return plan, removed_target


def plan_llm_pruner(
    config: PretrainedConfig, target: float, basis: SparsityBasis, opts: LLMPrunerOptions
) -> dict[str, Any]:
    """Dry run from the config alone: the model is built on the meta device (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    _require_parameters_basis(basis)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    geoms = model_geometry(model)
    before = count_parameters(model)
    plan, removed_target = _solve(geoms, before, target, opts)
    after = {k: v - plan.removed_parameters for k, v in before.items()}
    return {
        "method": "llm_pruner",
        "target_sparsity": target,
        "sparsity_basis": basis,
        "sparsity_scope": opts.sparsity_scope,
        "target_removed_parameters": removed_target,
        "parameters_before": before,
        "parameters_after": after,
        "achieved_parameter_sparsity": plan.removed_parameters / before["total"],
        **plan.to_report(geoms),
        "artifact_format": "uniform" if plan.uniform else "per_layer",
        "loading": PLAIN_LOADING if plan.uniform else REMOTE_LOADING,
        **loading_warnings(plan.uniform),
    }


def loading_warnings(uniform: bool) -> dict[str, Any]:
    """A per-layer artifact loads only with its own code: say so wherever the user looks."""
    if uniform:
        return {}
    return {
        "warnings": {
            "loading": "Blocks have different widths, so stock from_pretrained and serving engines (vLLM, TGI, "
            f"llama.cpp) cannot load this artifact; load it with {REMOTE_LOADING}, or use widths='uniform'."
        }
    }


def run_llm_pruner(ctx: PruneContext) -> PruneOutcome:
    opts: LLMPrunerOptions = ctx.options  # type: ignore[assignment]
    _require_parameters_basis(ctx.sparsity_basis)
    model = ctx.model
    geoms = model_geometry(model)
    counts = count_parameters(model)
    plan, removed_target = _solve(geoms, counts, ctx.target_sparsity, opts)
    layers = decoder_layers(model)

    # Scoring: one pass of gradients over the calibration set (skipped for l2 / random).
    ctx.progress("scoring", 0.0, f"{opts.importance} importance over {ctx.calibration.shape[0]} samples")
    stats = None
    if opts.importance in GRADIENT_IMPORTANCE:
        linears = target_linears(model, plan.layer_indices)

        def on_step(done: int, total: int) -> None:
            ctx.progress("scoring", done / total, None)
            ctx.check_cancel()

        stats = collect_gradients(
            model,
            ctx.calibration,
            linears,
            batch_size=opts.scoring_batch_size,
            fisher=opts.importance == "element2",
            on_step=on_step,
        )
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {}
    with torch.no_grad():
        for i in plan.layer_indices:
            per_layer = None if stats is None else {name: stats[(i, name)] for (j, name) in stats if j == i}
            scores[i] = layer_scores(
                layers[i], geoms[i], per_layer, opts.importance, opts.aggregation, opts.prune_kv_heads, generator
            )
    del stats
    ctx.progress("scoring", 1.0, None)
    ctx.check_cancel()

    ctx.progress("pruning", 0.0, f"pruning {len(plan.layer_indices)} blocks")
    removed = {}
    for n, i in enumerate(plan.layer_indices):
        removed[i] = prune_block(layers[i], geoms[i], scores[i], plan.widths[i], opts.prune_kv_heads)
        ctx.progress("pruning", (n + 1) / len(plan.layer_indices), None)
    update_config(model.config, geoms, plan.widths)
    ctx.check_cancel()

    report: dict[str, Any] = {
        "sparsity_scope": opts.sparsity_scope,
        "target_removed_parameters": removed_target,
        **plan.to_report(geoms),
        "removed_groups": {
            str(i): {
                "kv_heads": r["kv_heads"],
                "query_heads": r["query_heads"],
                "n_channels": len(r["channels"]),
                "channels": r["channels"],
            }
            for i, r in removed.items()
        },
        "attention_scores": {str(i): [round(float(x), 6) for x in s.attention] for i, s in scores.items()},
    }

    if opts.recovery:
        data = ctx.recovery_data if ctx.recovery_data is not None else ctx.calibration
        ctx.progress("recovering", 0.0, f"LoRA r={opts.lora_r}, {opts.recovery_steps} steps")

        def on_recovery_step(done: int, total: int, loss: float) -> None:
            ctx.progress("recovering", done / total, f"loss {loss:.4f}")
            ctx.check_cancel()

        model, result = lora_recover(
            model,
            data,
            steps=opts.recovery_steps,
            lr=opts.recovery_lr,
            r=opts.lora_r,
            alpha=opts.lora_alpha,
            dropout=opts.lora_dropout,
            batch_size=opts.recovery_batch_size,
            seq_len=opts.recovery_seq_len,
            seed=ctx.seed,
            on_step=on_recovery_step,
        )
        report["recovery"] = {
            "data": "recovery_data" if ctx.recovery_data is not None else "calibration",
            "data_shape": list(data.shape),
            "steps": result.steps,
            "loss_curve": result.losses,
            "seconds": result.seconds,
        }

    save_model, fmt, loading = saver_for(model)
    report["artifact_format"] = fmt
    report["loading"] = loading
    report.update(loading_warnings(fmt == "uniform"))
    return PruneOutcome(model=model, report=report, save_model=save_model)


METHOD = register(
    Method(
        name="llm_pruner",
        kind="width",
        description="LLM-Pruner: gradient (Taylor) importance of coupled attention groups and MLP channels, "
        "same ratio in every pruned block (all blocks by default, a plain checkpoint), optional LoRA recovery.",
        options_model=LLMPrunerOptions,
        run=run_llm_pruner,
        plan=plan_llm_pruner,
    )
)
