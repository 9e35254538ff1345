"""Self-generated calibration: tokens/s of Slimforge's sampler against plain `generate`, same run.

Both decode the same seeded prompts as one batch with the KV cache; Slimforge's adds the cancel
and progress StoppingCriteria (checked after every token) and chunking. Runs alternate, so a
noisy shared machine slows both alike. A third line times one sample after another, which is what
batching avoids.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/self_generation.py --out docs/self-generation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.calibration import self_generated_batches, start_prompts  # noqa: E402
from workers.engine.modelzoo import load_model  # noqa: E402


def plain_generate(model, tokenizer, prompts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        top_k=50,
        max_new_tokens=seq_len,
        min_new_tokens=seq_len,
        pad_token_id=tokenizer.eos_token_id,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--n-samples", type=int, default=10, help="8 calibration + 2 held-out rows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serial-samples", type=int, default=2, help="samples timed one after another")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, cache_dir=REPO / ".slimforge" / "models")
    prompts = start_prompts(tokenizer, args.n_samples, seed=0)
    tokens = args.n_samples * args.seq_len
    times: dict[str, list[float]] = {"slimforge": [], "plain_generate": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            started = time.perf_counter()
            self_generated_batches(model, tokenizer, args.n_samples, args.seq_len, seed=0)
            times["slimforge"].append(time.perf_counter() - started)
            started = time.perf_counter()
            plain_generate(model, tokenizer, prompts, args.seq_len)
            times["plain_generate"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for row in range(args.serial_samples):
            plain_generate(model, tokenizer, prompts[row : row + 1], args.seq_len)
        serial_per_sample = (time.perf_counter() - started) / args.serial_samples
    result = {
        "model": args.model,
        "samples": args.n_samples,
        "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "tokens_per_s": {k: round(tokens / statistics.median(v), 1) for k, v in times.items()},
        "one_after_another_tokens_per_s": round(args.seq_len / serial_per_sample, 1),
    }
    result["slimforge_over_plain"] = round(
        result["tokens_per_s"]["slimforge"] / result["tokens_per_s"]["plain_generate"], 3
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
