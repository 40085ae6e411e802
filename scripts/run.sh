#!/usr/bin/env bash
# Quick start, command 1: set everything up and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
exec "$PY" -m mpsnn "${@:-train-digits}"
