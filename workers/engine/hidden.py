"""Hidden-state capture and calibration loss, shared by layer scorers and compensation.

Hooks sit on the decoder blocks themselves (not `output_hidden_states`, whose last entry HF
returns *after* the final norm), so "output of block i" always means the residual stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from workers.engine.layers import find_layers, model_device


def micro_batches(ids: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, ids.shape[0], max(1, size)):
        yield ids[start : start + size]


def first_tensor(value: object) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is one."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"Unexpected decoder block output type {type(value).__name__}")


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return first_tensor(args[0])
    return kwargs["hidden_states"]


class StopForward(Exception):
    """Raised by a hook once everything wanted has been captured, to skip the rest of the network."""


class BlockIO:
    """Record the input and/or output hidden states of chosen decoder blocks during forwards.

    `positions` are indices into the model's current layer list. With `keep_graph`, outputs keep
    their autograd graph and `retain_grad()`, so a scorer can read dL/dh_out after backward.
    """

    def __init__(
        self,
        model: nn.Module,
        positions: Sequence[int] | None = None,
        *,
        inputs: bool = True,
        outputs: bool = True,
        keep_graph: bool = False,
        dtype: torch.dtype | None = torch.float32,
        to_cpu: bool = False,
        stop_after: int | None = None,
    ) -> None:
        self.layers = find_layers(model).layers
        self.positions = list(range(len(self.layers))) if positions is None else list(positions)
        self.want_inputs = inputs
        self.want_outputs = outputs
        self.keep_graph = keep_graph
        self.dtype = dtype
        self.to_cpu = to_cpu
        self.stop_after = stop_after
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.keep_graph:
            return tensor
        tensor = tensor.detach()
        if self.dtype is not None:
            tensor = tensor.to(self.dtype)
        return tensor.cpu() if self.to_cpu else tensor

    def __enter__(self) -> BlockIO:
        for position in self.positions:
            block = self.layers[position]
            if self.want_inputs:
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(position), with_kwargs=True))
            if self.want_outputs:
                self._handles.append(block.register_forward_hook(self._post_hook(position)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def _pre_hook(self, position: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = block_input(args, kwargs)
            if self.keep_graph and hidden.requires_grad:
                hidden.retain_grad()
            self.inputs[position] = self._store(hidden)

        return hook

    def _post_hook(self, position: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            hidden = first_tensor(output)
            if self.keep_graph and hidden.requires_grad:
                hidden.retain_grad()
            self.outputs[position] = self._store(hidden)
            if position == self.stop_after:
                raise StopForward()

        return hook


def forward_ids(model: nn.Module, ids: torch.Tensor, labels: bool = False):
    """Forward a token batch without KV cache. Without labels only hidden states matter, so the LM
    head runs for the last position only (it is a large share of the cost for big vocabularies)."""
    ids = ids.to(model_device(model))
    if labels:
        return model(input_ids=ids, labels=ids, use_cache=False)
    try:
        return model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # a model class without `logits_to_keep`
        return model(input_ids=ids, use_cache=False)


def capture_forward(model: nn.Module, ids: torch.Tensor) -> None:
    """Forward for hooks only: a BlockIO with `stop_after` may end it early."""
    try:
        forward_ids(model, ids)
    except StopForward:
        pass


@torch.no_grad()
def lm_loss(model: nn.Module, ids: torch.Tensor, micro_batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over all predicted tokens of `ids` (fp32 accumulation)."""
    total = 0.0
    count = 0
    for batch in micro_batches(ids, micro_batch_size):
        out = forward_ids(model, batch, labels=True)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(out.loss.float()) * n
        count += n
    return total / max(count, 1)
