#!/usr/bin/env bash
# Set up a local virtual environment (.venv) with mpsnn installed in editable mode.
#
# PyTorch: if the environment has no torch yet, this installs $TORCH_SPEC
# (default torch==2.13.0, which resolves to the CPU build on a CPU-only machine and never
# pulls the multi-GB CUDA wheels). GPU users: install a CUDA build of torch>=2.4 into .venv
# first (see README "GPU set-up"), or run with MPSNN_USE_SYSTEM_PYTHON=1 to use the
# interpreter's own packages instead of a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${MPSNN_USE_SYSTEM_PYTHON:-0}" = "1" ]; then
  PY=${PYTHON:-python3}
else
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "${PYTHON:-python3}" -m venv .venv
  fi
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} (one-time)" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" >&2
fi
# reinstall when mpsnn or the test tools are missing, or (venv only) pyproject.toml changed
stale=0
if [ "$PY" = ".venv/bin/python" ] && [ pyproject.toml -nt .venv/.mpsnn-installed ]; then stale=1; fi
if [ "$stale" = 1 ] || ! "$PY" -c "import mpsnn, pytest, hypothesis" >/dev/null 2>&1; then
  echo "[setup] installing mpsnn (editable) with test extras" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]" >&2
  if [ "$PY" = ".venv/bin/python" ]; then touch .venv/.mpsnn-installed; fi
fi
echo "$PY"   # the only line on stdout: the interpreter to use
