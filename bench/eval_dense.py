"""Benchmarks of the evaluation suite on a dense model.

    # token work per task: packed trie rows vs one sequence per choice (no model run)
    python bench/eval_dense.py stats --limit 200
    # wall time and agreement: packed scoring vs lm-eval-style per-choice scoring on the same items
    python bench/eval_dense.py compare --tasks hellaswag,arc_easy --limit 24
    # speed target: the fast scorer on a whole task, and both scorers on a subset, in one process
    python bench/eval_dense.py speed --tasks arc_easy --naive-limit 200 --threads 2

Accuracy runs use the CLI itself (see docs/benchmarks/eval.md for the exact commands), e.g.
    python -m workers.engine.cli_eval eval --model builtin:smollm2-135m --tasks all --limit 200 \\
        --data-dir ../shared/data --json --output /tmp/seven.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.evaluation.scoring import Tokenized, _build_row, _score_plain, loglikelihoods  # noqa: E402
from workers.engine.evaluation.tasks import TASKS, load_task  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CACHE = REPO / ".slimforge" / "models"


def _tokenizer(model_id: str):
    from transformers import AutoTokenizer

    from workers.engine.modelzoo import resolve_checkpoint

    return AutoTokenizer.from_pretrained(resolve_checkpoint(model_id, cache_dir=CACHE))


def stats(args: argparse.Namespace) -> list[dict]:
    tokenizer = _tokenizer(args.model)
    rows = []
    for task in args.tasks:
        items = load_task(task, args.data_dir, args.limit, args.seed)
        pairs = Tokenized(tokenizer, [r for item in items for r in item.requests], add_bos=False).pairs
        per_choice = sum(len(ctx) + len(cont) - 1 for ctx, cont in pairs)
        packed = positions = 0
        cursor = 0
        for item in items:
            row = _build_row(pairs[cursor : cursor + len(item.requests)], None)
            cursor += len(item.requests)
            packed += len(row.tokens)
            positions += len(row.targets)
        rows.append(
            {
                "task": task,
                "items": len(items),
                "per_choice_tokens": per_choice,
                "packed_tokens": packed,
                "token_ratio": round(per_choice / packed, 2),
                "logit_positions_packed": positions,
                "logit_positions_per_choice": per_choice,
            }
        )
    return rows


def _per_choice(model, pairs, batch_size: int = 32) -> list[float]:
    """lm-eval's way: one right-padded sequence per choice, sorted by length, full logits."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, score in zip(chunk, _score_plain(model, [pairs[i] for i in chunk]), strict=True):
            out[i] = score
    return out


def compare(args: argparse.Namespace) -> list[dict]:
    from workers.engine.modelzoo import load_model

    model, tokenizer = load_model(args.model, cache_dir=CACHE)
    loglikelihoods(model, tokenizer, [[("Warm up", " the model.")]])  # self-check + allocations
    rows = []
    for task in args.tasks:
        items = load_task(task, args.data_dir, args.limit, args.seed)
        groups = [item.requests for item in items]
        t0 = time.perf_counter()
        packed = loglikelihoods(model, tokenizer, groups)
        t_packed = time.perf_counter() - t0
        t0 = time.perf_counter()
        pairs = Tokenized(tokenizer, [r for g in groups for r in g], add_bos=False).pairs
        flat = _per_choice(model, pairs)
        t_plain = time.perf_counter() - t0
        flat_packed = [s for g in packed for s in g]
        # How often length normalisation changes the chosen answer (acc vs acc_norm disagree).
        flips = sum(
            max(range(len(lls)), key=lambda i, lls=lls: lls[i])
            != max(range(len(lls)), key=lambda i, lls=lls, item=item: lls[i] / item.norm_lengths[i])
            for lls, item in zip(packed, items, strict=True)
        )
        diff = max(abs(a - b) for a, b in zip(flat_packed, flat, strict=True))
        rows.append(
            {
                "task": task,
                "items": len(items),
                "packed_s": round(t_packed, 2),
                "per_choice_s": round(t_plain, 2),
                "speedup": round(t_plain / t_packed, 2),
                "max_abs_loglik_diff": diff,
                "acc_vs_acc_norm_choice_flips": flips,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _naive(model, pairs) -> list[float]:
    """The reference the fast scorer must equal: every request alone, batch 1, full logits."""
    return [_score_plain(model, [pair])[0] for pair in pairs]


def speed(args: argparse.Namespace) -> list[dict]:
    """Fast scorer on the whole task, then fast vs naive on a `--naive-limit` subset, same process."""
    import torch

    from workers.engine.modelzoo import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, cache_dir=CACHE)
    loglikelihoods(model, tokenizer, [[("Warm up", " the model.")]])  # self-check + allocations
    rows = []
    for task in args.tasks:
        items = load_task(task, args.data_dir, args.limit, args.seed)
        t0 = time.perf_counter()
        loglikelihoods(model, tokenizer, [item.requests for item in items])
        t_full = time.perf_counter() - t0
        subset = load_task(task, args.data_dir, args.naive_limit, args.seed)
        groups = [item.requests for item in subset]
        t0 = time.perf_counter()
        fast = [s for g in loglikelihoods(model, tokenizer, groups) for s in g]
        t_fast = time.perf_counter() - t0
        pairs = Tokenized(tokenizer, [r for g in groups for r in g], add_bos=False).pairs
        t0 = time.perf_counter()
        naive = _naive(model, pairs)
        t_naive = time.perf_counter() - t0
        rows.append(
            {
                "task": task,
                "threads": args.threads,
                "items": len(items),
                "fast_full_s": round(t_full, 1),
                "subset_items": len(subset),
                "fast_subset_s": round(t_fast, 2),
                "naive_subset_s": round(t_naive, 2),
                "speedup_vs_naive": round(t_naive / t_fast, 2),
                "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(fast, naive, strict=True)),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["stats", "compare", "speed"])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--tasks", type=lambda v: v.split(","), default=list(TASKS))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--naive-limit", type=int, default=200, help="speed: items scored both ways")
    parser.add_argument("--threads", type=int, default=1, help="speed: torch threads")
    args = parser.parse_args()
    rows = {"stats": stats, "compare": compare, "speed": speed}[args.command](args)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
