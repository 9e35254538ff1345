"""Loader shipped inside per-layer-width artifacts (copied verbatim into the artifact).

Self-contained on purpose: it imports only torch, so `from_pretrained(path, trust_remote_code=True)`
works without Slimforge installed. The artifact's config.json holds `slimforge_layer_widths`
(per-layer num_attention_heads, num_key_value_heads, intermediate_size); the model is built with
the original widths and each block is then shrunk to its own sizes before the weights are loaded.
"""

from torch import nn


def _resized(lin: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype
    )


def apply_layer_widths(model: nn.Module, widths: dict) -> None:
    """Shrink each decoder block's projections to the per-layer widths in `widths`."""
    layers = model.get_decoder().layers
    heads, kv_heads, inter = widths["num_attention_heads"], widths["num_key_value_heads"], widths["intermediate_size"]
    if not len(heads) == len(kv_heads) == len(inter) == len(layers):
        raise ValueError("slimforge_layer_widths does not match the number of decoder layers")
    for layer, n_q, n_kv, n_i in zip(layers, heads, kv_heads, inter, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        hd, hidden = attn.head_dim, attn.q_proj.in_features
        attn.q_proj = _resized(attn.q_proj, hidden, n_q * hd)
        attn.k_proj = _resized(attn.k_proj, hidden, n_kv * hd)
        attn.v_proj = _resized(attn.v_proj, hidden, n_kv * hd)
        attn.o_proj = _resized(attn.o_proj, n_q * hd, attn.o_proj.out_features)
        attn.num_key_value_groups = n_q // n_kv
        mlp.gate_proj = _resized(mlp.gate_proj, hidden, n_i)
        mlp.up_proj = _resized(mlp.up_proj, hidden, n_i)
        mlp.down_proj = _resized(mlp.down_proj, n_i, mlp.down_proj.out_features)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_i
