"""Speed target of issue 10: GradMAP's whole pruning (selection + drift + compensation) against
SLEB's selection alone at the same k, measured in one process on SmolLM2-135M.

    OMP_NUM_THREADS=2 python bench/layer_pruning_speed.py --ratio 0.2 --out docs/benchmarks/layer-pruning-speed.json

Data as in bench/layer_pruning.py: 8x128 calibration windows (seed 0) and the compensation windows
(seed 1) from the first half of wikitext2-valid.txt. GradMAP runs once per `--gradmap-variants`
entry (named option sets; default: its default options), compensation fitted on the first
`compensation_samples` compensation windows; SLEB runs with `compensation: false`, so only its
selection is timed. The GradMAP variants run first, then SLEB; every ratio is computed from runs in
this one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.calibration import token_batches  # noqa: E402
from workers.engine.modelzoo import builtin_checkpoint  # noqa: E402
from workers.engine.pipeline import prune  # noqa: E402


def timed_prune(
    checkpoint: Path, method: str, ratio: float, data: dict[str, torch.Tensor], options: dict[str, Any]
) -> dict[str, Any]:
    """One pruning run from a fresh model: wall time, the engine's stage timings and the choice."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    started = time.perf_counter()
    report = prune(
        model,
        data["calibration"],
        method=method,
        target_sparsity=ratio,
        options=options,
        compensation_data=data["compensation"],
    ).report
    wall = time.perf_counter() - started
    comp = report.get("compensation") or {}
    return {
        "method": method,
        "options": options,
        "k": report["k"],
        "removed_layers": report["removed_layers"],
        "wall_s": round(wall, 2),
        "pruning_seconds": report["pruning_seconds"],
        "timings": report["timings"],
        "compensation_tokens": comp.get("compensation_tokens"),
        "compensation_kept_layers": comp.get("layers"),
        # To check against the evaluated rows (same windows): the fit must not depend on the code path.
        "compensation_heldout_loss": [comp.get("heldout_loss_before"), comp.get("heldout_loss_after")],
        "compensation_mse_after": [e.get("mse_after") for e in comp.get("projections", [])],
        "peak_memory": report.get("peak_memory"),
    }


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--comp-samples", type=int, default=256, help="compensation windows drawn")
    parser.add_argument(
        "--gradmap-variants",
        type=json.loads,
        default={"gradmap": {}},
        help='named GradMAP option sets, JSON: {"gradmap": {}, "s64": {"compensation_samples": 64}}',
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    checkpoint = builtin_checkpoint("smollm2-135m", REPO / ".slimforge" / "models")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = (REPO.parent / "shared" / "data" / "wikitext2-valid.txt").read_text(encoding="utf-8")
    first_half = [text[: len(text) // 2]]
    data = {
        "calibration": token_batches(tokenizer, first_half, 8, 128, seed=0),
        "compensation": token_batches(tokenizer, first_half, args.comp_samples, 128, seed=1),
    }
    jobs = [(name, "gradmap", opts) for name, opts in args.gradmap_variants.items()]
    jobs.append(("sleb", "sleb", {"compensation": False}))
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "ratio": args.ratio, "runs": {}}
    for name, method, options in jobs:
        out["runs"][name] = row = timed_prune(checkpoint, method, args.ratio, data, options)
        print(name, json.dumps({k: row[k] for k in ("k", "wall_s", "timings", "removed_layers")}), flush=True)
    sleb = out["runs"]["sleb"]["timings"]["scoring"]
    out["sleb_selection_over_gradmap_whole"] = {
        name: round(sleb / out["runs"][name]["pruning_seconds"], 3) for name in args.gradmap_variants
    }
    print("ratio", out["sleb_selection_over_gradmap_whole"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
