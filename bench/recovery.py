"""Benchmark recovery after pruning: none vs next-token LoRA vs distillation (LoRA, full blocks).

Run one pruned configuration and its recovery variants (results appended to --out as JSON lines):
  OMP_NUM_THREADS=1 nice -n 19 python bench/recovery.py run --model builtin:smollm2-135m \
      --method gradmap --target 0.2 --data wikitext2 --variants none,next_token_lora,distill_lora,distill_blocks \
      --out docs/benchmarks/recovery-results.jsonl
Table and plot from the result file(s):
  python bench/recovery.py report docs/benchmarks/recovery-results.jsonl --md docs/benchmarks/recovery-tables.md \
      --png docs/benchmarks/recovery.png

Data split: calibration and WikiText-2 recovery windows come from the first half of
wikitext2-valid.txt; perplexity is measured on the second half and on PTB test, which no run
trains on. Self-generated recovery text is sampled from the dense model (data-free).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from width_pruning import CACHE, DATA, emit, eval_streams, evaluate, with_bos  # noqa: E402

from workers.engine.calibration import (  # noqa: E402
    compensation_batch,
    self_generated_batches,
    self_generated_compensation,
    token_batches,
)
from workers.engine.evaluation.paired import paired_average_difference  # noqa: E402
from workers.engine.modelzoo import load_model  # noqa: E402
from workers.engine.pipeline import RecoverySetup, apply_recovery, prepare_recovery, prune  # noqa: E402
from workers.engine.recovery import RecoveryConfig  # noqa: E402

# variant -> recovery config fields (the budget comes from the command line)
VARIANTS = {
    "none": None,
    "next_token_lora": {"method": "next_token", "train": "lora"},
    "distill_lora": {"method": "distill", "train": "lora"},
    "distill_blocks": {"method": "distill", "train": "blocks"},
}


def sampling_overrides(args) -> dict:
    """The self-generated sampling given on the command line; what is not given keeps the engine's default."""
    given = {"sample_top_k": args.sample_top_k, "sample_temperature": args.sample_temperature}
    return {name: value for name, value in given.items() if value is not None}


def recovery_config(variant: str, data_name: str, args) -> RecoveryConfig:
    # The first half of WikiText-2's validation file stands for an uploaded dataset ("mix": half of it, half sampled).
    data = {
        "wikitext2": {"data": "dataset", "dataset_id": "wikitext2-first-half"},
        "mix": {"data": "mix", "dataset_id": "wikitext2-first-half"},
    }.get(data_name, {})
    return RecoveryConfig(
        **VARIANTS[variant],
        **data,
        lr=args.lr,
        **(
            {"temperature": args.temperature, "hidden_weight": args.hidden_weight, "ce_weight": args.ce_weight}
            if "distill" in variant
            else {}
        ),
        n_samples=args.samples,
        **sampling_overrides(args),
        seq_len=args.seq_len,
        **({"lora_r": args.lora_r, "lora_alpha": args.lora_alpha or 2 * args.lora_r} if "lora" in variant else {}),
        steps=args.steps,
        batch_size=args.batch,
        micro_batch_size=args.batch,
    )


