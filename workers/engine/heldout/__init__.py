"""Held-out calibration quality: a free quality number for every job, with or without `evaluation`.

A few calibration-sized rows are drawn beside the calibration batch and never shown to a method;
their next-token loss and perplexity are measured on the dense model, on the pruned model, and
after compensation or recovery when a job has them.
"""

from workers.engine.heldout.measure import WriterSnapshot, heldout_quality

__all__ = ["WriterSnapshot", "heldout_quality"]
