"""ShortGPT baseline: Block Influence BI_i = E_t[1 - cos(h_in, h_out)], one forward pass, one shot.

Layers whose output is nearly parallel to their input change the residual stream least and are
removed first (Men et al., 2024).
"""

from __future__ import annotations

import torch

from workers.engine.hidden import block_input, first_tensor, forward_ids, micro_batches
from workers.engine.layers import find_layers
from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    one_shot_decisions,
    register_layer_method,
)


class ShortGPTOptions(LayerMethodOptions):
    """ShortGPT options (the shared ones; compensation off by default)."""


@torch.no_grad()
def block_influence(model: torch.nn.Module, ids: torch.Tensor, micro_batch_size: int, check_cancel) -> list[float]:
    """Mean over calibration tokens of 1 - cos(input, output), per layer of the current model.

    Computed inside the hooks, so only one block's input is held at a time (no per-layer copies).
    """
    layers = find_layers(model).layers
    totals = torch.zeros(len(layers), dtype=torch.float64)
    pending: dict[int, torch.Tensor] = {}

    def pre(index: int):
        def hook(module, args, kwargs):
            pending[index] = block_input(args, kwargs)

        return hook

    def post(index: int):
        def hook(module, args, output):
            h_in = pending.pop(index).float()
            h_out = first_tensor(output).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            totals[index] += (1.0 - cos).double().sum().cpu()

        return hook

    handles = []
    for index, block in enumerate(layers):
        handles.append(block.register_forward_pre_hook(pre(index), with_kwargs=True))
        handles.append(block.register_forward_hook(post(index)))
    try:
        for batch in micro_batches(ids, micro_batch_size):
            check_cancel()
            forward_ids(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return (totals / ids.numel()).tolist()


def select(inp: SelectorInput) -> Selection:
    ctx = inp.ctx
    influence = block_influence(ctx.model, ctx.calibration, ctx.options.micro_batch_size, ctx.check_cancel)
    scores = {layer: influence[layer] for layer in inp.candidates}
    removed, decisions = one_shot_decisions(scores, inp.k)
    return Selection(removed=removed, decisions=decisions, forward_passes=1, extra={"score": "block_influence"})


register_layer_method(
    "shortgpt",
    "ShortGPT block influence (1 - cos(in, out)), one forward pass; removes the k least influential.",
    ShortGPTOptions,
    select,
)
