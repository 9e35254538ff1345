"""Coupled structures of LLaMA-style decoder blocks, and the check that a model has them.

An attention *KV group* is KV head h with the query heads h*n_rep ... h*n_rep+n_rep-1 that HF's
`repeat_kv` pairs with it: rows of q/k/v_proj (and their biases) plus the matching o_proj columns.
A *query head* is one head's q_proj rows + o_proj columns (used when KV heads are kept).
An *MLP channel* j is row j of gate_proj/up_proj and column j of down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.engine.types import EngineError

# Model types whose attention reshapes by `head_dim` (not the config's head counts) and whose
# q_norm/k_norm (where present) act per head_dim, so slicing whole heads keeps them valid.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BlockGeometry:
    """Widths of one decoder block, read from its modules (so earlier pruning is respected)."""

    index: int
    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    gate_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def query_head_params(self) -> int:
        """Parameters removed with one query head (q rows + bias, o columns)."""
        return self.head_dim * (self.hidden_size + self.q_bias) + self.head_dim * self.hidden_size

    @property
    def kv_head_params(self) -> int:
        """Parameters of one KV head alone (k and v rows + biases)."""
        return self.head_dim * (2 * self.hidden_size + self.k_bias + self.v_bias)

    @property
    def kv_group_params(self) -> int:
        return self.kv_head_params + self.n_rep * self.query_head_params

    @property
    def channel_params(self) -> int:
        return 3 * self.hidden_size + self.gate_bias + self.up_bias

    def attention_params(self, num_heads: int, num_kv_heads: int) -> int:
        return num_heads * self.query_head_params + num_kv_heads * self.kv_head_params

    def mlp_params(self, intermediate: int) -> int:
        return intermediate * self.channel_params


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (e.g. `model.model.layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EngineError(
            "unsupported_architecture",
            f"Width pruning needs a decoder with a `layers` list; {type(model).__name__} has none.",
        )
    return layers


def check_supported(model: nn.Module) -> None:
    """Raise an EngineError naming what is unsupported, before any work is done."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(
            "unsupported_architecture",
            f"llm_pruner supports LLaMA-style blocks ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"model type {model_type!r} ({type(model).__name__}) is not supported.",
        )
    for index, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        for owner, names, label in ((attn, ATTN_PROJ, "self_attn"), (mlp, MLP_PROJ, "mlp")):
            missing = [n for n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
            if owner is None or missing:
                raise EngineError(
                    "unsupported_architecture",
                    f"Layer {index} of {type(model).__name__} has no separate nn.Linear {label}."
                    f"{'/'.join(missing or names)} (fused or mixture-of-experts blocks are not supported).",
                )
        if not isinstance(getattr(attn, "head_dim", None), int):
            raise EngineError("unsupported_architecture", f"Layer {index}'s attention has no integer head_dim.")


def block_geometry(index: int, layer: nn.Module) -> BlockGeometry:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    num_heads = attn.q_proj.out_features // head_dim
    num_kv = attn.k_proj.out_features // head_dim
    if num_heads * head_dim != attn.q_proj.out_features or num_kv == 0 or num_heads % num_kv:
        raise EngineError(
            "unsupported_architecture",
            f"Layer {index}: q_proj/k_proj widths ({attn.q_proj.out_features}/{attn.k_proj.out_features}) "
            f"are not whole heads of head_dim {head_dim} with a whole number of query heads per KV head.",
        )
    return BlockGeometry(
        index=index,
        hidden_size=attn.q_proj.in_features,
        head_dim=head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        intermediate_size=mlp.gate_proj.out_features,
        q_bias=attn.q_proj.bias is not None,
        k_bias=attn.k_proj.bias is not None,
        v_bias=attn.v_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        gate_bias=mlp.gate_proj.bias is not None,
        up_bias=mlp.up_proj.bias is not None,
        down_bias=mlp.down_proj.bias is not None,
    )


def model_geometry(model: nn.Module) -> list[BlockGeometry]:
    check_supported(model)
    return [block_geometry(i, layer) for i, layer in enumerate(decoder_layers(model))]


def kv_group_query_heads(kv_head: int, n_rep: int) -> list[int]:
    """Query heads served by one KV head, in HF `repeat_kv` order."""
    return list(range(kv_head * n_rep, (kv_head + 1) * n_rep))


def head_rows(heads: list[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection laid out head by head."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
