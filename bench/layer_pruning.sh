#!/usr/bin/env bash
# Reproduces docs/benchmarks/layer-pruning.md: every layer pruner on SmolLM2-135M and Gemma-3-270M,
# then the tables and plots. Each `run` resumes (entries already in the JSON are skipped), so the
# script can be re-run after an interruption; delete a JSON to measure that model from scratch.
# About 1.5 h of a 2-core CPU in total. Usage: bash bench/layer_pruning.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

COMMON=(--ratios 0.1 0.2 0.3 --calib-samples 8 --calib-len 128 --ppl-tokens 8192 --ptb-tokens 4096 --seq-len 256
  --zs-tasks arc_easy,piqa,winogrande,hellaswag --zs-limit 50 --zs-ratios 0.1 0.2 0.3
  --zs-methods gradmap gradmap+comp shortgpt shortgpt+comp sleb taylor_plus random
  --methods gradmap shortgpt sleb taylor_plus random)
SMOL=docs/benchmarks/layer-pruning-smollm2.json
GEMMA=docs/benchmarks/layer-pruning-gemma3.json

# SmolLM2: main table, compensation variants, and the GradMAP variants that get every ratio
# (`gradmap[residual]` is the score that was the default before kl_fisher measured better).
python bench/layer_pruning.py run --model smollm2-135m --out "$SMOL" "${COMMON[@]}" \
  --comp-variants '{"before_cut": {"compensation_placement": "before_cut"}, "after_cut": {"compensation_placement": "after_cut"},
                    "no_refit": {"compensation_refit_all": false},
                    "ridge0.3": {"compensation_ridge": 0.3}, "ridge3": {"compensation_ridge": 3.0}}' \
  --extra-selectors 'gradmap[residual]' 'gradmap[in_loop]' --extra-ratios 0.1 0.3 \
  --options '{"gradmap[residual]": {"score": "residual"}, "gradmap[in_loop]": {"compensate_in_loop": true}}'
# SmolLM2: the other score variants, at 20 % only.
python bench/layer_pruning.py run --model smollm2-135m --out "$SMOL" "${COMMON[@]}" \
  --extra-selectors 'gradmap[residual_signed]' 'gradmap[residual_fisher]' 'gradmap[fwd_bwd_influence]' \
    'gradmap[taylor]' 'gradmap[residual,one_shot]' 'gradmap[residual,in_loop]' \
  --options '{"gradmap[residual_signed]": {"score": "residual_signed"},
              "gradmap[residual_fisher]": {"score": "residual_fisher"},
              "gradmap[fwd_bwd_influence]": {"score": "fwd_bwd_influence"}, "gradmap[taylor]": {"score": "taylor"},
              "gradmap[residual,one_shot]": {"score": "residual", "iterative": false},
              "gradmap[residual,in_loop]": {"score": "residual", "compensate_in_loop": true}}'
# SmolLM2 with 4x the calibration (32x128), GradMAP and ShortGPT only (SLEB would take ~45 min).
python bench/layer_pruning.py run --model smollm2-135m --out docs/benchmarks/layer-pruning-smollm2-calib32.json \
  --ratios 0.2 0.3 --calib-samples 32 --calib-len 128 --ppl-tokens 8192 --ptb-tokens 4096 --seq-len 256 --zs-limit 0 \
  --methods gradmap shortgpt --extra-selectors 'gradmap[residual]' --extra-ratios 0.3 \
  --options '{"gradmap[residual]": {"score": "residual"}}'

# Gemma-3: main table, the after_cut placement and exact (Adam) refinement through the post-norm.
python bench/layer_pruning.py run --model gemma3-270m --out "$GEMMA" "${COMMON[@]}" \
  --comp-variants '{"after_cut": {"compensation_placement": "after_cut"}, "refine": {"compensation_refine_steps": 100}}' \
  --extra-selectors 'gradmap[residual]' 'gradmap[in_loop]' --extra-ratios 0.1 0.3 \
  --options '{"gradmap[residual]": {"score": "residual"}, "gradmap[in_loop]": {"compensate_in_loop": true}}'

python bench/layer_pruning.py report "$SMOL" "$GEMMA" --plot-dir docs/benchmarks
