"""Regenerate workers/engine/builtin_configs/*.json from the built-in GGUF files' metadata.

Dry runs read these instead of parsing a GGUF (10-40 s) or dequantising inside a request. Run
after adding or changing a built-in model:  .venv/bin/python scripts/builtin_configs.py
"""

from __future__ import annotations

import json

from transformers import AutoConfig

from workers.engine.modelzoo import BUILTIN_CONFIG_DIR, BUILTIN_MODELS


def main() -> None:
    BUILTIN_CONFIG_DIR.mkdir(exist_ok=True)
    for name, model in BUILTIN_MODELS.items():
        gguf = model.locate_gguf()
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
        for key in ("quantization_config", "_name_or_path"):  # no local paths in the shipped file
            config.pop(key, None)
        path = BUILTIN_CONFIG_DIR / f"{name}.json"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
