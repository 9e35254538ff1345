"""LoRA adapters through peft on every attention and MLP projection, merged back after training.

The merged model has exactly the pruned shapes again, so the artifact needs no peft at load time.
"""

from __future__ import annotations

from torch import nn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def attach_lora(model: nn.Module, r: int, alpha: int, dropout: float) -> nn.Module:
    """Wrap `model` with fresh adapters (only they require gradients); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model."""
    return peft_model.merge_and_unload()
