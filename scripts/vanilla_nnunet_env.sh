#!/usr/bin/env bash
# Builds .venv-vanilla/: a virtualenv with ONLY nnunetv2 and torch, at the versions constraints.txt pins
# (plus what those two need), and no tskd-nnunet. It plays the recipient of a student model zip: the slow
# test of tests/test_export_nnunet_zip.py installs a zip there with nnUNetv2_install_pretrained_model_from_zip
# and predicts with nnUNetv2_predict (documentation/export.md, "Sharing the student as an nnU-Net model zip").
#
# Cached: rebuilt only when constraints.txt changes (stamp file keyed by its hash), so CI builds it once
# (~5.5 GB, a few minutes). Prints the venv's python on the last line.
# TSKD_VANILLA_VENV=/path puts it elsewhere; PYTHON picks the interpreter (as scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TSKD_VANILLA_VENV:-.venv-vanilla}
key=$(sha256sum constraints.txt | cut -c1-16)
stamp="$VENV/.vanilla-$key"

exec 9>"$VENV.lock"  # two builds at once (parallel CI jobs) would install into one folder
flock 9
if [ ! -f "$stamp" ]; then
  torch_pin=$(grep -E '^torch==' constraints.txt)
  nnunet_pin=$(grep -E '^nnunetv2==' constraints.txt)
  echo "[vanilla] building $VENV: $torch_pin $nnunet_pin only (a few minutes, once per constraints.txt)" >&2
  rm -rf "$VENV"  # stale pins or a build that was killed half-way (the stamp is written last)
  "$PY" -m venv "$VENV"
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt "$torch_pin" "$nnunet_pin" \
       > "$VENV.build.log" 2>&1; then
    tail -n 40 "$VENV.build.log" >&2
    echo "[vanilla] error: pip failed (log: $VENV.build.log)" >&2
    exit 1
  fi
  # isolated (-I: no PYTHONPATH, no user site) and from / (python -c puts the working directory, this checkout,
  # first on sys.path)
  if (cd / && "$VENV/bin/python" -I -c "import tskd_nnunet" 2>/dev/null); then
    echo "[vanilla] error: tskd_nnunet is importable in $VENV; it must hold plain nnU-Net only" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "$(pwd)/$VENV/bin/python"
