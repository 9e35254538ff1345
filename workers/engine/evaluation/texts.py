"""Built-in perplexity texts, read from the shared data root."""

from __future__ import annotations

from pathlib import Path

from workers.engine.types import EngineError

# name -> path relative to the shared data root
BUILTIN_TEXTS: dict[str, str] = {
    "wikitext2": "wikitext2-valid.txt",
    "ptb": "eval/ptb/ptb.test.txt",
}


def builtin_text(name: str, data_dir: Path) -> str:
    """Text of a built-in perplexity set ("wikitext2", "ptb") under the shared data root."""
    if name not in BUILTIN_TEXTS:
        known = ", ".join(BUILTIN_TEXTS)
        raise EngineError("unknown_text", f"Unknown perplexity text {name!r}. Built-in texts: {known}.")
    path = Path(data_dir).expanduser() / BUILTIN_TEXTS[name]
    if not path.is_file():
        raise EngineError("eval_data_missing", f"Perplexity text {name!r} not found at {path}.")
    return path.read_text(encoding="utf-8")
