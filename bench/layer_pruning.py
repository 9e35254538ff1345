"""Benchmark of the layer pruners: GradMAP (+/- compensation) against ShortGPT (+/- compensation),
SLEB, Taylor+ and random, on the built-in SmolLM2-135M and Gemma-3-270M.

Protocol (same for every method):
- calibration: `--calib-samples` x `--calib-len` token windows drawn (seed 0) from the first half of
  wikitext2-valid.txt; evaluation text is taken from the second half, so the two never overlap;
- perplexity on `--ppl-tokens` held-out WikiText-2 tokens and `--ptb-tokens` PTB test tokens in
  non-overlapping `--seq-len` segments (workers.engine.evaluation.perplexity);
- zero-shot acc/acc_norm on a fixed seeded subset (`--zs-limit` items) of `--zs-tasks`
  (workers.engine.evaluation.zero_shot);
- every selector runs once through `workers.engine.pipeline.prune` at the largest ratio (its report
  gives pruning wall time, peak RSS, passes). All selectors here are greedy/prefix-consistent
  (iterative ones decide one layer at a time from the previous state; one-shot ones remove the k
  lowest of one scoring), so the removal set at a smaller ratio is the prefix of the removal order:
  exactly what a separate run at that ratio would choose. Compensation depends on the final set, so
  it is fitted per ratio with the engine's own `measure_shift` + `compensate` (the code path
  `run_layer_method` uses).

Usage:
    python bench/layer_pruning.py run --model smollm2-135m --out docs/benchmarks/layer-pruning-smollm2.json
    python bench/layer_pruning.py report docs/benchmarks/layer-pruning-*.json --plot-dir docs/benchmarks
Results are written after every evaluation, and a rerun skips entries already in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.calibration import token_batches  # noqa: E402
from workers.engine.compensation import compensate, measure_shift  # noqa: E402
from workers.engine.evaluation import perplexity, zero_shot  # noqa: E402
from workers.engine.layers import remove_layers  # noqa: E402
from workers.engine.modelzoo import builtin_checkpoint  # noqa: E402
from workers.engine.pipeline import prune  # noqa: E402
from workers.engine.registry import get_method, parse_options  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SELECTORS = ["gradmap", "shortgpt", "sleb", "taylor_plus", "random"]
COMPENSATED = {"gradmap", "shortgpt", "sleb"}  # also evaluated with compensation on


def load(checkpoint: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def open_builtin(name: str, threads: int) -> tuple[Path, Any]:
    """A built-in model's checkpoint and tokenizer, with torch set to `threads` threads."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    checkpoint = builtin_checkpoint(name, REPO / ".slimforge" / "models")
    return checkpoint, AutoTokenizer.from_pretrained(checkpoint)


def compensate_removal(model, method: str, removed: list[int], data: dict[str, Any], comp: dict[str, Any]) -> dict:
    """Fit `method`'s compensation (options `comp` over its defaults) for removing `removed` from the
    still-whole `model`, on the calibration's drift and the compensation windows; its report."""
    keep = [i for i in range(model.config.num_hidden_layers) if i not in set(removed)]
    opts = parse_options(get_method(method), {"compensation": True, **comp})
    shifts = measure_shift(model, keep, data["calibration"], opts.micro_batch_size)
    comp_ids = data["compensation"][: opts.compensation_samples]
    return compensate(model, keep, comp_ids, opts.compensation_config(), shifts=shifts)


def removal_order(report: dict[str, Any]) -> list[int]:
    """Order in which the selector removed layers (decisions are recorded in that order)."""
    return [d["chosen"] for d in report["decisions"]]


