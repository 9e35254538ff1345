"""In-loop compensation for iterative selectors: after every cut, refit the projections next to it,
so the next scoring sees a model close to the one compensation will finally produce.

The fits are scaffolding for the next decision only (no refit on all rows); the final compensation
is refitted from the original weights on the job's compensation budget. The original model's
targets of every layer are captured once and reused by every decision, since the original never
changes. So are the pruned model's hidden states entering each kept block: a decision changes
nothing before its first refitted neighbour, so the next fit resumes from the last state still
valid instead of re-running the pruned prefix from the embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from workers.engine.compensation import CompensationConfig, OriginalWeights, compensate, find_writer
from workers.engine.compensation.fit import split_targets, split_windows
from workers.engine.compensation.replay import PrefixReplay, record_calls
from workers.engine.compensation.streaming import target_cache_fits
from workers.engine.layers import find_layers

EMBEDDINGS = -1  # key of the states entering the first block: they never change


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
        # Pruned-model states entering kept blocks (original index -> per micro-batch), all valid now.
        self._states: dict[int, list[torch.Tensor]] = {}
        self._calls: list[dict[int, Any]] = []
        if self._targets is not None:  # replays (and so these states) are used only with cached targets
            fit_ids = split_windows(ids, self.config)[0]
            self._states[EMBEDDINGS], self._calls = record_calls(model, fit_ids, self.config.micro_batch_size)
            self._state_budget = (int(fit_ids.numel()), self._states[EMBEDDINGS][0].shape[-1])

    def _replay(self, keep: list[int], first: int, last: int) -> PrefixReplay:
        """The fit split's replay at `first`, resumed from the latest valid state before it."""
        start, position = EMBEDDINGS, 0
        for p in range(first, -1, -1):
            if keep[p] in self._states:
                start, position = keep[p], p
                break
        calls = [{p: per_block[index] for p, index in enumerate(keep)} for per_block in self._calls]
        replay = PrefixReplay.from_states(self.model, keep, self._states[start], calls, position)

        def remember(position: int, states: list[torch.Tensor]) -> None:
            tokens, dim = self._state_budget
            if target_cache_fits(tokens, dim, len(self._states) + 1, self.config.target_cache_mib):
                self._states[keep[position]] = states

        replay.on_advance = remember
        return replay

    def _forget_after(self, layer: int) -> None:
        """Drop the states that a change at `layer` (a cut, or a new writer) makes stale: those after it."""
        self._states = {index: states for index, states in self._states.items() if index <= layer}

    def after_cut(self, removed: list[int], chosen: int) -> dict[str, Any]:
        """Refit after `chosen` was removed (the last of `removed`); the decision's record fields."""
        started = time.perf_counter()
        n_layers = len(self.layers)
        kept = [i for i in range(n_layers) if i not in set(removed)]
        only = None
        if self.incremental:
            only = cut_neighbours(n_layers, removed, chosen)
            self.originals.restore([found[0] for i in only if (found := find_writer(self.layers[i]))])
            self._forget_after(min([chosen, *only]))
        else:
            self.originals.restore()  # refit every projection from the original weights
            self._forget_after(EMBEDDINGS)
        fitted = compensate(
            self.model,
            kept,
            self.ids,
            self.config,
            check_cancel=self.check_cancel,
            only_layers=only,
            originals=self.originals,
            known_targets=self._targets,
            fit_replay=self._replay if self._calls else None,
        )
        # States the fit recorded up to its last placement are valid; later ones saw its old writer.
        changed = [chosen, *fitted.get("tried_layers", [])]
        self._forget_after(max(changed) if self.incremental else EMBEDDINGS)
        refitted = set(kept if only is None else only) | {chosen}
        self.carrying = sorted(set(self.carrying) - refitted | set(fitted.get("layers", [])))
        # Not counted in the passes: a handful of forwards (captures, held-out losses).
        return {
            "in_loop_compensation": self.carrying,
            "in_loop_compensation_seconds": round(time.perf_counter() - started, 4),
        }

    def restore(self) -> None:
        self.originals.restore()
