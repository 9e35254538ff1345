"""Recovery after pruning: distillation from the dense model or next-token training, LoRA or blocks."""

from workers.engine.recovery.config import RecoveryConfig, parse_recovery
from workers.engine.recovery.data import recovery_tokens, tokens_sha256
from workers.engine.recovery.estimate import estimate
from workers.engine.recovery.trainer import Alignment, recover

__all__ = ["Alignment", "RecoveryConfig", "estimate", "parse_recovery", "recover", "recovery_tokens", "tokens_sha256"]
