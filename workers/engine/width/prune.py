"""Physically remove the least important groups: slice Linear weights, update module attributes."""

from __future__ import annotations

import torch
from torch import nn

from workers.engine.width.groups import BlockGeometry, head_rows, kv_group_query_heads
from workers.engine.width.importance import LayerScores
from workers.engine.width.plan import LayerWidths


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending order (keeps the original layout)."""
    # Stable ordering on ties so equal scores prune the later units deterministically.
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


@torch.no_grad()
def slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0, output features) or columns (dim=1, input features) `index` of `lin`, in place."""
    index = index.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.index_select(dim, index).clone(), requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, index).clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = index.numel()
    else:
        lin.in_features = index.numel()


def kept_attention(
    geom: BlockGeometry, scores: torch.Tensor, width: LayerWidths, prune_kv_heads: bool
) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) to keep, original indices, in HF `repeat_kv` order."""
    if prune_kv_heads:
        kv = _top(scores, width.num_key_value_heads).tolist()
        heads = [h for k in kv for h in kv_group_query_heads(k, geom.n_rep)]
        return heads, kv
    # Keep KV heads; keep the same number of query heads in every KV group so GQA stays valid.
    per_group = width.num_attention_heads // geom.num_kv_heads
    heads = []
    for k in range(geom.num_kv_heads):
        members = torch.tensor(kv_group_query_heads(k, geom.n_rep))
        heads += members[_top(scores[members], per_group)].tolist()
    return heads, list(range(geom.num_kv_heads))


def prune_block(
    layer: nn.Module, geom: BlockGeometry, scores: LayerScores, width: LayerWidths, prune_kv_heads: bool
) -> dict[str, list[int]]:
    """Prune one decoder block to `width`; return the removed original head/KV-head/channel indices."""
    attn, mlp = layer.self_attn, layer.mlp
    removed: dict[str, list[int]] = {"query_heads": [], "kv_heads": [], "channels": []}
    if (width.num_attention_heads, width.num_key_value_heads) != (geom.num_heads, geom.num_kv_heads):
        heads, kv = kept_attention(geom, scores.attention, width, prune_kv_heads)
        q_idx = head_rows(heads, geom.head_dim)
        kv_idx = head_rows(kv, geom.head_dim)
        slice_linear(attn.q_proj, q_idx, 0)
        slice_linear(attn.k_proj, kv_idx, 0)
        slice_linear(attn.v_proj, kv_idx, 0)
        slice_linear(attn.o_proj, q_idx, 1)
        # Attention reshapes by head_dim; only the GQA repeat count is stored on the module.
        attn.num_key_value_groups = len(heads) // len(kv)
        for name, value in (("num_heads", len(heads)), ("num_key_value_heads", len(kv))):
            if hasattr(attn, name):
                setattr(attn, name, value)
        removed["query_heads"] = sorted(set(range(geom.num_heads)) - set(heads))
        removed["kv_heads"] = sorted(set(range(geom.num_kv_heads)) - set(kv))
    if width.intermediate_size != geom.intermediate_size:
        keep = _top(scores.mlp, width.intermediate_size)
        slice_linear(mlp.gate_proj, keep, 0)
        slice_linear(mlp.up_proj, keep, 0)
        slice_linear(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width.intermediate_size
        removed["channels"] = sorted(set(range(geom.intermediate_size)) - set(keep.tolist()))
    return removed


def update_config(config, geoms: list[BlockGeometry], widths: list[LayerWidths]) -> None:
    """Write uniform widths into the standard config fields; per-layer widths into a list.

    head_dim is always written explicitly: LLaMA derives it from hidden_size / num_attention_heads
    otherwise, which would be wrong after removing heads.
    """
    config.head_dim = geoms[0].head_dim
    if len(set(widths)) == 1:
        w = widths[0]
        config.num_attention_heads = w.num_attention_heads
        config.num_key_value_heads = w.num_key_value_heads
        config.intermediate_size = w.intermediate_size
        if hasattr(config, "slimforge_layer_widths"):
            del config.slimforge_layer_widths
    else:
        config.slimforge_layer_widths = {
            "num_attention_heads": [w.num_attention_heads for w in widths],
            "num_key_value_heads": [w.num_key_value_heads for w in widths],
            "intermediate_size": [w.intermediate_size for w in widths],
        }
