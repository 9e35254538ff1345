"""Run a pruned model's decoder blocks one at a time from a stored hidden state.

Compensation visits its placements in forward order, and a projection merged at a kept block
changes nothing before it. So instead of re-running the pruned prefix from the embeddings for
every placement, `PrefixReplay` keeps, per micro-batch, the hidden state entering the next block
to visit plus every block's call arguments (masks, position embeddings, ...) recorded in one real
forward, and advances block by block. Blocks are called with exactly the arguments the model's
own loop gave them, so their outputs are the ones a full forward computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from workers.engine.hidden import StopForward, block_input, capture_forward, first_tensor, micro_batches
from workers.engine.layers import find_layers, layer_subset

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a block's arguments after the hidden state, and kwargs


class _CallRecorder:
    """Pre-hooks that record the input of block `first` and the call arguments of blocks first..last,
    then stop the forward at block `last` (before running it)."""

    def __init__(self, blocks: Sequence[nn.Module], first: int, last: int) -> None:
        self.blocks, self.first, self.last = blocks, first, last
        self.state: torch.Tensor | None = None
        self.calls: dict[int, Call] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _CallRecorder:
        for position in range(self.first, self.last + 1):
            hook = self._hook(position)
            self._handles.append(self.blocks[position].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, position: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if position == self.first:
                self.state = block_input(args, kwargs).detach()
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.calls[position] = (tuple(args[1:]), rest)
            if position == self.last:
                raise StopForward()

        return hook


class PrefixReplay:
    """Per micro-batch of `ids`: the pruned model's (`keep`) hidden state entering block `position`."""

    def __init__(
        self,
        model: nn.Module,
        keep: Sequence[int],
        ids: torch.Tensor,
        micro_batch_size: int,
        first: int,
        last: int,
        check_cancel: Callable[[], None] = lambda: None,
    ) -> None:
        self.model, self.keep = model, list(keep)
        self.position = first
        self.states: list[torch.Tensor] = []
        self.calls: list[dict[int, Call]] = []
        with torch.no_grad(), layer_subset(model, self.keep):
            blocks = list(find_layers(model).layers)
            for batch in micro_batches(ids, micro_batch_size):
                check_cancel()
                with _CallRecorder(blocks, first, last) as recorder:
                    capture_forward(model, batch)
                assert recorder.state is not None, "the forward never reached the first placement"
                self.states.append(recorder.state)
                self.calls.append(recorder.calls)
        self.blocks = blocks

    def run_block(self, index: int, position: int) -> torch.Tensor:
        """Output of block `position` for micro-batch `index`, from the stored state (which must be there)."""
        assert position == self.position, f"replay is at block {self.position}, not {position}"
        args, kwargs = self.calls[index][position]
        with torch.no_grad():
            return first_tensor(self.blocks[position](self.states[index], *args, **kwargs)).detach()

    def advance(self, position: int) -> None:
        """Run every micro-batch through the blocks before `position` (current weights): forward only."""
        assert position >= self.position, "placements must come in forward order"
        while self.position < position:
            self.states = [self.run_block(i, self.position) for i in range(len(self.states))]
            self.position += 1
