"""Quality-targeted pruning (the most-pruned model within a budget) and automatic method choice."""

from workers.engine.search.curve import ProbeResult, SearchResult, largest_passing, no_candidate_error
from workers.engine.search.measure import PerplexityMeasure, perplexity_measure, zero_shot_measure
from workers.engine.search.target import QualityTarget

__all__ = [
    "PerplexityMeasure",
    "ProbeResult",
    "QualityTarget",
    "SearchResult",
    "largest_passing",
    "no_candidate_error",
    "perplexity_measure",
    "zero_shot_measure",
]
