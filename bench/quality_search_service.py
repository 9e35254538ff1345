"""A quality-targeted job against a single job at the size it chose, both through the real service.

`bench/quality_search.py` times the engine calls alone. This one times what a user waits for: from
`POST /v1/jobs` to the end, on the embedded default (`slimforge serve`: SQLite, in-process worker),
model load, calibration, pruning, artifact and publish included. One server, jobs one after the
other, in this order:
  1. the quality-targeted job (GradMAP default, `--max-ratio` on `--text`): it measures the dense
     side and caches it, as the first such job on a server does;
  2. a single job at the size the search chose (`target_sparsity` = k / layers), same calibration;
  3. with `--repeat-search`, the quality-targeted job again (the dense side now comes from the cache).
Calibration is the first half of WikiText-2's validation file, uploaded as a dataset (so both jobs
get the dataset's 128 compensation windows); PTB and the second half of WikiText-2 are never used
for it. The second job reuses nothing of the first but the loaded model files.

    OMP_NUM_THREADS=2 .venv/bin/python bench/quality_search_service.py --out docs/benchmarks/quality-search-service.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from first_job import embedded_server, run_job  # noqa: E402

from workers.engine.modelzoo import builtin_checkpoint  # noqa: E402

DATA = REPO.parent / "shared" / "data"
LAYERS = 30  # SmolLM2-135M


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-ratio", type=float, default=1.3)
    parser.add_argument("--text", default="ptb", choices=["ptb", "wikitext2"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--repeat-search", action="store_true", help="run the search again (dense side cached)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.text == "wikitext2":
        raise SystemExit("the built-in wikitext2 set is the whole file: calibration's half would overlap it (422)")

    with tempfile.TemporaryDirectory(prefix="slimforge-quality-search-") as tmp:
        data_dir = Path(tmp) / "data"
        builtin_checkpoint("smollm2-135m", data_dir / "models")  # dequantise before the clock
        wiki = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8")
        with embedded_server(data_dir, Path(tmp), SLIMFORGE_EVAL_DATA_DIR=str(DATA)) as client:
            upload = {"file": ("wikitext2-first-half.txt", wiki[: len(wiki) // 2].encode(), "text/plain")}
            dataset = client.post("/v1/datasets", files=upload).raise_for_status().json()
            base = {
                "model": "builtin:smollm2-135m",
                "method": "gradmap",
                "sparsity_basis": "layers",
                "calibration": {"source": "dataset", "dataset_id": dataset["id"], "n_samples": 8, "seq_len": 128},
            }
            target = {
                "max_perplexity_ratio": args.max_ratio,
                "perplexity_set": args.text,
                "eval_tokens": args.eval_tokens,
            }
            searched = run_job(client, {**base, "target": target})
            if searched["status"] != "succeeded":
                raise SystemExit(f"search failed: {searched['error']}")
            k = int(searched["quality_target"]["chosen_size"])
            single = run_job(client, {**base, "target_sparsity": k / LAYERS})
            again = run_job(client, {**base, "target": target}) if args.repeat_search else None

    def ratio(job: dict | None) -> float | None:
        return None if job is None else round(job["submit_to_end_seconds"] / single["submit_to_end_seconds"], 3)

    result = {
        "target": target,
        "chosen_k": k,
        "same_layers": searched["removed_layers"] == single["removed_layers"],
        "search": searched,
        "single": single,
        "search_again": again,
        "ratio_search_to_single": ratio(searched),
        "ratio_repeat_search_to_single": ratio(again),
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
