#!/usr/bin/env bash
# The project's test suite: install, lint, then every test (PostgreSQL on 127.0.0.1:5432 and Redis on
# 127.0.0.1:6379 must be running; see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
