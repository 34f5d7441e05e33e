#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the end-to-end demo on the built-in
# phantom dataset (about 10 minutes on 2 CPU cores). Arguments go to tskd_demo (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/tskd_demo "$@"
