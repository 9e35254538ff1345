"""Cost of in-loop compensation against plain GradMAP scoring, measured in one process.

    OMP_NUM_THREADS=2 python bench/layer_pruning_inloop_cost.py --ratio 0.2 --threads 2 --out /tmp/inloop.json

Runs GradMAP selection (no final compensation) on SmolLM2-135M (or `--model gemma3-270m`) with
the 8x128 calibration and the 128 compensation windows of bench/layer_pruning.py (in-loop fits
use the first `in_loop_samples` of them, as in a job), once per variant, and records scoring
seconds, the seconds in-loop compensation added (its one-off capture of the original targets plus
every refit), the removal orders and which kept layers carry an in-loop projection (the same
order in two variants means the same final model). Two ratios: against the plain run of the same
process, and (scoring) / (scoring minus the in-loop seconds) within each run, which does not
depend on the load of another moment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from layer_pruning import open_builtin  # noqa: E402

from workers.engine.calibration import token_batches  # noqa: E402
from workers.engine.pipeline import prune  # noqa: E402

VARIANTS = {
    "plain": {"compensate_in_loop": False},
    "in_loop": {"compensate_in_loop": True},  # the default: incremental, unjudged
    "in_loop_judged": {"compensate_in_loop": True, "in_loop_judged": True},
    "in_loop_full": {"compensate_in_loop": True, "in_loop_refit": "full"},
}


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", default=["plain", "in_loop", "in_loop_judged"], choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    checkpoint, tokenizer = open_builtin(args.model, args.threads)
    text = (REPO.parent / "shared" / "data" / "wikitext2-valid.txt").read_text(encoding="utf-8")
    calibration = token_batches(tokenizer, [text[: len(text) // 2]], 8, 128, seed=0)
    compensation = token_batches(tokenizer, [text[: len(text) // 2]], 128, 128, seed=1)
    out: dict[str, dict] = {}
    for name in args.variants:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        options = {"compensation": False, **VARIANTS[name]}
        report = prune(
            model,
            calibration,
            method="gradmap",
            target_sparsity=args.ratio,
            options=options,
            compensation_data=compensation,
        ).report
        in_loop = report["in_loop_seconds"]
        scoring = report["timings"]["scoring"]
        out[name] = {
            "options": options,
            "scoring_s": scoring,
            "in_loop_s": round(in_loop, 2),
            "in_loop_tokens": report["in_loop_tokens"],
            "cost_ratio_same_run": round(scoring / (scoring - in_loop), 3),
            "cost_ratio_vs_plain": round(scoring / out["plain"]["scoring_s"], 3) if "plain" in out else None,
            "removal_order": [d["chosen"] for d in report["decisions"]],
            "decision_s": [d["seconds"] for d in report["decisions"]],
            # Kept layers holding an in-loop projection after each decision (a judge drops rejected ones).
            "carrying": [d.get("in_loop_compensation") for d in report["decisions"]],
        }
        print(name, json.dumps(out[name]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
