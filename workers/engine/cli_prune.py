"""`slimforge prune`: run any engine method without the service and write the same artifact a job writes.

Method options become flags automatically: a field `importance` of a method's options model is
`--importance VALUE`, a bool field `compensation` is `--compensation/--no-compensation`, a list
field takes comma-separated values.

`--recovery distill` (or `next_token`) heals the pruned model afterwards (default: LoRA on text the
dense model generates itself; `--recovery-data FILE` trains on a file instead). Instead of
`--sparsity`, `--max-perplexity-ratio 1.3` finds the most-pruned model within that budget on
`--target-text` (a file, or wikitext2/ptb under --eval-data-dir), which must not overlap the
calibration or recovery text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

FIXED_FLAGS = {
    "model",
    "method",
    "sparsity",
    "basis",
    "calibration",
    "n_samples",
    "seq_len",
    "out",
    "seed",
    "device",
    "dtype",
    "recovery_data",
    "model_root",
    # The recovery stage's flags (they supersede LLM-Pruner's own LoRA option of the same names).
    "recovery",
    "recovery_steps",
    "recovery_train",
    "recovery_options",
}


def _option_fields() -> dict[str, Any]:
    """Every option field of every registered method: name -> pydantic FieldInfo (first seen wins)."""
    from workers.engine.registry import all_methods

    fields: dict[str, Any] = {}
    for method in all_methods().values():
        for name, info in method.options_model.model_fields.items():
            if name not in FIXED_FLAGS:
                fields.setdefault(name, info)
    return fields


def _is_bool(annotation: Any) -> bool:
    """bool or Optional[bool]."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _is_list(annotation: Any) -> bool:
    origins = {typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))}
    return list in origins or tuple in origins


