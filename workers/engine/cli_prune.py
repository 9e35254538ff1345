"""`slimforge prune`: run any engine method without the service and write the same artifact a job writes.

Method options become flags automatically: a field `importance` of a method's options model is
`--importance VALUE`, a bool field `compensation` is `--compensation/--no-compensation`, a list
field takes comma-separated values.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--sparsity", type=float, required=True, help="target sparsity, 0 < s < 1")
    parser.add_argument("--basis", choices=["layers", "parameters"], default="layers")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help=".txt or .jsonl calibration text (default: text sampled from the model itself)",
    )
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--recovery-data", type=Path, default=None, help="text for an optional recovery step")
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


def run_prune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from workers.engine import pipeline
    from workers.engine.artifact import write_artifact
    from workers.engine.calibration import read_calibration_file, self_generated_batches, token_batches
    from workers.engine.device import pick_device, pick_dtype
    from workers.engine.modelzoo import default_cache_dir, load_model
    from workers.engine.types import EngineError

    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: output directory {args.out} exists and is not empty", file=sys.stderr)
        return 2
    progress = TqdmProgress()
    try:
        options = _collect_options(args, args.method)
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
            texts = read_calibration_file(args.calibration)
            calibration = token_batches(tokenizer, texts, args.n_samples, args.seq_len, seed=args.seed)
        else:
            calibration = self_generated_batches(
                model, tokenizer, args.n_samples, args.seq_len, seed=args.seed, progress=progress
            )
        recovery = None
        if args.recovery_data is not None:
            recovery = token_batches(
                tokenizer, read_calibration_file(args.recovery_data), args.n_samples, args.seq_len, seed=args.seed
            )
        outcome = pipeline.prune(
            model,
            calibration,
            method=args.method,
            target_sparsity=args.sparsity,
            sparsity_basis=args.basis,
            options=options,
            progress=progress,
            seed=args.seed,
            tokenizer=tokenizer,
            recovery_data=recovery,
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
    summary["out"] = str(args.out)
    summary["files"] = len(files)
    print(json.dumps(summary, indent=2))
    return 0
