"""Run a pruned model's decoder blocks one at a time from a stored hidden state.

Compensation visits its placements in forward order, and a projection merged at a kept block
changes nothing before it. So instead of re-running the pruned prefix from the embeddings for
every placement, `PrefixReplay` keeps, per micro-batch, the hidden state entering the next block
to visit plus every block's call arguments (masks, position embeddings, ...) recorded in one real
forward, and advances block by block. Blocks are called with exactly the arguments the model's
own loop gave them, so their outputs are the ones a full forward computes. The held-out loss of a
candidate projection likewise runs only the blocks from its placement on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from workers.engine.hidden import (
    StopForward,
    block_input,
    capture_forward,
    first_tensor,
    forward_ids,
    micro_batches,
)
from workers.engine.layers import find_layers, layer_subset

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a block's arguments after the hidden state, and kwargs


class _CallRecorder:
    """Pre-hooks that record the input of block `first` and the call arguments of blocks first..last,
    then stop the forward at block `last` (before running it).

    Only block `first` computes: the blocks after it pass their input through while recording,
    since their arguments (masks, position embeddings) do not depend on the hidden state and the
    replay computes their outputs itself. A pass-through returns what block `first` returned in
    kind (a tensor, or a tuple with its extra items) so the model's loop reads it as usual."""

    def __init__(self, blocks: Sequence[nn.Module], first: int, last: int) -> None:
        self.blocks, self.first, self.last = blocks, first, last
        self.state: torch.Tensor | None = None
        self.calls: dict[int, Call] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._first_output: object = None
        self._saved_forwards: dict[int, object] = {}

    def __enter__(self) -> _CallRecorder:
        for position in range(self.first, self.last + 1):
            hook = self._hook(position)
            self._handles.append(self.blocks[position].register_forward_pre_hook(hook, with_kwargs=True))
        self._handles.append(self.blocks[self.first].register_forward_hook(self._keep_first_output))
        for position in range(self.first + 1, self.last):
            block = self.blocks[position]
            self._saved_forwards[position] = block.__dict__.get("forward")  # an instance-level patch, if any
            block.forward = self._pass_through
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for position, saved in self._saved_forwards.items():
            if saved is None:
                del self.blocks[position].forward
            else:
                self.blocks[position].forward = saved

    def _keep_first_output(self, module: nn.Module, args: tuple, output: object) -> None:
        self._first_output = output

    def _pass_through(self, *args: Any, **kwargs: Any) -> object:
        hidden = block_input(args, kwargs)
        if isinstance(self._first_output, tuple):
            return (hidden, *self._first_output[1:])
        return hidden

    def _hook(self, position: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if position == self.first:
                self.state = block_input(args, kwargs).detach()
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.calls[position] = (tuple(args[1:]), rest)
            if position == self.last:
                raise StopForward()

        return hook


def _inject(state: torch.Tensor) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]:
    """Pre-hook replacing a block's hidden-state input by `state`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

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
        # Called with (position, states) each time the states reach a new block: in-loop
        # compensation keeps them for later decisions (`from_states`).
        self.on_advance: Callable[[int, list[torch.Tensor]], None] | None = None
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

    @classmethod
    def from_states(
        cls,
        model: nn.Module,
        keep: Sequence[int],
        states: list[torch.Tensor],
        calls: list[dict[int, Call]],
        position: int,
    ) -> PrefixReplay:
        """A replay resumed from `states` entering block `position` of the pruned model (`keep`),
        with every later block's recorded `calls` (per micro-batch): no forward at all."""
        replay = cls.__new__(cls)
        replay.model, replay.keep, replay.position = model, list(keep), position
        replay.states, replay.calls, replay.on_advance = list(states), calls, None
        with layer_subset(model, replay.keep):
            replay.blocks = list(find_layers(model).layers)
        return replay

    def run_block(self, index: int, position: int) -> torch.Tensor:
        """Output of block `position` for micro-batch `index`, from the stored state (which must be there)."""
        assert position == self.position, f"replay is at block {self.position}, not {position}"
        args, kwargs = self.calls[index][position]
        with torch.no_grad():
            return first_tensor(self.blocks[position](self.states[index], *args, **kwargs)).detach()

    def loss(self, ids: torch.Tensor, micro_batch_size: int) -> float:
        """`lm_loss` of the pruned model on `ids` (this replay's windows, same micro-batches), running
        only the blocks from the current position on: their input is the stored state."""
        total, count = 0.0, 0
        with torch.no_grad(), layer_subset(self.model, self.keep[self.position :]):
            first = find_layers(self.model).layers[0]
            for index, batch in enumerate(micro_batches(ids, micro_batch_size)):
                handle = first.register_forward_pre_hook(_inject(self.states[index]), with_kwargs=True)
                try:
                    out = forward_ids(self.model, batch, labels=True)
                finally:
                    handle.remove()
                n = batch.shape[0] * (batch.shape[1] - 1)
                total += float(out.loss.float()) * n
                count += n
        return total / max(count, 1)

    def advance(self, position: int) -> None:
        """Run every micro-batch through the blocks before `position` (current weights): forward only."""
        assert position >= self.position, "placements must come in forward order"
        while self.position < position:
            self.states = [self.run_block(i, self.position) for i in range(len(self.states))]
            self.position += 1
            if self.on_advance is not None:
                self.on_advance(self.position, self.states)


@torch.no_grad()
def record_calls(
    model: nn.Module, ids: torch.Tensor, micro_batch_size: int
) -> tuple[list[torch.Tensor], list[dict[int, Call]]]:
    """Per micro-batch of `ids`: the hidden state entering block 0 (the embeddings) and the call
    arguments of every block of `model`, keyed by block index. A block's arguments (masks,
    position embeddings) depend on its own kind and the input's shape, not on the blocks before
    it, so a pruned model's blocks get the same ones."""
    blocks = list(find_layers(model).layers)
    states, calls = [], []
    for batch in micro_batches(ids, micro_batch_size):
        with _CallRecorder(blocks, 0, len(blocks) - 1) as recorder:
            capture_forward(model, batch)
        assert recorder.state is not None
        states.append(recorder.state)
        calls.append(recorder.calls)
    return states, calls
