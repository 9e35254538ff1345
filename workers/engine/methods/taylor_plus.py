"""Taylor+ baseline (Kim et al., 2024, "Shortened LLaMA"): block importance sum |W * dL/dW|, one pass.

One forward+backward, one shot. As in the paper's "+" variant the first and last few blocks are
not candidates by default (the raw Taylor score tends to pick the first blocks, which breaks models).
"""

from __future__ import annotations

from pydantic import Field

from workers.engine.methods.gradient_scores import weight_scores
from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    one_shot_decisions,
    register_layer_method,
)

DEFAULT_FIRST, DEFAULT_LAST = 4, 2


class TaylorPlusOptions(LayerMethodOptions):
    protect_first: int | None = Field(
        None, ge=0, le=64, description="Never remove the first N layers (default 4, fewer if the model is too small)."
    )
    protect_last: int | None = Field(
        None, ge=0, le=64, description="Never remove the last N layers (default 2, fewer if the model is too small)."
    )

    def protection(self, n_layers: int, k: int) -> tuple[int, int]:
        first = DEFAULT_FIRST if self.protect_first is None else self.protect_first
        last = DEFAULT_LAST if self.protect_last is None else self.protect_last
        # Shrink only the defaulted sides until k layers can be removed; explicit values are honoured.
        while n_layers - first - last < k and self.protect_first is None and first > 0:
            first -= 1
        while n_layers - first - last < k and self.protect_last is None and last > 0:
            last -= 1
        return first, last


def select(inp: SelectorInput) -> Selection:
    ctx = inp.ctx
    calls = {"n": 0}
    values = weight_scores(
        ctx.model,
        ctx.calibration,
        "taylor_sum",
        ctx.options.micro_batch_size,
        ctx.check_cancel,
        lambda: calls.__setitem__("n", calls["n"] + 1),
    )
    scores = {layer: values[layer] for layer in inp.candidates}
    removed, decisions = one_shot_decisions(scores, inp.k)
    return Selection(
        removed=removed,
        decisions=decisions,
        forward_passes=1,
        backward_passes=1,
        extra={"score": "taylor_sum", "backward_calls": calls["n"]},
    )


register_layer_method(
    "taylor_plus",
    "Taylor+: block importance sum |W * dL/dW| from one backward pass (first 4 / last 2 kept).",
    TaylorPlusOptions,
    select,
)
