"""Projection compensation for layer pruning (GradMAP stage 2, usable after any layer selector).

After a selector has chosen the layers to drop, the pruned model's hidden states drift away from
the original's. We
1. measure the drift per kept layer on calibration data (relative to the hidden-state norm),
2. pick where to correct it: by default (`around_cut`) the kept layers right before and right
   after each removed block, each tried in forward order (the DESIGN trial found the layer after a
   cut to work, unlike "largest absolute shift near the end"; trying both sides measured best,
   docs/benchmarks/layer-pruning.md),
3. solve one d x d projection P in closed form,
       P = argmin ||X P - T||^2 + lam ||P - I||^2  =>  (X^T X + lam I) P = X^T T + lam I,
   where X is the output of the placement layer's last residual writer (`down_proj`) and T the part
   of the original hidden state that writer must produce. X^T X and X^T T are summed micro-batch
   by micro-batch in one streaming pass (`NormalEquations`), so the fit can use many more tokens
   than scoring (its own `compensation_samples` budget) without memory growing with the rows;
   optionally refine P with a few Adam steps on the exact objective (needed when a norm follows
   the writer, as in Gemma's sandwich norms; only this keeps rows, at most `max_tokens`),
4. merge P into that writer's weight (W <- P^T W, b <- b P), so the saved model has no extra module,
5. validate on a held-out split of the compensation tokens and keep the change only if the
   held-out next-token loss improves; a kept projection is then refitted on all rows (fit +
   held-out normal equations added).

The original model is the same module with all layers; the pruned one is a `layer_subset` view, so
no weights are copied.
"""

from workers.engine.compensation.config import CompensationConfig, Placement
from workers.engine.compensation.drift import choose_placements, measure_shift, original_outputs, target_index
from workers.engine.compensation.fit import compensate
from workers.engine.compensation.solve import (
    NormalEquations,
    apply_writer,
    design_rows,
    fit_projection,
    refine_projection,
    ridge_projection,
)
from workers.engine.compensation.streaming import capture_pruned, original_targets, stream_placement
from workers.engine.compensation.writers import OriginalWeights, find_writer, merge_projection, snapshot_linear

__all__ = [
    "CompensationConfig",
    "NormalEquations",
    "OriginalWeights",
    "Placement",
    "apply_writer",
    "capture_pruned",
    "choose_placements",
    "compensate",
    "design_rows",
    "find_writer",
    "fit_projection",
    "measure_shift",
    "merge_projection",
    "original_outputs",
    "original_targets",
    "refine_projection",
    "ridge_projection",
    "snapshot_linear",
    "stream_placement",
    "target_index",
]
