"""Zero-shot accuracy of layer-pruned models on the seven tasks at >= 500 items each (issue #10),
every model paired against the dense one and against the first pruned row on the same items.

    OMP_NUM_THREADS=2 python bench/layer_pruning_zero_shot.py --k 6 --limit 500 \
        --out docs/benchmarks/layer-pruning-zero-shot.json

Each row removes the first k layers of a removal order recorded in `--runs` (the selections of
the perplexity tables), fits that method's compensation on the same 128 windows those tables used
(seed 1, first half of WikiText-2; the tasks' text is never part of it) and scores the same
fixed-seed items of every task. Rows run in the order given, dense first, and the file is written
after each, so a run cut short still answers the first comparisons.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from layer_pruning import DATA, compensate_removal, load, open_builtin, prepare_data, save  # noqa: E402

from workers.engine.evaluation import zero_shot  # noqa: E402
from workers.engine.evaluation.paired import paired_average_difference, paired_difference  # noqa: E402
from workers.engine.evaluation.tasks import TASKS  # noqa: E402
from workers.engine.layers import remove_layers  # noqa: E402

# Row name -> (method whose compensation is fitted, key of its selection in --runs).
ROWS = {
    "gradmap (default)": ("gradmap", "gradmap[in_loop_comp]"),
    "shortgpt + comp": ("shortgpt", "shortgpt"),
    "sleb + comp": ("sleb", "sleb"),
}


def scored(model, tokenizer, args) -> dict[str, Any]:
    started = time.perf_counter()
    tasks = zero_shot(model, tokenizer, list(TASKS), DATA / "eval", limit=args.limit, seed=0, per_item=True)
    return {"tasks": tasks, "seconds": round(time.perf_counter() - started, 1)}


def hits(row: dict[str, Any]) -> dict[str, list[float]]:
    return {task: [float(x) for x in result["hits"]] for task, result in row["tasks"].items()}


def summary(row: dict[str, Any], dense: dict[str, Any], first: dict[str, Any] | None) -> dict[str, Any]:
    tasks = row["tasks"]
    mean = sum(r["acc"] for r in tasks.values()) / len(tasks)
    stderr = math.sqrt(sum(r["acc_stderr"] ** 2 for r in tasks.values())) / len(tasks)
    out = {"avg_acc": mean, "avg_acc_stderr": stderr, "vs_dense": paired_average_difference(hits(row), hits(dense))}
    if first is not None:
        out["vs_first"] = paired_average_difference(hits(row), hits(first))
        out["per_task_vs_first"] = {t: paired_difference(hits(row)[t], hits(first)[t]) for t in tasks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", default=str(REPO / "docs" / "benchmarks" / "layer-pruning-smollm2-eval2.json"))
    parser.add_argument(
        "--gradmap-run",
        default=ROWS["gradmap (default)"][1],
        help="key of GradMAP's default selection in --runs (gradmap[inc32] in the Gemma-3 file)",
    )
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    checkpoint, tokenizer = open_builtin(args.model, args.threads)
    setup = argparse.Namespace(calib_samples=8, calib_len=128, comp_samples=128, ppl_tokens=0, ptb_tokens=0)
    data = prepare_data(tokenizer, setup)
    runs = json.loads(Path(args.runs).read_text())["runs"]
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"model": args.model, "k": args.k, "limit": args.limit, "tasks": list(TASKS)})
    rows = results.setdefault("rows", {})
    if "dense" not in rows:
        print("dense", flush=True)
        rows["dense"] = scored(load(checkpoint), tokenizer, args)
        save(out_path, results)
    for name in args.rows:
        if name in rows:
            continue
        method, selection = ROWS[name]
        selection = args.gradmap_run if method == "gradmap" else selection
        found = [r for key, r in runs.items() if key.rsplit("@", 1)[0] == selection and r["k"] >= args.k]
        removed = sorted(min(found, key=lambda r: r["k"])["removal_order"][: args.k])
        print(name, removed, flush=True)
        model = load(checkpoint)
        report = compensate_removal(model, method, removed, data, {"compensation_samples": 128})
        remove_layers(model, removed)
        rows[name] = {"removed_layers": removed, "compensation_layers": report.get("layers")}
        rows[name].update(scored(model, tokenizer, args))
        save(out_path, results)
    pruned = [name for name in rows if name != "dense"]
    first = rows[pruned[0]] if pruned else None
    results["summary"] = {
        name: summary(row, rows["dense"], first if name not in ("dense", pruned[0] if pruned else None) else None)
        for name, row in rows.items()
    }
    save(out_path, results)
    for name, s in results["summary"].items():
        line = f"{name}: {100 * s['avg_acc']:.2f} ± {100 * s['avg_acc_stderr']:.2f}"
        line += f"; vs dense {100 * s['vs_dense'][0]:+.2f} ± {100 * s['vs_dense'][1]:.2f}"
        if "vs_first" in s:
            line += f"; vs {pruned[0]} {100 * s['vs_first'][0]:+.2f} ± {100 * s['vs_first'][1]:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