def pruning_data(model, tokenizer, first_half: str, bos, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration, compensation windows) as a job builds them from --calibration's source.

    `wikitext2`: windows of the first half of the validation file; `self_generated`: text sampled
    from the dense model (no corpus at all). Compensation takes --compensation-samples windows of
    the same source, as a job does (the service's budgets: 128 on a dataset, 32 self-generated);
    0 fits on the calibration batch, as the rows before 7 Dec did.
    """
    n_comp = args.compensation_samples
    if args.calibration == "self_generated":
        calibration = self_generated_batches(model, tokenizer, args.calib_samples, args.calib_len, seed=0)
        comp = self_generated_compensation(model, tokenizer, calibration, n_comp, seed=0) if n_comp else None
        return calibration, comp
    calibration = with_bos(token_batches(tokenizer, [first_half], args.calib_samples, args.calib_len, seed=0), bos)
    if not n_comp:
        return calibration, None
    extra = with_bos(token_batches(tokenizer, [first_half], n_comp, args.calib_len, seed=2), bos)
    return calibration, compensation_batch(calibration, extra, n_comp)


def pruned_outcome(model, tokenizer, calibration, compensation, args):
    """GradMAP/LLM-Pruner on the calibration, or the same result from --pruned-cache (saves ~10-25 min per run)."""
    fields = [args.model, args.method, args.target, args.options, args.calib_samples, args.calib_len]
    if args.calibration != "wikitext2" or args.compensation_samples != 0:  # keys of the older runs stay valid
        fields += [args.calibration, args.compensation_samples]
    key = hashlib.sha256(json.dumps(fields).encode()).hexdigest()
    path = Path(args.pruned_cache) / f"{key[:16]}.pt" if args.pruned_cache else None
    if path is not None and path.exists():
        print(f"pruned model from {path}", flush=True)
        return torch.load(path, weights_only=False)
    basis = "parameters" if args.method == "llm_pruner" else "layers"
    outcome = prune(
        copy.deepcopy(model),
        calibration,
        method=args.method,
        target_sparsity=args.target,
        sparsity_basis=basis,
        options=json.loads(args.options),
        seed=0,
        tokenizer=tokenizer,
        compensation_data=compensation,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(outcome, path)
        except (AttributeError, TypeError) as exc:  # width artifacts carry a local saver: not picklable
            path.unlink(missing_ok=True)
            print(f"pruned model not cached: {exc}", flush=True)
    return outcome


def cmd_run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, tokenizer = load_model(args.model, cache_dir=CACHE)
    wiki = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8")
    first_half = wiki[: len(wiki) // 2]
    bos = tokenizer.bos_token_id if model.config.model_type.startswith("gemma") else None
    calibration, compensation = pruning_data(model, tokenizer, first_half, bos, args)
    streams = eval_streams(tokenizer, args.eval_tokens, args.ppl_seq_len, bos)
    base = {
        "model": args.model,
        "method": args.method,
        "target": args.target,
        "options": json.loads(args.options),
        "data": args.data,
        "calibration": args.calibration,
        "compensation_windows": 0 if compensation is None else compensation.shape[0],
        "eval_tokens": args.eval_tokens,
        "zs_limit": args.zs_limit if args.tasks else None,
    }
    if args.dense:
        emit(out, {**base, "variant": "dense", **evaluate(model, tokenizer, streams, args)})
    variants = args.variants.split(",")
    # Recovery data and teacher are taken from the dense model once and shared by every variant.
    setups: dict[tuple[str, str], RecoverySetup] = {}
    for data_name in args.data.split(","):
        for variant in variants:
            if VARIANTS[variant] is not None:
                config = recovery_config(variant, data_name, args)
                setup = prepare_recovery(model, tokenizer, config, [first_half], seed=args.recovery_seed)
                assert setup is not None
                setups[(variant, data_name)] = setup
    outcome = pruned_outcome(model, tokenizer, calibration, compensation, args)
    report = outcome.report
    pruned = {
        **base,
        "parameters": report["parameters_after"],
        "achieved_sparsity": round(report["achieved_parameter_sparsity"], 5),
        "removed_layers": report.get("removed_layers"),
        "pruning_seconds": report["pruning_seconds"],
    }
    if "none" in variants:
        emit(out, {**pruned, "variant": "none", **evaluate(outcome.model, tokenizer, streams, args)})
    for (variant, data_name), setup in setups.items():
        started = time.perf_counter()
        trial = copy.copy(outcome)
        trial.model, trial.report = copy.deepcopy(outcome.model), dict(report)
        apply_recovery(trial, setup, seed=args.recovery_seed)
        rec = trial.report["recovery"]
        record = {
            **pruned,
            "data": data_name,
            "variant": variant,
            "recovery_seconds": rec["seconds"],
            "tokens_trained": rec["tokens_trained"],
            "recovery_peak_memory": rec["peak_memory"],
            "trainable_parameters": rec["trainable_parameters"],
            "loss_curve": rec["loss_curve"],
            "lr": setup.config.effective_lr,
            "temperature": setup.config.temperature,
            "hidden_weight": setup.config.hidden_weight,
            "ce_weight": setup.config.ce_weight_in_use,
            "lora_r": setup.config.lora_r if setup.config.train == "lora" else None,
            "sampling": [setup.config.sample_top_k, setup.config.sample_temperature]
            if data_name == "self_generated"
            else None,
            "recovery_seed": args.recovery_seed,
            "variant_seconds": round(time.perf_counter() - started, 1),
        }
        emit(out, {**record, **evaluate(trial.model, tokenizer, streams, args)})
        del trial


def variant_label(row: dict, with_ce: bool = True) -> str:
    """The row's recovery with the loss terms it added: +ce (next-token term), +hidden (hidden-state term)."""
    ce = "+ce" if with_ce and row.get("ce_weight") else ""
    return row["variant"] + ce + ("+hidden" if row.get("hidden_weight") else "")


def data_label(row: dict) -> str:
    """The recovery data, with its sampling where it is not top-k 50 at temperature 1 (the rows before 7 Dec)
    and its seed where it is not 0."""
    top_k, temperature = row.get("sampling") or (50, 1.0)
    details = [] if (top_k, temperature) == (50, 1.0) else [f"top-k {top_k}, T {temperature:g}"]
    details += [f"seed {row['recovery_seed']}"] if row.get("recovery_seed") else []
    return f"{row['data']} ({', '.join(details)})" if details else row["data"]


def _ratio(row: dict, dense: dict | None, key: str) -> str:
    return f" ({row[key] / dense[key]:.2f}x)" if dense else ""


def zero_shot_lines(rows: list[dict]) -> list[str]:
    """Zero-shot acc_norm per task and the average, each with its standard error (binomial, per task)."""
    if not rows:
        return []
    tasks = list(rows[0]["zero_shot"])
    dense = next((r for r in rows if r["variant"] == "dense" and "zero_shot_hits" in r), None)
    lines = [
        "| recovery | data | tokens | " + " | ".join(tasks) + " | average | vs dense, paired |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for r in rows:
        se = r.get("zero_shot_stderr", {})
        cells = [f"{100 * r['zero_shot'][t]:.1f} ± {100 * se.get(t, float('nan')):.1f}" for t in tasks]
        avg_se = math.sqrt(sum(se.get(t, float("nan")) ** 2 for t in tasks)) / len(tasks)
        data = "-" if r["variant"] in ("dense", "none") else r["data"]
        variant = variant_label(r)
        vs_dense = "-"
        same_items = dense is not None and "zero_shot_hits" in r and r is not dense
        if same_items and [len(v) for v in r["zero_shot_hits"].values()] == [
            len(v) for v in dense["zero_shot_hits"].values()
        ]:
            diff, diff_se = paired_average_difference(r["zero_shot_hits"], dense["zero_shot_hits"])
            vs_dense = f"{100 * diff:+.1f} ± {100 * diff_se:.1f}"
        lines.append(
            f"| {variant} | {data} | {r.get('tokens_trained', '-')} | "
            + " | ".join(cells)
            + f" | {100 * r['zero_shot_avg']:.1f} ± {100 * avg_se:.1f} | {vs_dense} |"
        )
    return lines


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in args.files for line in Path(f).read_text().splitlines() if line.strip()]
    lines: list[str] = []
    for r in rows:
        r.setdefault("eval_tokens", 4096)  # rows before the field was recorded all used 4,096
        r.setdefault("zs_limit", 200 if "zero_shot" in r else None)  # likewise: 200 items per task
        r["options_key"] = json.dumps(r.get("options") or {}, sort_keys=True)  # recorded since 4 Dec; {} before
        r.setdefault("calibration", "wikitext2")  # recorded since 7 Dec: before, always WikiText-2 ...
        r.setdefault("compensation_windows", 0)  # ... and compensation on the calibration batch
    group_key = ("model", "method", "target", "options_key", "eval_tokens", "calibration", "compensation_windows")
    groups = list(dict.fromkeys(tuple(r[k] for k in group_key) for r in rows if r["variant"] != "dense"))
    panels = max(len(groups), 1)
    columns = min(3, panels)
    plot_rows = -(-panels // columns)
    fig, axes = plt.subplots(plot_rows, columns, figsize=(6.5 * columns, 5.5 * plot_rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups, strict=False):
        model, method, target, options_key, eval_tokens, calibration, comp_windows = group
        options = "" if options_key == "{}" else f", options {options_key}"
        if (calibration, comp_windows) != ("wikitext2", 0):
            options += f", pruned on {calibration} calibration with {comp_windows} compensation windows"
        # The dense reference of the same model measured on the same evaluation tokens.
        dense = next(
            (r for r in rows if (r["model"], r["eval_tokens"]) == (model, eval_tokens) and r["variant"] == "dense"),
            None,
        )
        sub = [r for r in rows if tuple(r[k] for k in group_key) == group and r["variant"] != "dense"]
        sub.sort(
            key=lambda r: (
                r["variant"] != "none",
                r["variant"],
                r["data"],
                r.get("tokens_trained", 0),
                r.get("lr", 0),
                r.get("ce_weight") or 0,
            )
        )
        lines += [
            f"### {model}, {method} at {target:.0%} ({'parameters' if method == 'llm_pruner' else 'layers'}){options}, "
            f"evaluated on {eval_tokens:,} tokens per set",
            "",
            "| recovery | data | lr | ce_weight | wiki2 PPL (x dense) | PTB PPL (x dense) | tokens trained "
            "| recovery s | peak RSS MiB | trainable params |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        if dense:
            lines.append(
                f"| dense | - | - | - | {dense['ppl_wikitext2']:.2f} | {dense['ppl_ptb']:.2f} | - | - | - | - |"
            )
        labels, wiki, ptb = [], [], []
        for r in sub:
            data = "-" if r["variant"] == "none" else data_label(r)
            lines.append(
                f"| {variant_label(r, with_ce=False)} | {data} | {r.get('lr', '-')} | {r.get('ce_weight') or '-'} "
                f"| {r['ppl_wikitext2']:.2f}{_ratio(r, dense, 'ppl_wikitext2')} "
                f"| {r['ppl_ptb']:.2f}{_ratio(r, dense, 'ppl_ptb')} | {r.get('tokens_trained', 0)} "
                f"| {r.get('recovery_seconds', '-')} | {r.get('recovery_peak_memory', {}).get('peak_rss_mib', '-')} "
                f"| {r.get('trainable_parameters', '-')} |"
            )
            labels.append(
                r["variant"]
                if r["variant"] == "none"
                else f"{variant_label(r)}\n({data_label(r)}, lr {r['lr']:g}, {r['tokens_trained'] // 1000}k tok)"
            )
            scale = (dense["ppl_wikitext2"], dense["ppl_ptb"]) if dense else (1.0, 1.0)
            wiki.append(r["ppl_wikitext2"] / scale[0])
            ptb.append(r["ppl_ptb"] / scale[1])
        # Zero-shot items do not depend on the perplexity tokens: any dense run of the model with the
        # same number of items per task will do (one table per item count).
        for limit in sorted({r["zs_limit"] for r in sub if "zero_shot" in r}):
            dense_zs = next(
                (r for r in rows if r["model"] == model and r["variant"] == "dense" and r.get("zs_limit") == limit),
                None,
            )
            scored = [r for r in [dense_zs, *sub] if r and "zero_shot" in r and r["zs_limit"] == limit]
            lines += ["", f"Zero-shot, {limit} items per task:", "", *zero_shot_lines(scored), ""]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], wiki, width=0.4, label="WikiText-2 (held-out half)")
        ax.bar([x + 0.2 for x in xs], ptb, width=0.4, label="PTB")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("perplexity / dense")
        title = f"{model.split(':')[-1]} {method} {target:.0%} ({eval_tokens // 1024}k eval tokens)"
        ax.set_title(f"{title}\n{options.lstrip(', ')}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    text = "\n".join(lines) + "\n"
    if args.md:
        Path(args.md).write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--model", default="builtin:smollm2-135m")
    run.add_argument("--out", required=True)
    run.add_argument("--method", default="gradmap")
    run.add_argument("--target", type=float, default=0.2)
    run.add_argument("--options", default="{}", help="method options as JSON")
    run.add_argument(
        "--data", default="wikitext2", help="recovery data: wikitext2, self_generated, mix, or several (comma)"
    )
    run.add_argument("--lr", type=float, default=None, help="recovery learning rate (default: the engine's)")
    run.add_argument("--variants", default=",".join(VARIANTS))
    run.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    run.add_argument("--samples", type=int, default=64, help="recovery sequences")
    run.add_argument("--seq-len", type=int, default=128)
    run.add_argument("--steps", type=int, default=30)
    run.add_argument("--batch", type=int, default=4)
    run.add_argument("--calib-samples", type=int, default=8)
    run.add_argument("--calib-len", type=int, default=128)
    run.add_argument(
        "--calibration", default="wikitext2", choices=["wikitext2", "self_generated"], help="pruning data source"
    )
    run.add_argument(
        "--compensation-samples",
        type=int,
        default=0,
        help="compensation windows from the calibration's source (0: the calibration batch, as the older rows)",
    )
    run.add_argument("--eval-tokens", type=int, default=8192)
    run.add_argument("--ppl-seq-len", type=int, default=128)
    run.add_argument("--tasks", default="", help="zero-shot tasks (comma-separated); empty = none")
    run.add_argument("--zs-limit", type=int, default=200)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    run.add_argument(
        "--sample-top-k",
        type=int,
        default=None,
        help="self-generated data: top-k (0: all tokens; default: the engine's)",
    )
    run.add_argument(
        "--sample-temperature",
        type=float,
        default=None,
        help="self-generated data: temperature (default: the engine's)",
    )
    run.add_argument("--recovery-seed", type=int, default=0, help="seed of the recovery data and training")
    run.add_argument("--lora-r", type=int, default=8, help="LoRA rank (lora variants)")
    run.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: 2 x rank)")
    run.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE term")
    run.add_argument(
        "--ce-weight", type=float, default=None, help="next-token term in distillation (default: the engine's, by data)"
    )
    run.add_argument("--pruned-cache", default=None, help="directory to keep/reuse the pruned model between runs")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--md", default=None)
    rep.add_argument("--png", default=str(REPO / "docs" / "benchmarks" / "recovery.png"))
    rep.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
