"""Cost of a quality-targeted job against a single job at the size it chose (issue #11).

One process, same machine state, in this order:
  1. the quality search (`pipeline.search`) for `--max-ratio` on `--text`, GradMAP + compensation;
  2. a single job at the chosen size (`pipeline.prune`), timed alone and with the same quality
     check a user needs to know what it got (the dense and the pruned perplexity on that text).
Recovery is off: the issue's target excludes it. Both runs get the same compensation windows
(`--compensation-samples`, drawn like bench/layer_pruning.py's: seed 1, first half of WikiText-2),
as a job with an uploaded dataset does; 0 compensates on the calibration batch (runs before 7 Dec).

  OMP_NUM_THREADS=2 nice -n 19 python bench/quality_search.py --max-ratio 1.3 --text ptb \
      --compensation-samples 128 --out docs/benchmarks/quality-search.jsonl
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from width_pruning import CACHE, DATA, emit  # noqa: E402

from workers.engine.calibration import token_batches  # noqa: E402
from workers.engine.evaluation.runner import tokenize_text  # noqa: E402
from workers.engine.evaluation.texts import builtin_text  # noqa: E402
from workers.engine.modelzoo import load_model  # noqa: E402
from workers.engine.pipeline import prune, search  # noqa: E402
from workers.engine.search import QualityTarget, perplexity_measure  # noqa: E402


def fields(points: list[dict], *extra: str) -> list[dict]:
    """What a row keeps of each probe or prediction."""
    keys = ("size", "value", "stderr", "segments", "meets", "seconds", *extra)
    return [{key: point.get(key) for key in keys} for point in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--method", default="gradmap")
    parser.add_argument("--max-ratio", type=float, default=1.3)
    parser.add_argument("--text", default="ptb", choices=["ptb", "wikitext2"])
    parser.add_argument("--max-sparsity", type=float, default=0.5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--full-curve", action="store_true")
    parser.add_argument("--full-measure", action="store_true", help="score every probe on all tokens")
    parser.add_argument("--compensation-samples", type=int, default=128, help="0: the calibration batch")
    parser.add_argument(
        "--probe-compensation-samples", type=int, default=None, help="the target's option (default: its default)"
    )
    parser.add_argument(
        "--no-predict", action="store_true", help="gallop up from one layer instead of probing from the prediction"
    )
    parser.add_argument(
        "--confirm-next", action="store_true", help="probe the size past the answer even where its prediction misses"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, cache_dir=CACHE)
    wiki = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8")
    calibration = token_batches(tokenizer, [wiki[: len(wiki) // 2]], 8, 128, seed=0)
    n_comp = args.compensation_samples
    compensation = token_batches(tokenizer, [wiki[: len(wiki) // 2]], n_comp, 128, seed=1) if n_comp else None
    probe_option = (
        {}
        if args.probe_compensation_samples is None
        else {"probe_compensation_samples": args.probe_compensation_samples}
    )
    # WikiText-2: only the half calibration does not use.
    text = builtin_text("ptb", DATA) if args.text == "ptb" else wiki[len(wiki) // 2 :]
    target = QualityTarget(
        max_perplexity_ratio=args.max_ratio,
        perplexity_set=args.text,
        max_sparsity=args.max_sparsity,
        eval_tokens=args.eval_tokens,
        full_curve=args.full_curve,
        predict=not args.no_predict,
        confirm_next=args.confirm_next,
        **probe_option,
    )
    measure = perplexity_measure(tokenize_text(tokenizer, text, target.eval_tokens), target.seq_len)
    # --full-measure: a plain callable, so every probe scores all tokens (the search before the paired test).
    probe_measure = (lambda m: measure(m)) if args.full_measure else measure

    started = time.perf_counter()
    found = search(
        model,
        calibration,
        method=args.method,
        target=target,
        measure=probe_measure,
        tokenizer=tokenizer,
        compensation_data=compensation,
    )
    search_s = time.perf_counter() - started
    q = found.report["quality_target"]
    k = int(q["chosen_size"])
    n_layers = model.config.num_hidden_layers

    started = time.perf_counter()
    single = prune(
        copy.deepcopy(model),
        calibration,
        method=args.method,
        target_sparsity=k / n_layers,
        sparsity_basis="layers",
        seed=0,
        tokenizer=tokenizer,
        compensation_data=compensation,
    )
    single_s = time.perf_counter() - started
    dense_ppl, pruned_ppl = measure(model), measure(single.model)
    checked_s = time.perf_counter() - started
    emit(
        Path(args.out),
        {
            "model": args.model,
            "method": args.method,
            "text": args.text,
            "max_ratio": args.max_ratio,
            "max_sparsity": args.max_sparsity,
            "eval_tokens": args.eval_tokens,
            "full_curve": args.full_curve,
            "threads": args.threads,
            "chosen_k": k,
            "chosen_value": q["chosen_value"],
            "probes": q["probes"],
            "full_measure": args.full_measure,
            "compensation_samples": n_comp,
            "probe_compensation_samples": target.probe_compensation_samples,
            "curve": fields(q["curve"], "compensation_tokens", "exact", "prediction", "scaled_by"),
            "predict": target.predict,
            "confirm_next": target.confirm_next,
            "predictions": fields(q.get("predictions", [])),
            "refit": q.get("refit"),
            "removed_layers": found.report.get("removed_layers"),
            "search_timings": {"order_grown_to": len(q.get("removal_order") or [])},
            "search_s": round(search_s, 1),
            "single_job_s": round(single_s, 1),
            "single_job_checked_s": round(checked_s, 1),
            "single_ratio_check": round(pruned_ppl / dense_ppl, 5),
            "same_layers": single.report.get("removed_layers") == found.report.get("removed_layers"),
            "ratio_vs_single": round(search_s / single_s, 2),
            "ratio_vs_single_checked": round(search_s / checked_s, 2),
        },
    )


if __name__ == "__main__":
    main()
