"""Recovery losses: distillation KL to the dense model, hidden-state alignment, next-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at `temperature`, scaled by T^2 (keeps gradients comparable)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over aligned layer pairs of MSE, each normalised by the teacher state's mean square."""
    pairs = zip(student, teacher, strict=True)
    terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-8) for s, t in pairs]
    return torch.stack(terms).mean()


def next_token(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
