"""Built-in pruning methods; importing this package registers them all.

Each module calls `workers.engine.registry.register(Method(...))` at import time.
"""
