"""Built-in pruning methods; importing this package registers them all.

Each module calls `workers.engine.registry.register(Method(...))` at import time.
"""

from workers.engine.methods import (  # noqa: F401
    gradmap,
    last_k,
    llm_pruner,
    random_layers,
    shortgpt,
    sleb,
    taylor_plus,
)
