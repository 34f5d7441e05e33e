#!/bin/bash
# The equal-schedule matrix of one dataset on a GPU, in one command (issue #28): every arm of the cpu profile
# (25 x 50 = 1,250 iterations at batch 8: plain, LiteMedSAM teacher, TS-KD, self-training, ensemble teacher, plain on
# all labels) with -device cuda, through the benchmark runner's cpu_cuda profile. Results are committed to
# documentation/benchmarks/<name>_cpu_cuda (apart from the CPU runs: the identity check keeps devices apart).
#
#   bash benchmarks/gpu_campaign.sh hc18|chaos_t2 [--dry-run] [--workdir DIR] [extra tskd_benchmark options]
#
# Estimate for one H200 (documentation/benchmarking.md, "GPU campaign"): 1,250 iterations per arm; HC18 6 runs,
# CHAOS 11 runs, each a few seconds to a minute of training on the GPU; conversion, planning, the teacher's cached
# targets and prediction add a few minutes: <= 10 minutes per dataset.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,11p "$0"; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
case "$1" in
  hc18) CONFIG=$HERE/configs/hc18_cpu.json ;;
  chaos_t2) CONFIG=$HERE/configs/chaos_t2_cpu.json ;;
  *) echo "gpu_campaign.sh: unknown dataset '$1'. Fix: hc18 or chaos_t2" >&2; exit 2 ;;
esac
shift
WORKDIR=benchmark_work/$(basename "$CONFIG" .json)_cuda
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) WORKDIR=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python}
if [ -x "$HERE/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PY=$HERE/../.venv/bin/python; fi
exec "$PY" -m tskd_nnunet.benchmark.cli "$CONFIG" --profile cpu_cuda --workdir "$WORKDIR" ${ARGS[@]+"${ARGS[@]}"}
