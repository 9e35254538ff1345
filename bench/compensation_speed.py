"""Time compensation alone on SmolLM2, GradMAP's 20 % removal, N windows of WikiText-2 (first half).

One process per measurement. `--tree` imports the engine from another checkout (a `git worktree` of
an older commit), so two versions can be timed alternately in one run and compared as a ratio:

    for r in 1 2; do for t in /tmp/old .; do
      OMP_NUM_THREADS=1 .venv/bin/python bench/compensation_speed.py --tree $t --out comp-speed.jsonl
    done; done
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REMOVED_AT_20_PERCENT = [7, 13, 14, 17, 25, 26]  # GradMAP's k=6 selection (docs/benchmarks/layer-pruning.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--windows", type=int, default=32)
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--data", type=Path, default=shared / "data/wikitext2-valid.txt")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine.compensation import CompensationConfig, compensate, measure_shift
    from workers.engine.modelzoo import builtin_checkpoint

    path = builtin_checkpoint("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = args.data.read_text()
    ids = tokenizer(text[: len(text) // 2], return_tensors="pt").input_ids[0]
    windows = ids[: args.windows * 128].reshape(args.windows, 128)
    keep = [i for i in range(30) if i not in REMOVED_AT_20_PERCENT]
    shifts = measure_shift(model, keep, windows[:8], 4)
    started = time.perf_counter()
    report = compensate(model, keep, windows, CompensationConfig(), shifts=shifts)
    record = {
        "tree": str(args.tree),
        "commit": subprocess.run(
            ["git", "-C", str(args.tree), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip(),
        "windows": args.windows,
        "threads": torch.get_num_threads(),
        "compensation_s": round(time.perf_counter() - started, 2),
        "layers": report["layers"],
        "heldout_loss_before": report["heldout_loss_before"],
        "heldout_loss_after": report["heldout_loss_after"],
    }
    print(json.dumps(record))
    with args.out.open("a") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
