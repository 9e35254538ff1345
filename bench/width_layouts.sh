#!/usr/bin/env bash
# llm_pruner's two width layouts on one budget (SmolLM2-135M, 20 % of the parameters, element1,
# 10x128 wikitext2 calibration from the first half, perplexity on the second half; no LoRA):
# uniform (the default, a plain checkpoint) against per_layer (the paper's protocol).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/benchmarks/width-layouts.jsonl}
mkdir -p "$(dirname "$OUT")"; rm -f "$OUT"
for layout in uniform per_layer; do
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nice -n 19 .venv/bin/python bench/width_pruning.py run --out "$OUT" \
    --importance element1 --lora-for "" --tasks "" --eval-tokens 16384 \
    --options "{\"widths\": \"$layout\"}" $([ "$layout" = per_layer ] && echo --skip-dense)
done
