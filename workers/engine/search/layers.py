"""Layer methods in a search: one selector run gives the removal order; every probe reuses a prefix.

Iterative selectors (GradMAP, SLEB) decide one layer at a time on the model without the earlier
choices, and one-shot selectors remove the lowest scores first, so the first k decisions of a run
at k_max are exactly what a run at k would remove: the order is prefix-consistent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.engine.methods.layer_common import Selection, SelectorInput, run_layer_method
from workers.engine.types import PruneContext, PruneOutcome


def removal_order(report: dict[str, Any]) -> list[int]:
    """The order in which a layer method's run removed its layers (original indices)."""
    if "removal_order" in report:
        return [int(i) for i in report["removal_order"]]
    return [int(d["chosen"]) for d in report["decisions"]]


def fixed_removal(order: list[int], name: str) -> Callable[[PruneContext], PruneOutcome]:
    """A method run that removes the first k layers of `order` (k from the context's target)."""

    def select(inp: SelectorInput) -> Selection:
        return Selection(removed=sorted(order[: inp.k]), extra={"removal_order": order[: inp.k]})

    def run(ctx: PruneContext) -> PruneOutcome:
        return run_layer_method(ctx, select, name)

    return run
