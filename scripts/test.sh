#!/usr/bin/env bash
# Quick start, command 2: set everything up and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
exec "$PY" -m pytest "$@"
