"""`slimforge eval`: evaluate any model id or local checkpoint directory from the command line.

    slimforge eval --model builtin:smollm2-135m --tasks arc_easy,piqa --limit 200 \\
        --data-dir /path/to/data --perplexity wikitext2 --seq-len 128,2048 --json

With --json exactly one JSON object goes to stdout (everything else, progress bars included,
goes to stderr), so other tools can pipe it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from workers.engine.evaluation.tasks import TASKS
from workers.engine.evaluation.texts import BUILTIN_TEXTS
from workers.engine.types import EngineError

DEFAULT_SEQ_LENS = [128]


def _csv_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_eval_parser(subparsers: Any) -> None:
    """Register the `eval` sub-command on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a model: perplexity, zero-shot tasks, size and speed.",
        description="Evaluate a model id (builtin:<name>, org/name) or a local checkpoint directory.",
    )
    parser.add_argument("--model", required=True, help="builtin:<name>, a Hugging Face id, or a local directory")
    parser.add_argument(
        "--tasks",
        type=_csv_list,
        action="extend",
        default=[],
        help=f"comma-separated zero-shot tasks, or 'all' ({', '.join(TASKS)})",
    )
    parser.add_argument("--limit", type=int, default=None, help="questions per task (fixed-seed sample; default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-task sample")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ["SLIMFORGE_EVAL_DATA_DIR"]) if os.environ.get("SLIMFORGE_EVAL_DATA_DIR") else None,
        help="directory with the task folders, or the data root holding eval/ and wikitext2-valid.txt "
        "(default: $SLIMFORGE_EVAL_DATA_DIR)",
    )
    parser.add_argument(
        "--perplexity",
        type=_csv_list,
        action="extend",
        default=[],
        help=f"perplexity texts: {', '.join(BUILTIN_TEXTS)} (read from --data-dir) or paths to .txt files",
    )
    parser.add_argument(
        "--seq-len",
        type=lambda v: [int(x) for x in _csv_list(v)],
        action="extend",
        default=None,
        help="perplexity segment length(s), comma-separated (default 128; clipped to the model's context)",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per perplexity text")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per forward pass (zero-shot)")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip the tokens/s measurement")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache of dequantised built-in models")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code shipped inside the checkpoint"
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object to stdout")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_eval)


def _text_root(data_dir: Path) -> Path:
    # Built-in texts live in the data root; accept the eval/ directory as well.
    if not (data_dir / BUILTIN_TEXTS["wikitext2"]).exists() and data_dir.name == "eval":
        return data_dir.parent
    return data_dir


def _resolve_texts(names: list[str], data_dir: Path | None) -> dict[str, str]:
    from workers.engine.evaluation.texts import builtin_text

    texts = {}
    for name in names:
        if name in BUILTIN_TEXTS:
            if data_dir is None:
                raise EngineError("eval_data_missing", f"--perplexity {name} needs --data-dir.")
            texts[name] = builtin_text(name, _text_root(data_dir))
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise EngineError(
                    "eval_data_missing", f"--perplexity {name!r} is neither {' nor '.join(BUILTIN_TEXTS)} nor a file."
                )
            texts[name] = path.read_text(encoding="utf-8")
    return texts


def _model_id(model: str) -> tuple[str, list[Path]]:
    """Model id for load_model, and the allowed roots: the CLI is operator-run, so a given local
    directory is allowed as is (relative paths included)."""
    path = Path(model).expanduser()
    if not model.startswith("builtin:") and path.is_dir():
        real = path.resolve()
        return str(real), [real]
    return model, []


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class _Bar:
    """tqdm progress bar on stderr driven by the engine's (stage, fraction, message) callback."""

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=1000, file=sys.stderr, disable=not enabled, unit="‰", dynamic_ncols=True)

    def __call__(self, stage: str, fraction: float, message: str | None = None) -> None:
        target = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)
        if message:
            self._bar.set_description(message, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _summary(result: dict) -> str:
    lines = [f"model: {result['model']}"]
    params = result.get("parameters", {})
    if params:
        lines.append(f"parameters: {params['total']:,} total, {params['without_embeddings']:,} without embeddings")
    for name, by_len in result.get("perplexity", {}).items():
        for seq_len, r in by_len.items():
            lines.append(f"perplexity {name} @{seq_len}: {r['ppl']:.3f} ({r['n_tokens']} tokens)")
    for task, r in result.get("tasks", {}).items():
        lines.append(f"{task:<14} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  n={r['n']}")
    if "tasks_mean_acc" in result:
        lines.append(f"{'mean':<14} acc {result['tasks_mean_acc']:.4f}")
    if "speed" in result:
        s = result["speed"]
        lines.append(
            f"speed ({s['device']}, {s['dtype']}): forward {s['forward_tokens_per_s']} tok/s, "
            f"generate {s['generate_tokens_per_s']} tok/s"
        )
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> dict:
    import torch

    from workers.engine.evaluation.config import EvaluationConfig
    from workers.engine.evaluation.runner import run_evaluation
    from workers.engine.modelzoo import load_model

    tasks = list(TASKS) if args.tasks == ["all"] else list(dict.fromkeys(args.tasks))
    seq_lens = args.seq_len or DEFAULT_SEQ_LENS
    # Reuse the job config's validation for lengths, tasks and limits (readable errors).
    EvaluationConfig(seq_lens=seq_lens, tasks=tasks, limit=args.limit, max_tokens=args.max_tokens)
    if tasks and args.data_dir is None:
        raise EngineError("eval_data_missing", "Zero-shot tasks need --data-dir (or $SLIMFORGE_EVAL_DATA_DIR).")
    texts = _resolve_texts(list(dict.fromkeys(args.perplexity)), args.data_dir)
    model_id, roots = _model_id(args.model)
    model, tokenizer = load_model(
        model_id,
        allowed_roots=roots,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        trust_remote_code=args.trust_remote_code,
    )
    bar = _Bar(enabled=not args.quiet)
    try:
        result = run_evaluation(
            model,
            tokenizer,
            texts=texts,
            seq_lens=seq_lens,
            max_tokens=args.max_tokens,
            tasks=tasks,
            limit=args.limit,
            seed=args.seed,
            measure_speed_too=args.speed,
            data_dir=args.data_dir,
            progress=bar,
            task_batch_size=args.batch_size,
        )
    finally:
        bar.close()
    return {"model": args.model, **result, "limit": args.limit, "seed": args.seed}


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `slimforge eval`; returns the process exit code."""
    from pydantic import ValidationError

    stdout = sys.stdout
    try:
        # Keep stdout clean for --json: anything a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = _finite(_evaluate(args))
    except EngineError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        problems = "; ".join(err["msg"] for err in exc.errors())
        print(f"error (invalid_arguments): {problems}", file=sys.stderr)
        return 2
    text = json.dumps(result, sort_keys=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
    if args.json:
        stdout.write(text + "\n")
    else:
        stdout.write(_summary(result) + "\n")
    stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m workers.engine.cli_eval eval ...`) until app/cli.py wires it in."""
    parser = argparse.ArgumentParser(prog="slimforge")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