def add_prune_parser(subparsers: Any) -> None:
    from workers.engine.registry import all_methods

    parser = subparsers.add_parser(
        "prune",
        help="prune a model locally and write an artifact directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="builtin:<name>, a Hugging Face id, or a local directory")
    parser.add_argument("--method", default="gradmap", choices=sorted(all_methods()))
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="target sparsity, 0 < s < 1")
    target.add_argument(
        "--max-perplexity-ratio", type=float, help="instead of --sparsity: most pruning with ppl <= this x dense"
    )
    parser.add_argument("--basis", choices=["layers", "parameters"], default="layers")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help=".txt or .jsonl calibration text (default: text sampled from the model itself)",
    )
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--recovery-data", type=Path, default=None, help=".txt/.jsonl text for recovery")
    parser.add_argument(
        "--recovery", choices=["distill", "next_token"], default=None, help="heal the pruned model (recovering stage)"
    )
    parser.add_argument("--recovery-train", choices=["lora", "blocks"], default="lora")
    parser.add_argument("--recovery-steps", type=int, default=None, help="optimiser steps (default: the budget's)")
    parser.add_argument(
        "--recovery-options",
        default="{}",
        help='other recovery fields as JSON, e.g. \'{"lr": 1e-4, "n_samples": 128}\'',
    )
    parser.add_argument(
        "--target-text", default="wikitext2", help="text of --max-perplexity-ratio: a file, wikitext2 or ptb"
    )
    parser.add_argument(
        "--eval-data-dir",
        type=Path,
        default=os.environ.get("SLIMFORGE_EVAL_DATA_DIR"),
        help="shared data root with the built-in texts (default: $SLIMFORGE_EVAL_DATA_DIR)",
    )
    parser.add_argument("--max-search-sparsity", type=float, default=0.5, help="most-pruned candidate searched")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group = parser.add_argument_group("method options (see each method's options; only those of --method apply)")
    for name, info in _option_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = info.description or ""
        if _is_bool(info.annotation):
            group.add_argument(
                flag, dest=f"opt_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=f"opt_{name}", default=None, metavar="VALUE", help=help_text)
    parser.set_defaults(handler=run_prune)


def _collect_options(args: argparse.Namespace, method_name: str) -> dict[str, Any]:
    from workers.engine.registry import get_method

    fields = get_method(method_name).options_model.model_fields
    options: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("opt_") or value is None:
            continue
        name = key.removeprefix("opt_")
        if name not in fields:
            raise SystemExit(f"error: --{name.replace('_', '-')} is not an option of method {method_name!r}")
        if isinstance(value, str) and _is_list(fields[name].annotation):
            value = [v.strip() for v in value.split(",") if v.strip()]
        options[name] = value
    return options


class TqdmProgress:
    """Engine progress callback drawing one tqdm bar per stage on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, stage: str, fraction: float, message: str | None = None) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.bar = tqdm(total=100, desc=stage, file=sys.stderr, leave=True, bar_format="{l_bar}{bar}| {elapsed}")
            self.stage = stage
        self.bar.n = round(100 * min(max(fraction, 0.0), 1.0))
        if message:
            self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _recovery_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.recovery is None:
        return None
    spec: dict[str, Any] = {"method": args.recovery, "train": args.recovery_train, **json.loads(args.recovery_options)}
    if args.recovery_steps is not None:
        spec["steps"] = args.recovery_steps
    if args.recovery_data is not None:
        spec.setdefault("data", "dataset")
        spec.setdefault("dataset_id", args.recovery_data.name[:64])
    return spec


def _target_text(args: argparse.Namespace) -> str:
    from workers.engine.evaluation import BUILTIN_TEXTS, builtin_text
    from workers.engine.types import EngineError

    if args.target_text in BUILTIN_TEXTS:
        if args.eval_data_dir is None:
            raise EngineError("eval_data_missing", f"--target-text {args.target_text} needs --eval-data-dir.")
        return builtin_text(args.target_text, args.eval_data_dir)
    return Path(args.target_text).read_text(encoding="utf-8")


def _check_overlap(training: list[str], evaluation: str) -> None:
    from workers.engine.recovery.overlap import shared_lines
    from workers.engine.types import EngineError

    shared = shared_lines(training, [evaluation])
    if shared:
        raise EngineError(
            "evaluation_overlap",
            f"--target-text shares {shared} lines with the calibration/recovery text: the budget would be measured "
            "on training data. Use held-out text.",
        )


def run_prune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from workers.engine import pipeline
    from workers.engine.artifact import write_artifact
    from workers.engine.calibration import (
        read_calibration_file,
        self_generated_batches,
        self_generated_compensation,
        token_batches,
    )
    from workers.engine.device import pick_device, pick_dtype
    from workers.engine.methods.layer_common import with_compensation_budget
    from workers.engine.modelzoo import default_cache_dir, load_model
    from workers.engine.registry import get_method, parse_options
    from workers.engine.types import EngineError

    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: output directory {args.out} exists and is not empty", file=sys.stderr)
        return 2
    progress = TqdmProgress()
    try:
        options = _collect_options(args, args.method)
        recovery_spec = _recovery_spec(args)
        calibration_texts = read_calibration_file(args.calibration) if args.calibration is not None else []
        recovery_texts = read_calibration_file(args.recovery_data) if args.recovery_data is not None else None
        target_text = _target_text(args) if args.max_perplexity_ratio is not None else None
        if target_text is not None:
            _check_overlap(calibration_texts + (recovery_texts or []), target_text)
        device = pick_device(args.device)
        # The CLI is run by the operator: a local model directory given here is allowed as is.
        roots = [Path(args.model).expanduser()] if args.model.startswith(("/", ".", "~")) else []
        progress("loading_model", 0.0, args.model)
        model, tokenizer = load_model(
            args.model,
            allowed_roots=roots,
            cache_dir=default_cache_dir(),
            device=device,
            dtype=pick_dtype(device, args.dtype),
        )
        progress("loading_model", 1.0)
        if args.calibration is not None:
            calibration = token_batches(tokenizer, calibration_texts, args.n_samples, args.seq_len, seed=args.seed)
        else:
            calibration = self_generated_batches(
                model, tokenizer, args.n_samples, args.seq_len, seed=args.seed, progress=progress
            )
        compensation = None
        source = "dataset" if args.calibration is not None else "self_generated"
        parsed = with_compensation_budget(parse_options(get_method(args.method), options), options, source)
        if getattr(parsed, "compensation", False):
            # Compensation's own, larger budget from the same source (another seed: other windows).
            n_windows = parsed.compensation_samples  # type: ignore[attr-defined]
            options = {**options, "compensation_samples": n_windows}
            if args.calibration is not None:
                compensation = token_batches(tokenizer, calibration_texts, n_windows, args.seq_len, seed=args.seed + 1)
            else:
                compensation = self_generated_compensation(
                    model, tokenizer, calibration, n_windows, args.seed, progress=progress
                )
        recovery = None
        if recovery_texts is not None:
            recovery = token_batches(tokenizer, recovery_texts, args.n_samples, args.seq_len, seed=args.seed)
        common: dict[str, Any] = {
            "method": args.method,
            "sparsity_basis": args.basis,
            "options": options,
            "progress": progress,
            "seed": args.seed,
            "tokenizer": tokenizer,
            "recovery": recovery_spec,
            "recovery_texts": recovery_texts,
        }
        if target_text is not None:
            from workers.engine.evaluation import tokenize_text
            from workers.engine.search import QualityTarget, perplexity_measure

            target = QualityTarget(
                max_perplexity_ratio=args.max_perplexity_ratio,
                perplexity_set="dataset:cli" if args.target_text not in ("wikitext2", "ptb") else args.target_text,
                max_sparsity=args.max_search_sparsity,
            )
            ids = tokenize_text(tokenizer, target_text, target.eval_tokens)
            measure = perplexity_measure(ids, target.seq_len)
            outcome = pipeline.search(
                model, calibration, target=target, measure=measure, compensation_data=compensation, **common
            )
        else:
            outcome = pipeline.prune(
                model,
                calibration,
                target_sparsity=args.sparsity,
                recovery_data=recovery,
                compensation_data=compensation,
                **common,
            )
        outcome.report["calibration"] = {
            "source": str(args.calibration or "self_generated"),
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
        }
        progress("saving", 0.0, str(args.out))
        files = write_artifact(outcome, tokenizer, args.out, model_id=args.model)
        progress("saving", 1.0)
    except EngineError as exc:
        progress.close()
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        progress.close()
        print(f"error: invalid options for {args.method}: {exc}", file=sys.stderr)
        return 2
    progress.close()
    summary = {
        k: outcome.report.get(k)
        for k in ("method", "removed_layers", "parameters_before", "parameters_after", "pruning_seconds")
        if k in outcome.report
    }
    if "recovery" in outcome.report:
        rec = outcome.report["recovery"]
        summary["recovery"] = {k: rec.get(k) for k in ("method", "train", "steps_run", "tokens_trained", "seconds")}
    if "quality_target" in outcome.report:
        q = outcome.report["quality_target"]
        summary["quality_target"] = {k: q[k] for k in ("chosen_size", "chosen_value", "curve", "predictions")}
    summary["out"] = str(args.out)
    summary["files"] = len(files)
    print(json.dumps(summary, indent=2))
    return 0
