"""Options of projection compensation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["after_cut", "before_cut", "around_cut", "max_relative_shift", "max_shift"]


@dataclass
class CompensationConfig:
    placement: Placement = "around_cut"
    max_projections: int = 8
    ridge: float = 1.0  # lam = ridge * trace(X^T X) / d, so it is scale free
    refine_steps: int = 0
    refine_lr: float = 1e-4
    heldout_fraction: float = 0.25
    # At most this many windows judge the projections: judging runs the rest of the network and the LM
    # head per projection, so a fixed-size judge keeps larger fitting budgets cheap.
    max_heldout_samples: int = 8
    max_tokens: int = 16384  # rows kept in memory for the Adam refinement only; the solve streams all
    min_improvement: float = 0.0  # relative held-out loss drop a projection needs to be kept
    refit_on_all: bool = True  # once a projection passed the held-out check, refit it on fit + held-out rows
    # Judge each projection on the held-out windows (kept only if the loss drops). Off, every fitted
    # projection is kept unjudged: in-loop scaffolding, where the judge's forwards were half the cost.
    judged: bool = True
    micro_batch_size: int = 4
    # The original model's targets of every placement are captured in one pass, and the pruned
    # model's state is replayed from placement to placement (`PrefixReplay`), while they fit in this
    # many MiB (rows x d x 4 bytes per target layer, plus one for the state); beyond it each
    # placement re-runs both prefixes, so memory stays bounded.
    target_cache_mib: float = 1024.0