def evaluate(model, tokenizer, data: dict[str, Any], args, zero_shot_on: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, key in (("wikitext2", "wiki"), ("ptb", "ptb")):
            scored = perplexity(model, data[key], seq_len=args.seq_len, batch_size=8)
            out[f"{name}_ppl"] = scored["ppl"]
            out[f"{name}_ppl_stderr"] = scored["ppl_stderr"]
            out[f"{name}_segment_nll"] = scored["segment_nll"]  # for paired comparisons in the report
    if args.zs_limit > 0 and zero_shot_on:
        tasks = zero_shot(model, tokenizer, args.zs_tasks, DATA / "eval", limit=args.zs_limit, seed=0)
        out["zero_shot"] = {
            t: {k: r[k] for k in ("acc", "acc_norm", "n", "acc_stderr", "acc_norm_stderr")} for t, r in tasks.items()
        }
        out["zero_shot_avg_acc"] = sum(r["acc"] for r in tasks.values()) / len(tasks)
        # Tasks are independent samples: the average's standard error combines theirs.
        out["zero_shot_avg_acc_stderr"] = math.sqrt(sum(r["acc_stderr"] ** 2 for r in tasks.values())) / len(tasks)
    out["eval_seconds"] = round(time.perf_counter() - started, 1)
    return out


def prepare_data(tokenizer, args) -> dict[str, Any]:
    text = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8")
    half = len(text) // 2
    calibration = token_batches(tokenizer, [text[:half]], args.calib_samples, args.calib_len, seed=0)
    # Compensation's own, larger budget from the same source (another seed); never the eval half.
    compensation = token_batches(tokenizer, [text[:half]], args.comp_samples, args.calib_len, seed=1)
    wiki = torch.tensor(tokenizer(text[half:], add_special_tokens=False)["input_ids"][: args.ppl_tokens])
    ptb_text = (DATA / "eval" / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")
    ptb = torch.tensor(tokenizer(ptb_text, add_special_tokens=False)["input_ids"][: args.ptb_tokens])
    return {"calibration": calibration, "compensation": compensation, "wiki": wiki, "ptb": ptb}


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def run(args) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    checkpoint = builtin_checkpoint(args.model, REPO / ".slimforge" / "models")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data = prepare_data(tokenizer, args)
    out_path = Path(args.out)
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.setdefault("model", args.model)
    results["setup"] = {
        "calibration": f"{args.calib_samples}x{args.calib_len} tokens, first half of wikitext2-valid.txt, seed 0",
        "compensation_data": f"up to {args.comp_samples}x{args.calib_len} tokens, first half, seed 1",
        "wikitext2_eval_tokens": int(data["wiki"].numel()),
        "ptb_eval_tokens": int(data["ptb"].numel()),
        "seq_len": args.seq_len,
        "zero_shot_tasks": args.zs_tasks,
        "zero_shot_limit": args.zs_limit,
        "ratios": args.ratios,
        "torch_threads": torch.get_num_threads(),
    }
    runs = results.setdefault("runs", {})
    if args.runs_from:  # reuse recorded selections (removal orders + their timings) instead of rerunning
        for key, entry in json.loads(Path(args.runs_from).read_text())["runs"].items():
            runs.setdefault(key, entry | {"reused_from": Path(args.runs_from).name})
    evals = results.setdefault("evals", {})
    n_layers = load(checkpoint).config.num_hidden_layers
    results["n_layers"] = n_layers

    if "dense" not in evals and not args.skip_dense:
        print("evaluating dense model", flush=True)
        evals["dense"] = evaluate(load(checkpoint), tokenizer, data, args)
        save(out_path, results)

    max_ratio = max(args.ratios)
    ratios = sorted(args.ratios, key=lambda r: abs(r - args.first_ratio))  # most informative ratio first

    def run_for(selector: str, k: int) -> dict[str, Any] | None:
        """A recorded selection of `selector` that removed at least k layers (its order's prefix is the answer)."""
        found = [r for key, r in runs.items() if key.rsplit("@", 1)[0] == selector and r["k"] >= k]
        return min(found, key=lambda r: r["k"]) if found else None

    def select(selector: str, k: int) -> dict[str, Any]:
        existing = run_for(selector, k)
        if existing is not None:
            return existing
        base = selector.split("[")[0]
        print(f"selecting with {selector} at {max_ratio}", flush=True)
        model = load(checkpoint)
        options = {"compensation": False, **args.options.get(selector, {})}
        # Selectors that fit compensation while scoring see the same windows compensation fits on.
        outcome = prune(
            model,
            data["calibration"],
            method=base,
            target_sparsity=max_ratio,
            options=options,
            compensation_data=data["compensation"],
        )
        report = outcome.report
        runs[f"{selector}@{report['k']}"] = entry = {
            "selector": selector,
            "removal_order": removal_order(report),
            "pruning_seconds": report["pruning_seconds"],
            "timings": report["timings"],
            "peak_memory": report["peak_memory"],
            "forward_passes": report["forward_passes"],
            "backward_passes": report["backward_passes"],
            "decision_seconds": [d.get("seconds") for d in report["decisions"]],
            "in_loop_seconds": [d.get("in_loop_compensation_seconds") for d in report["decisions"]],
            "options": report["options"],
            "k": report["k"],
        }
        save(out_path, results)
        return entry

    def evaluate_removal(selector: str, ratio: float, comp: dict[str, Any] | None, tag: str = "") -> None:
        k = math.floor(ratio * n_layers + 0.5)
        key = f"{selector}{'+comp' if comp is not None else ''}{tag}@{k}"
        if key in evals:
            return
        removed = sorted(select(selector, k)["removal_order"][:k])
        print(f"evaluating {key}: remove {removed}", flush=True)
        model = load(checkpoint)
        entry: dict[str, Any] = {
            "method": selector,
            "compensation": comp is not None,
            "k": k,
            "removed_layers": removed,
            "tag": tag,
        }
        if comp is not None:
            started = time.perf_counter()
            entry["compensation_report"] = compensate_removal(model, selector.split("[")[0], removed, data, comp)
            entry["compensation_options"] = comp
            entry["compensation_seconds"] = round(time.perf_counter() - started, 2)
        remove_layers(model, removed)
        with_zero_shot = (
            any(abs(ratio - r) < 1e-9 for r in args.zs_ratios)
            and (not args.zs_methods or f"{selector}{'+comp' if comp is not None else ''}" in args.zs_methods)
            and not tag
        )
        entry.update(evaluate(model, tokenizer, data, args, zero_shot_on=with_zero_shot))
        evals[key] = entry
        save(out_path, results)

    # Priority order, so a run cut short still answers the main questions: every method at the
    # first ratio, then the other ratios, then extra variants.
    def main_rows(ratio: float) -> None:
        for selector in args.methods:  # compensated rows first: they decide the ranking
            if selector in COMPENSATED:
                evaluate_removal(selector, ratio, {})
        for selector in args.methods:
            evaluate_removal(selector, ratio, None)

    # Compensation variants go on top of every compensated selector, so a default can be chosen by
    # measurement without favouring one selector; at the first ratio they run right after its main rows.
    def variants(ratio: float) -> None:
        if args.variant_ratios and not any(abs(ratio - r) < 1e-9 for r in args.variant_ratios):
            return
        for name, comp in args.comp_variants.items():
            for selector in args.variant_methods or args.methods:
                if selector.split("[")[0] in COMPENSATED:  # selector variants (gradmap[...]) too
                    evaluate_removal(selector, ratio, comp, tag=f"[{name}]")

    if not args.only_variants:
        main_rows(ratios[0])
    variants(ratios[0])
    for ratio in ratios[1:] if not args.only_variants else []:
        main_rows(ratio)
    for ratio in ratios[1:]:
        variants(ratio)
    # Selector variants (e.g. other GradMAP scores): with and without compensation at the first
    # ratio, with compensation (the product default) at --extra-ratios.
    for selector in args.extra_selectors:
        evaluate_removal(selector, args.first_ratio, None)
        for ratio in [args.first_ratio, *args.extra_ratios]:
            evaluate_removal(selector, ratio, {})
    print("done", flush=True)


# ---------------------------------------------------------------------------------------------
# Report: tables for the doc and PNG plots


def label(entry: dict[str, Any]) -> str:
    return entry["method"] + (" + comp" if entry["compensation"] else "") + entry.get("tag", "")


def print_pivots(res: dict[str, Any]) -> None:
    """One row per method, one column per k: wiki ppl, PTB ppl and zero-shot average side by side."""
    entries = [e for key, e in res["evals"].items() if key != "dense"]
    ks = sorted({e["k"] for e in entries})
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for e in entries:
        by_label.setdefault(label(e), {})[e["k"]] = e
    dense = res["evals"]["dense"]
    for metric, title, fmt in (
        ("wikitext2_ppl", "WikiText-2 perplexity (lower is better)", "{:.2f}"),
        ("ptb_ppl", "PTB perplexity", "{:.2f}"),
        ("zero_shot_avg_acc", "zero-shot average accuracy", "{:.3f}"),
    ):
        if metric not in dense:
            continue
        print(f"\n{title}; dense = {fmt.format(dense[metric])}\n")
        print("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        pick = max if metric == "zero_shot_avg_acc" else min  # accuracy: higher is better
        best = {
            k: pick((row[k][metric] for row in by_label.values() if metric in row.get(k, {})), default=None) for k in ks
        }
        rows = sorted(by_label.items(), key=lambda item: item[1].get(ks[-1], {}).get(metric, math.inf))
        for name, row in rows:
            if not any(metric in row.get(k, {}) for k in ks):
                continue
            cells = []
            for k in ks:
                value = row.get(k, {}).get(metric)
                text = "-" if value is None else fmt.format(value)
                cells.append(f"**{text}**" if value is not None and value == best[k] else text)
            print(f"| {name} | " + " | ".join(cells) + " |")


def paired(entry: dict[str, Any], reference: dict[str, Any], text: str) -> tuple[float, float] | None:
    """(ppl ratio entry/reference, z) from per-segment NLL differences on the same segments."""
    a, b = entry.get(f"{text}_segment_nll"), reference.get(f"{text}_segment_nll")
    if not a or not b or len(a) != len(b):
        return None
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(diff.std() / math.sqrt(len(diff)))
    mean = float(diff.mean())
    return math.exp(mean), (mean / se if se > 0 else 0.0)


def print_precise(res: dict[str, Any], references: tuple[str, ...] = ("gradmap + comp", "shortgpt")) -> None:
    """Per k: every entry with its standard errors and paired comparisons against each of `references`."""
    entries = [e for key, e in res["evals"].items() if key != "dense" and "wikitext2_ppl_stderr" in e]
    dense = res["evals"].get("dense")
    if dense is not None:
        print(
            f"\nDense: WikiText-2 {dense['wikitext2_ppl']:.2f} ± {dense.get('wikitext2_ppl_stderr', 0):.2f}, "
            f"PTB {dense['ptb_ppl']:.2f} ± {dense.get('ptb_ppl_stderr', 0):.2f}"
        )
    for k in sorted({e["k"] for e in entries}):
        rows = sorted((e for e in entries if e["k"] == k), key=lambda e: e["wikitext2_ppl"])
        refs = [next((e for e in rows if label(e) == name), None) for name in references]
        print(
            f"\nk={k}: perplexity ± standard error; paired = ratio to the named row (z of the paired "
            "per-segment NLL difference; |z| < 2 is a tie)\n"
        )
        heads = " | ".join(f"wiki vs {name} | PTB vs {name}" for name in references)
        print(f"| method | WikiText-2 | PTB | {heads} | comp tokens | comp s |")
        print("|---|---|---|" + "---|---|" * len(references) + "---|---|")
        for e in rows:
            cells = [f"{e[f'{text}_ppl']:.2f} ± {e[f'{text}_ppl_stderr']:.2f}" for text in ("wikitext2", "ptb")]
            for ref in refs:
                for text in ("wikitext2", "ptb"):
                    cmp = paired(e, ref, text) if ref is not None and e is not ref else None
                    cells.append("-" if cmp is None else f"{cmp[0]:.3f}x (z={cmp[1]:+.1f})")
            c = e.get("compensation_report") or {}
            cells.append(str(c.get("compensation_tokens", "-")))
            cells.append(str(e.get("compensation_seconds", "-")))
            print(f"| {label(e)} | " + " | ".join(cells) + " |")


def print_time_to_k(res: dict[str, Any]) -> None:
    """Scoring seconds and passes each selector needed to reach every k (iterative ones: sum of its decisions)."""
    ks = sorted({e["k"] for key, e in res["evals"].items() if key != "dense"})
    runs = [r for r in res["runs"].values() if r["selector"] in SELECTORS]
    print("\nScoring time (s) to choose k layers; fwd/bwd = forward / backward passes of the calibration batch\n")
    print("| selector | " + " | ".join(f"k={k} s (fwd/bwd)" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for r in sorted(runs, key=lambda r: r["selector"]):
        cells = []
        per_decision = r.get("decision_seconds") or []
        iterative = len(per_decision) == r["k"] and all(x is not None for x in per_decision)
        for k in ks:
            if iterative:
                seconds = sum(per_decision[:k])
                if r["selector"] == "gradmap":  # one forward+backward per decision
                    fwd = bwd = k
                else:  # SLEB: one forward per remaining candidate per decision (no layer is protected here)
                    fwd, bwd = sum(res["n_layers"] - step for step in range(k)), 0
            else:
                seconds, fwd, bwd = r["timings"]["scoring"], r["forward_passes"], r["backward_passes"]
            cells.append(f"{seconds:.1f} ({fwd}/{bwd})")
        print(f"| {r['selector']} | " + " | ".join(cells) + " |")


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[dict[str, Any]] = []
    for path in args.inputs:  # files of the same model (e.g. one per ratio, run in parallel) are merged
        res = json.loads(Path(path).read_text())
        same = next((f for f in files if f["model"] == res["model"]), None)
        if same is None:
            files.append(res)
        else:
            same["evals"] = res["evals"] | same["evals"]
            same["runs"] = res["runs"] | same["runs"]
    for res in files:
        if "dense" not in res["evals"]:  # a paired-only sweep: the precise tables are all it gives
            print(f"\n### {res['model']} (no dense row)\n")
            print_precise(res, tuple(args.refs))
    files = [res for res in files if "dense" in res["evals"]]
    if not files:
        return
    plot_dir = Path(args.plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4.5), squeeze=False)
    for ax, res in zip(axes[0], files, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for key, entry in res["evals"].items():
            if key == "dense":
                continue
            series.setdefault(label(entry), []).append((entry["k"], entry["wikitext2_ppl"]))
        n_ratios = len({k for points in series.values() for k, _ in points})
        # Placement variants and one-ratio variants stay in the tables, so the plot stays readable.
        series = {n: p for n, p in series.items() if "[" not in n.split(" ")[-1] and len(p) == n_ratios}
        for name, points in sorted(series.items()):
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label=name + (" (off scale)" if name == "random" else ""),
                linestyle="-" if "gradmap" in name else "--",
            )
        dense_ppl = res["evals"]["dense"]["wikitext2_ppl"]
        ax.axhline(dense_ppl, color="gray", linewidth=0.8, label="dense")
        # Random removal explodes by orders of magnitude; scale the axis to the real contenders.
        contenders = [v for name, points in series.items() if name != "random" for _, v in points]
        ax.set_ylim(dense_ppl * 0.9, 1.2 * max(contenders))
        ax.set_yscale("log")
        ax.set_xlabel(f"layers removed (of {res['n_layers']})")
        ax.set_ylabel("WikiText-2 perplexity (held-out, log scale)")
        ax.set_title(res["model"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "layer-pruning-ppl.png", dpi=120)

    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4), squeeze=False)
    for ax, res in zip(axes[0], files, strict=True):
        k = max(r["k"] for r in res["runs"].values())
        chosen = {r["selector"]: r for r in res["runs"].values() if r["k"] == k and r["selector"] in SELECTORS}
        names = [m for m in SELECTORS if m in chosen]
        seconds = [chosen[m]["pruning_seconds"] for m in names]
        ax.bar(names, seconds, color=["tab:red" if m == "gradmap" else "tab:blue" for m in names])
        ax.set_ylabel(f"pruning wall time, s (k={k}, no compensation)")
        ax.set_title(res["model"])
    fig.tight_layout()
    fig.savefig(plot_dir / "layer-pruning-time.png", dpi=120)

    for res in files:
        print(f"\n### {res['model']} ({res['n_layers']} layers)\n")
        print_pivots(res)
        print_precise(res, tuple(args.refs))
        print_time_to_k(res)
        print("\nAll entries:\n")
        dense = res["evals"]["dense"]
        has_zs = "zero_shot_avg_acc" in dense
        head = "| method | k | removed layers | wiki ppl | PTB ppl |" + (" zero-shot avg acc |" if has_zs else "")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        zs = f" {dense['zero_shot_avg_acc']:.3f} |" if has_zs else ""
        print(f"| dense | 0 | - | {dense['wikitext2_ppl']:.2f} | {dense['ptb_ppl']:.2f} |{zs}")
        rows = sorted((e for k, e in res["evals"].items() if k != "dense"), key=lambda e: (e["k"], e["wikitext2_ppl"]))
        for e in rows:
            comp = ""
            if e["compensation"]:
                c = e["compensation_report"]
                comp = f" (comp {'kept' if c['kept'] else 'rejected'} @L{c.get('layers')})"
            zs = (f" {e['zero_shot_avg_acc']:.3f} |" if "zero_shot_avg_acc" in e else " - |") if has_zs else ""
            print(
                f"| {label(e)}{comp} | {e['k']} | {e['removed_layers']} | {e['wikitext2_ppl']:.2f} | "
                f"{e['ptb_ppl']:.2f} |{zs}"
            )
        print("\n| selector | k | pruning s | scoring s | fwd passes | bwd passes | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(res["runs"].values(), key=lambda r: (r["k"], r["selector"])):
            print(
                f"| {r['selector']} | {r['k']} | {r['pruning_seconds']:.1f} | {r['timings']['scoring']:.1f} | "
                f"{r['forward_passes']} | {r['backward_passes']} | {r['peak_memory']['peak_rss_mib']:.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    r.add_argument("--out", required=True)
    r.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    r.add_argument("--methods", nargs="+", default=SELECTORS)
    r.add_argument("--calib-samples", type=int, default=8)
    r.add_argument("--calib-len", type=int, default=128)
    r.add_argument("--ppl-tokens", type=int, default=16384)
    r.add_argument("--ptb-tokens", type=int, default=8192)
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--zs-tasks", type=lambda s: s.split(","), default=["arc_easy", "piqa", "winogrande", "hellaswag"])
    r.add_argument("--zs-limit", type=int, default=50)
    r.add_argument("--zs-ratios", type=float, nargs="*", default=[0.2], help="ratios that also get zero-shot")
    r.add_argument("--zs-methods", nargs="*", default=[], help="only these (e.g. gradmap+comp sleb) get zero-shot")
    r.add_argument("--first-ratio", type=float, default=0.2)
    r.add_argument("--comp-variants", type=json.loads, default={}, help='{"name": {compensation options}}')
    r.add_argument("--variant-methods", nargs="*", default=[], help="selectors for --comp-variants (all)")
    r.add_argument("--variant-ratios", type=float, nargs="*", default=[], help="ratios for --comp-variants (all)")
    r.add_argument("--comp-samples", type=int, default=256, help="compensation windows drawn (options take a prefix)")
    r.add_argument("--only-variants", action="store_true", help="only the --comp-variants rows (no main grid)")
    r.add_argument("--skip-dense", action="store_true", help="no dense row (e.g. a sweep with paired comparisons)")
    r.add_argument("--runs-from", default=None, help="results JSON whose recorded selections are reused")
    r.add_argument("--extra-selectors", nargs="*", default=[], help="e.g. gradmap[influence] (options via --options)")
    r.add_argument("--extra-ratios", type=float, nargs="*", default=[], help="more ratios for --extra-selectors")
    r.add_argument(
        "--options", type=json.loads, default={}, help='per-selector options, JSON: {"sleb": {"scoring_samples": 4}}'
    )
    p = sub.add_parser("report")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--plot-dir", default=str(REPO / "docs" / "benchmarks"))
    p.add_argument("--refs", nargs="+", default=["gradmap + comp", "shortgpt"], help="rows every row is paired with")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
