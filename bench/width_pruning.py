"""Benchmark LLM-Pruner width pruning: importance criteria, with and without LoRA recovery.

Run (one configuration after another, results appended to --out as JSON lines):
  python bench/width_pruning.py run --model builtin:smollm2-135m --out /tmp/wp-smollm2.jsonl
Make the table and plot from one or more result files:
  python bench/width_pruning.py report /tmp/wp-*.jsonl --md docs/benchmarks/width-pruning.md \
      --png docs/benchmarks/width-pruning.png

Data split: calibration (and LoRA) windows come from the first half of wikitext2-valid.txt;
WikiText-2 perplexity is measured on a contiguous stretch of the second half, PTB on ptb.test.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.calibration import token_batches  # noqa: E402
from workers.engine.evaluation import perplexity, zero_shot  # noqa: E402
from workers.engine.modelzoo import load_model  # noqa: E402
from workers.engine.params import count_parameters  # noqa: E402
from workers.engine.pipeline import prune  # noqa: E402
from workers.engine.width.recovery import lora_recover  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CACHE = REPO / ".slimforge" / "models"


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Gemma degrades badly without BOS (lm-eval prepends it): start every window with it."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows[:, :-1]], dim=1)


def eval_streams(tokenizer, n_tokens: int, seq_len: int, bos: int | None) -> dict[str, torch.Tensor]:
    wiki = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8")
    second_half = wiki[len(wiki) // 2 :]
    ptb = (DATA / "eval" / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")
    ptb = " ".join(line.strip() for line in ptb.splitlines())  # Mikolov format: one sentence per line
    out = {}
    for name, text in (("wikitext2", second_half), ("ptb", ptb)):
        # Tokenise only a prefix big enough for n_tokens (saves time on the long text).
        ids = tokenizer(text[: n_tokens * 8], add_special_tokens=False)["input_ids"]
        stream = torch.tensor(ids[:n_tokens], dtype=torch.long)
        if bos is not None:  # segments of [BOS] + seq_len-1 text tokens, still one 1-D stream
            body = seq_len - 1
            rows = stream[: stream.numel() // body * body].view(-1, body)
            stream = torch.cat([torch.full((rows.shape[0], 1), bos), rows], dim=1).reshape(-1)
        out[name] = stream
    return out


@torch.no_grad()
def tokens_per_second(model, vocab: int, batch: int = 2, seq: int = 128, reps: int = 3) -> float:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(ids[:1, :16])  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return round(batch * seq / sorted(times)[len(times) // 2], 1)


def evaluate(model, tokenizer, streams, args) -> dict:
    model.eval()
    result = {}
    started = time.perf_counter()
    for name, ids in streams.items():
        result[f"ppl_{name}"] = round(perplexity(model, ids, seq_len=args.ppl_seq_len, batch_size=8)["ppl"], 3)
    if args.tasks:
        zs = zero_shot(
            model, tokenizer, args.tasks.split(","), DATA / "eval", limit=args.zs_limit, seed=0, per_item=True
        )
        result["zero_shot"] = {t: round(v["acc_norm"], 4) for t, v in zs.items()}
        result["zero_shot_hits"] = {t: v["hits_norm"] for t, v in zs.items()}  # paired comparisons
        result["zero_shot_acc"] = {t: round(v["acc"], 4) for t, v in zs.items()}
        result["zero_shot_stderr"] = {t: round(v["acc_norm_stderr"], 4) for t, v in zs.items()}
        result["zero_shot_avg"] = round(sum(result["zero_shot"].values()) / len(zs), 4)
    result["tokens_per_s"] = tokens_per_second(model, len(tokenizer))
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    return result


def emit(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def cmd_run(args) -> None:
    out = Path(args.out)
    model, tokenizer = load_model(args.model, cache_dir=CACHE)
    wiki = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8")
    first_half = wiki[: len(wiki) // 2]
    bos = tokenizer.bos_token_id if model.config.model_type.startswith("gemma") else None
    calibration = with_bos(token_batches(tokenizer, [first_half], args.calib_samples, args.calib_len, seed=0), bos)
    recovery = with_bos(token_batches(tokenizer, [first_half], args.lora_samples, args.lora_len, seed=1), bos)
    streams = eval_streams(tokenizer, args.eval_tokens, args.ppl_seq_len, bos)
    base = {"model": args.model, "target": args.target, "options": json.loads(args.options)}
    if not args.skip_dense:
        emit(
            out,
            {
                **base,
                "config": "dense",
                "parameters": count_parameters(model),
                **evaluate(model, tokenizer, streams, args),
            },
        )
    lora_for = set(args.lora_for.split(",")) if args.lora_for else set()
    for importance in args.importance.split(","):
        model, tokenizer = load_model(args.model, cache_dir=CACHE)
        options = {**base["options"], "importance": importance}
        outcome = prune(
            model,
            calibration,
            method="llm_pruner",
            target_sparsity=args.target,
            sparsity_basis="parameters",
            options=options,
            seed=0,
        )
        r = outcome.report
        record = {
            **base,
            "config": importance,
            "lora": False,
            "parameters": r["parameters_after"],
            "achieved_sparsity": round(r["achieved_parameter_sparsity"], 5),
            "attention_ratio": r["attention_ratio"],
            "mlp_ratio": r["mlp_ratio"],
            "pruning_seconds": r["pruning_seconds"],
            "peak_memory": r["peak_memory"],
            "artifact_format": r["artifact_format"],
        }
        emit(out, {**record, **evaluate(outcome.model, tokenizer, streams, args)})
        if importance in lora_for:
            merged, result = lora_recover(
                outcome.model,
                recovery,
                steps=args.lora_steps,
                lr=args.lora_lr,
                r=8,
                alpha=16,
                dropout=0.05,
                batch_size=args.lora_batch,
                seq_len=None,
                seed=0,
                on_step=lambda *a: None,
            )
            emit(
                out,
                {
                    **record,
                    "config": f"{importance}+lora",
                    "lora": True,
                    "lora_seconds": result.seconds,
                    "lora_loss_first_last": [result.losses[0], result.losses[-1]],
                    **evaluate(merged, tokenizer, streams, args),
                },
            )
        del model, outcome


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in args.files for line in Path(f).read_text().splitlines() if line.strip()]
    lines = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["model"] == model]
        lines += [
            f"### {model}",
            "",
            "| config | params (M) | removed | wiki2 PPL | PTB PPL | zero-shot avg (acc_norm) | prune s "
            "| peak RSS MiB | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sub:
            removed = "-" if r["config"] == "dense" else f"{r['achieved_sparsity']:.2%}"
            prune_s = r.get("pruning_seconds", "-")
            if r.get("lora"):
                prune_s = f"{prune_s} + {r['lora_seconds']} LoRA"
            lines.append(
                f"| {r['config']} | {r['parameters']['total'] / 1e6:.1f} | {removed} | {r['ppl_wikitext2']:.2f} "
                f"| {r['ppl_ptb']:.2f} | {r.get('zero_shot_avg', float('nan')):.3f} | {prune_s} "
                f"| {r.get('peak_memory', {}).get('peak_rss_mib', '-')} | {r['tokens_per_s']} |"
            )
        lines.append("")
        dense = next((r for r in sub if r["config"] == "dense"), None)
        names = [r["config"] for r in sub if r["config"] != "dense"]
        vals = [r["ppl_wikitext2"] for r in sub if r["config"] != "dense"]
        colors = ["tab:green" if "lora" in n else "tab:blue" for n in names]
        ax.bar(names, vals, color=colors)
        if dense:
            ax.axhline(dense["ppl_wikitext2"], color="black", linestyle="--", label="dense")
            ax.legend()
        ax.set_yscale("log")
        ax.set_title(f"{model}: WikiText-2 PPL after width pruning")
        ax.tick_params(axis="x", rotation=45)
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
    run.add_argument("--target", type=float, default=0.2)
    # The tables in docs/benchmarks/width-pruning.md use the paper's layer range (per-layer widths).
    run.add_argument("--options", default='{"widths": "per_layer"}', help="extra llm_pruner options as JSON")
    run.add_argument("--importance", default="element1,element2,vector,l2,random")
    run.add_argument("--lora-for", default="element1,l2", help="importances also run with LoRA recovery")
    run.add_argument("--calib-samples", type=int, default=10)
    run.add_argument("--calib-len", type=int, default=128)
    run.add_argument("--lora-samples", type=int, default=64)
    run.add_argument("--lora-len", type=int, default=128)
    run.add_argument("--lora-steps", type=int, default=30)
    run.add_argument("--lora-batch", type=int, default=4)
    run.add_argument("--lora-lr", type=float, default=3e-4)
    run.add_argument("--eval-tokens", type=int, default=8192)
    run.add_argument("--ppl-seq-len", type=int, default=128)
    run.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    run.add_argument("--zs-limit", type=int, default=50)
    run.add_argument("--skip-dense", action="store_true")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--md", default=None)
    rep.add_argument("--png", default=str(REPO / "docs" / "benchmarks" / "width-pruning.png"))
    rep.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
