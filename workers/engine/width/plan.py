"""Where and how much to prune: layer range, per-layer widths, and the ratio that meets a target.

Every pruned block loses the same fraction of attention units (whole KV groups, or query heads
uniformly in every KV group) and the same fraction of MLP channels, as in LLM-Pruner. Heads are
discrete, so the attention ratio is rounded first and the MLP ratio is then solved so that the
removed parameter count lands as close to the target as channel rounding allows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from workers.engine.types import EngineError
from workers.engine.width.groups import BlockGeometry

# Relative tolerance (fraction of the parameter count the target refers to) we guarantee.
TARGET_TOLERANCE = 0.01


@dataclass(frozen=True)
class LayerWidths:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass
class WidthPlan:
    layer_indices: list[int]  # blocks that are pruned
    widths: list[LayerWidths]  # every block, after pruning
    attention_ratio: float  # fraction of attention units removed per pruned block
    mlp_ratio: float  # fraction of MLP channels removed per pruned block
    removed_parameters: int

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1

    def to_report(self, geoms: list[BlockGeometry]) -> dict[str, Any]:
        return {
            "pruned_layers": self.layer_indices,
            "attention_ratio": round(self.attention_ratio, 6),
            "mlp_ratio": round(self.mlp_ratio, 6),
            "uniform_widths": self.uniform,
            "layer_widths": [
                {"layer": g.index, "pruned": g.index in self.layer_indices, **asdict(w)}
                for g, w in zip(geoms, self.widths, strict=True)
            ],
            "planned_removed_parameters": self.removed_parameters,
        }


def default_layer_range(n_layers: int) -> tuple[int, int]:
    """LLM-Pruner skips the first 4 and last 2 blocks; shrink that for shallow models."""
    if n_layers >= 12:
        return 4, n_layers - 2
    return n_layers * 4 // 32, n_layers - n_layers * 2 // 32


def resolve_layer_range(n_layers: int, start: int | None, end: int | None) -> list[int]:
    d_start, d_end = default_layer_range(n_layers)
    start = d_start if start is None else start
    end = d_end if end is None else end
    if end < 0:  # python-style: -2 means "all but the last two"
        end += n_layers
    if not 0 <= start < end <= n_layers:
        raise EngineError(
            "invalid_options",
            f"Layer range [{start}, {end}) is empty or outside the model's {n_layers} layers.",
        )
    return list(range(start, end))


def _round(x: float) -> int:
    return int(x + 0.5)


def _attention_keep(g: BlockGeometry, ratio: float, prune_kv_heads: bool) -> tuple[int, int]:
    """(query heads, KV heads) kept at this ratio; at least one unit stays."""
    if prune_kv_heads:
        kv = max(1, g.num_kv_heads - _round(ratio * g.num_kv_heads))
        return kv * g.n_rep, kv
    rep = max(1, g.n_rep - _round(ratio * g.n_rep))
    return rep * g.num_kv_heads, g.num_kv_heads


def _mlp_keep(g: BlockGeometry, ratio: float, multiple: int) -> int:
    keep = g.intermediate_size - ratio * g.intermediate_size
    keep = _round(keep / multiple) * multiple
    return min(g.intermediate_size, max(multiple, keep))


def _removed(geoms: list[BlockGeometry], pruned: list[int], widths: list[LayerWidths]) -> int:
    total = 0
    for i in pruned:
        g, w = geoms[i], widths[i]
        total += g.attention_params(g.num_heads, g.num_kv_heads) - g.attention_params(
            w.num_attention_heads, w.num_key_value_heads
        )
        total += g.mlp_params(g.intermediate_size) - g.mlp_params(w.intermediate_size)
    return total


def widths_at(
    geoms: list[BlockGeometry],
    pruned: list[int],
    attention_ratio: float,
    mlp_ratio: float,
    *,
    prune_kv_heads: bool,
    channel_multiple: int,
) -> list[LayerWidths]:
    out = []
    for g in geoms:
        if g.index in pruned:
            heads, kv = _attention_keep(g, attention_ratio, prune_kv_heads)
            inter = _mlp_keep(g, mlp_ratio, channel_multiple)
            out.append(LayerWidths(heads, kv, inter))
        else:
            out.append(LayerWidths(g.num_heads, g.num_kv_heads, g.intermediate_size))
    return out


def _bisect(f, target: int, lo: float = 0.0, hi: float = 1.0, iters: int = 50) -> float:
    """Smallest-error ratio for a non-decreasing step function f(ratio) -> removed params."""
    best, best_err = lo, abs(f(lo) - target)
    for _ in range(iters):
        mid = (lo + hi) / 2
        val = f(mid)
        if abs(val - target) < best_err:
            best, best_err = mid, abs(val - target)
        if val < target:
            lo = mid
        else:
            hi = mid
    if abs(f(hi) - target) < best_err:
        best = hi
    return best


def solve_plan(
    geoms: list[BlockGeometry],
    pruned: list[int],
    removed_target: int,
    reference_total: int,
    *,
    prune_attention: bool,
    prune_mlp: bool,
    prune_kv_heads: bool,
    channel_multiple: int,
) -> WidthPlan:
    """Per-layer widths removing `removed_target` parameters within ±1 % of `reference_total`."""
    if not (prune_attention or prune_mlp):
        raise EngineError("invalid_options", "Nothing to prune: prune_attention and prune_mlp are both off.")

    def removed(a: float, m: float) -> int:
        w = widths_at(geoms, pruned, a, m, prune_kv_heads=prune_kv_heads, channel_multiple=channel_multiple)
        return _removed(geoms, pruned, w)

    # One common ratio first (attention and MLP alike), then fix attention and refine the MLP.
    if prune_attention and prune_mlp:
        common = _bisect(lambda r: removed(r, r), removed_target)
        attention_ratio = common
        mlp_ratio = _bisect(lambda r: removed(attention_ratio, r), removed_target)
    elif prune_attention:
        attention_ratio, mlp_ratio = _bisect(lambda r: removed(r, 0.0), removed_target), 0.0
    else:
        attention_ratio, mlp_ratio = 0.0, _bisect(lambda r: removed(0.0, r), removed_target)
    widths = widths_at(
        geoms, pruned, attention_ratio, mlp_ratio, prune_kv_heads=prune_kv_heads, channel_multiple=channel_multiple
    )
    got = _removed(geoms, pruned, widths)
    if abs(got - removed_target) > TARGET_TOLERANCE * reference_total:
        reachable = removed(1.0 if prune_attention else 0.0, 1.0 if prune_mlp else 0.0)
        hint = ""
        if prune_attention and prune_kv_heads and any(geoms[i].num_kv_heads == 1 for i in pruned):
            hint = " This model has a single KV head per block: set prune_kv_heads=false to prune query heads."
        raise EngineError(
            "target_unreachable",
            f"Pruning layers {pruned[0]}..{pruned[-1]} can remove {got:,} parameters closest to the "
            f"{removed_target:,} asked for (at most {reachable:,}, {reachable / reference_total:.1%} of "
            f"{reference_total:,}); widen the layer range (layer_start/layer_end), allow more structures "
            "(prune_kv_heads, prune_attention, prune_mlp) or lower target_sparsity." + hint,
        )
    # Report the ratios actually realised in the first pruned block (all pruned blocks share them).
    g, w = geoms[pruned[0]], widths[pruned[0]]
    if prune_kv_heads:
        a_real = 1 - w.num_key_value_heads / g.num_kv_heads
    else:
        a_real = 1 - w.num_attention_heads / g.num_heads
    m_real = 1 - w.intermediate_size / g.intermediate_size
    return WidthPlan(pruned, widths, a_real, m_real, got)
