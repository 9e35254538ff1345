"""The residual writer (`down_proj`) a projection is merged into, and its unmerged originals."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from workers.engine.layers import find_layers

# Last linear map of a block whose output is added to the residual stream, and the norm that some
# architectures (Gemma-2/3, OLMo-2) put between it and the residual add.
_WRITER_NAMES = ("mlp.down_proj", "mlp.fc2", "feed_forward.w2", "mlp.c_proj", "mlp.dense_4h_to_h")
_POST_NORM_NAMES = ("post_feedforward_layernorm",)


def find_writer(block: nn.Module) -> tuple[nn.Linear, nn.Module | None, str] | None:
    """(last residual writer Linear, norm applied after it or None, its name), or None if unknown."""
    for name in _WRITER_NAMES:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            norms = [getattr(block, n, None) for n in _POST_NORM_NAMES]
            post = next((m for m in norms if isinstance(m, nn.Module)), None)
            return module, post, name
    return None


def snapshot_linear(linear: nn.Linear) -> Callable[[], None]:
    """Copy a Linear's weight (and bias); the returned function puts them back."""
    weight = linear.weight.detach().clone()
    bias = None if linear.bias is None else linear.bias.detach().clone()

    @torch.no_grad()
    def restore() -> None:
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)

    return restore


@torch.no_grad()
def merge_projection(writer: nn.Linear, projection: torch.Tensor) -> None:
    """Make `writer(x)` return `writer(x) @ P`: W <- P^T W, b <- b P (computed in fp32)."""
    p = projection.to(device=writer.weight.device, dtype=torch.float32)
    writer.weight.copy_((p.T @ writer.weight.float()).to(writer.weight.dtype))
    if writer.bias is not None:
        writer.bias.copy_((writer.bias.float() @ p).to(writer.bias.dtype))


class OriginalWeights:
    """Unmerged copies of residual writers, swapped in by reference while the original model runs.

    The pruned model is a view of the same modules, so once a projection is merged the original
    model would see it too; streaming captures need the original's targets after every merge.
    """

    def __init__(self, writers: Sequence[nn.Linear]) -> None:
        self._saved = [
            (w, w.weight.detach().clone(), None if w.bias is None else w.bias.detach().clone()) for w in writers
        ]

    @classmethod
    def of_model(cls, model: nn.Module) -> OriginalWeights:
        """Every block's residual writer (blocks without a known writer are never merged into)."""
        return cls([found[0] for block in find_layers(model).layers if (found := find_writer(block))])

    @torch.no_grad()
    def restore(self, writers: Collection[nn.Linear] | None = None) -> None:
        """Copy the original values back into `writers` (default: all) -- undoes their merges."""
        for writer, weight, bias in self._saved:
            if writers is None or any(writer is w for w in writers):
                writer.weight.copy_(weight)
                if bias is not None:
                    writer.bias.copy_(bias)

    @contextmanager
    def active(self) -> Iterator[None]:
        current = [(w, w.weight.data, None if w.bias is None else w.bias.data) for w, _, _ in self._saved]
        for writer, weight, bias in self._saved:
            writer.weight.data = weight
            if bias is not None:
                writer.bias.data = bias
        try:
            yield
        finally:
            for writer, weight, bias in current:
                writer.weight.data = weight
                if bias is not None:
                    writer.bias.data = bias
