"""In-loop compensation for iterative selectors: after every cut, refit the projections next to it,
so the next scoring sees a model close to the one compensation will finally produce.

The fits are scaffolding for the next decision only (no refit on all rows); the final compensation
is refitted from the original weights on the job's compensation budget. The original model's
targets of every layer are captured once and reused by every decision, since the original never
changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from workers.engine.compensation import CompensationConfig, OriginalWeights, compensate, find_writer
from workers.engine.compensation.fit import split_targets
from workers.engine.layers import find_layers


def cut_neighbours(n_layers: int, removed: Collection[int], cut: int) -> list[int]:
    """Kept layers right before and right after the removed block that contains `cut`.

    Only their projections change targets when `cut` is removed: every other kept layer still
    reproduces the same original layer as before.
    """
    gone = set(removed)
    start = end = cut
    while start - 1 in gone:
        start -= 1
    while end + 1 in gone:
        end += 1
    return [i for i in (start - 1, end + 1) if 0 <= i < n_layers]


class InLoopCompensation:
    """Projections fitted after each decision on `ids`; `restore()` puts every original writer back."""

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        config: CompensationConfig,
        incremental: bool,
        check_cancel: Callable[[], None],
        judged: bool = False,
    ) -> None:
        self.model, self.ids, self.incremental, self.check_cancel = model, ids, incremental, check_cancel
        # Scaffolding: no second capture per projection, and by default no held-out judge either.
        self.config = replace(config, refit_on_all=False, judged=judged)
        self.layers = find_layers(model).layers
        self.originals = OriginalWeights.of_model(model)
        self.carrying: list[int] = []  # kept layers currently carrying an in-loop projection
        self._targets = split_targets(
            model, range(len(self.layers)), ids, self.config, self.originals, check_cancel, heldout=False
        )

    def after_cut(self, removed: list[int], chosen: int) -> dict[str, Any]:
        """Refit after `chosen` was removed (the last of `removed`); the decision's record fields."""
        started = time.perf_counter()
        n_layers = len(self.layers)
        kept = [i for i in range(n_layers) if i not in set(removed)]
        only = None
        if self.incremental:
            only = cut_neighbours(n_layers, removed, chosen)
            self.originals.restore([found[0] for i in only if (found := find_writer(self.layers[i]))])
        else:
            self.originals.restore()  # refit every projection from the original weights
        fitted = compensate(
            self.model,
            kept,
            self.ids,
            self.config,
            check_cancel=self.check_cancel,
            only_layers=only,
            originals=self.originals,
            known_targets=self._targets,
        )
        refitted = set(kept if only is None else only) | {chosen}
        self.carrying = sorted(set(self.carrying) - refitted | set(fitted.get("layers", [])))
        # Not counted in the passes: a handful of forwards (captures, held-out losses).
        return {
            "in_loop_compensation": self.carrying,
            "in_loop_compensation_seconds": round(time.perf_counter() - started, 4),
        }

    def restore(self) -> None:
        self.originals.restore()
