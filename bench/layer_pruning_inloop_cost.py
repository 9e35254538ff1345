"""Cost of in-loop compensation against plain GradMAP scoring, measured in one process.

    OMP_NUM_THREADS=1 python bench/layer_pruning_inloop_cost.py --ratio 0.1 --out /tmp/inloop.json

Runs GradMAP selection (no final compensation) on SmolLM2-135M with the 8x128 calibration of
bench/layer_pruning.py, once plain and once with `compensate_in_loop` (incremental refit), and
records scoring seconds, the seconds spent in the in-loop fits and the removal orders. The ratio
that matters is (scoring incl. in-loop fits) / (the same minus the in-loop fits) within one run:
the plain run executes at another moment and, on a shared machine, under another load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.calibration import token_batches  # noqa: E402
from workers.engine.modelzoo import builtin_checkpoint  # noqa: E402
from workers.engine.pipeline import prune  # noqa: E402

VARIANTS = {
    "plain": {},
    "in_loop_incremental": {"compensate_in_loop": True},
    "in_loop_full": {"compensate_in_loop": True, "in_loop_refit": "full"},
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", default=["plain", "in_loop_incremental"], choices=list(VARIANTS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = builtin_checkpoint("smollm2-135m", REPO / ".slimforge" / "models")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = (REPO.parent / "shared" / "data" / "wikitext2-valid.txt").read_text(encoding="utf-8")
    calibration = token_batches(tokenizer, [text[: len(text) // 2]], 8, 128, seed=0)
    out = {}
    for name in args.variants:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        options = {"compensation": False, **VARIANTS[name]}
        report = prune(model, calibration, method="gradmap", target_sparsity=args.ratio, options=options).report
        in_loop = sum(d.get("in_loop_compensation_seconds", 0.0) for d in report["decisions"])
        scoring = report["timings"]["scoring"]
        out[name] = {
            "scoring_s": scoring,
            "in_loop_s": round(in_loop, 2),
            "cost_ratio_same_run": round(scoring / (scoring - in_loop), 3),
            "removal_order": [d["chosen"] for d in report["decisions"]],
            "decision_s": [d["seconds"] for d in report["decisions"]],
        }
        print(name, json.dumps(out[name]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
