#!/usr/bin/env bash
# Creates .venv (Python 3.11 + pip) and installs tskd-nnunet with pinned torch; idempotent.
# Used by both README commands (scripts/demo.sh and scripts/test.sh) and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.tskd-deps-$(cat constraints.txt setup.py | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 and dependencies (a few minutes, once)"
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt ".[test]"
  touch "$stamp"
fi
# Always reinstall our own package (seconds): console entry points and the start-up hook must match this tree.
.venv/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall -c constraints.txt . 
