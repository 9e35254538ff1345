"""Evaluation suite: perplexity, zero-shot multiple choice, speed and size of a causal LM."""

from workers.engine.evaluation.cache import cached_evaluate
from workers.engine.evaluation.config import EvaluationConfig
from workers.engine.evaluation.perplexity import perplexity
from workers.engine.evaluation.runner import evaluate, tokenize_text
from workers.engine.evaluation.scoring import loglikelihoods
from workers.engine.evaluation.speed import speed
from workers.engine.evaluation.tasks import TASKS, load_task
from workers.engine.evaluation.texts import BUILTIN_TEXTS, builtin_text
from workers.engine.evaluation.zero_shot import zero_shot

__all__ = [
    "BUILTIN_TEXTS",
    "TASKS",
    "EvaluationConfig",
    "builtin_text",
    "cached_evaluate",
    "evaluate",
    "load_task",
    "loglikelihoods",
    "perplexity",
    "speed",
    "tokenize_text",
    "zero_shot",
]
