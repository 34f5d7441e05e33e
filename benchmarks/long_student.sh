#!/bin/bash
# Diagnostic outside the benchmark matrix: train the TS-KD student longer than the profile that trained its
# teacher, on the same preprocessed budget, pool, cached teacher targets and test set as a committed run.
# Answers "is the student limited by its schedule or by its teacher?" (documentation/benchmarking.md).
# Superseded by a method with its own "schedule" in the benchmark config (documentation/benchmarking.md,
# Snakemake engine); kept until the results it made are re-made that way.
#
#   bash benchmarks/long_student.sh WORKDIR BUDGET SCHEDULE OUT [TRAINER]
#   e.g. bash benchmarks/long_student.sh benchmark_work/chaos_t2_cpu_short 20 50,50,5 long_tskd_b20
#
# WORKDIR: a runner workdir whose `teacher` and `tskd` runs at BUDGET are done (their teacher and targets are
# reused, nothing is recomputed); OUT: new folder for nnUNet_results, predictions and scores.csv (tskd_evaluate).
# TRAINER: DistillTrainer (default) or TSKDPlainTrainer (the same schedule without a teacher, the paired baseline).
# Writes OUT/results.csv in tskd_report's long format (method = TRAINER@SCHEDULE); a second call with the same OUT
# only rewrites it. Two of them, concatenated, make one report:
#   python -c "import pandas as pd, sys; pd.concat(map(pd.read_csv, sys.argv[2:])).to_csv(sys.argv[1], index=False)" \
#     all.csv long_tskd_b20/results.csv long_plain_b20/results.csv
#   tskd_report -results all.csv -o REPORT_DIR --baseline TSKDPlainTrainer@50,50,5
set -euo pipefail
[ $# -ge 4 ] || { sed -n 8,19p "$0"; exit 2; }
W=$(realpath "$1"); B=$2; SCHEDULE=$3; OUT=$(realpath -m "$4"); TRAINER=${5:-DistillTrainer}
DATA=$(basename "$(ls -d "$W"/nnUNet_raw/Dataset*/ | head -1)")
ID=$(echo "$DATA" | sed -E 's/^Dataset0*([0-9]+)_.*/\1/')
TEACHER_DIR=$(ls -d "$W"/runs/b$B/teacher/nnUNet_results/"$DATA"/*__nnUNetPlans__2d_128 2>/dev/null | head -1)
[ -n "$TEACHER_DIR" ] || { echo "no finished teacher run at budget $B in $W/runs/b$B/teacher: run the benchmark's teacher first" >&2; exit 1; }
TEACHER=$(basename "$TEACHER_DIR" | sed 's/__.*//')
export nnUNet_raw=$W/nnUNet_raw nnUNet_preprocessed=$W/budgets/b$B/pool/nnUNet_preprocessed
export nnUNet_results=$OUT/nnUNet_results TSKD_SCHEDULE=$SCHEDULE TSKD_TEACHER_TRAINER=$TEACHER
mkdir -p "$nnUNet_results/$DATA"
ln -sfn "$TEACHER_DIR" "$nnUNet_results/$DATA/$(basename "$TEACHER_DIR")"
echo "$(date +%T) $TRAINER, budget $B, TSKD_SCHEDULE=$SCHEDULE, teacher $TEACHER_DIR"
if [ ! -f "$OUT/scores.csv" ]; then
  nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNetv2_train "$ID" 2d_128 0 -tr "$TRAINER" -p nnUNetPlans -device cpu
  nnUNetv2_predict -i "$nnUNet_raw/$DATA/imagesTs" -o "$OUT/predictions" -d "$ID" -c 2d_128 -p nnUNetPlans \
    -tr "$TRAINER" -f 0 -device cpu -npp 1 -nps 1 --disable_progress_bar
  tskd_evaluate "$nnUNet_raw/$DATA/labelsTs" "$OUT/predictions" -djfile "$nnUNet_raw/$DATA/dataset.json" \
    -o "$OUT/scores.csv"
fi
python -c "import pandas as pd, sys; d = pd.read_csv(sys.argv[1]); d.insert(0, 'fold', 0); d.insert(0, 'budget', $B)
d.insert(0, 'method', '$TRAINER@$SCHEDULE'); d.insert(0, 'dataset', '$DATA'); d.to_csv(sys.argv[2], index=False)" \
  "$OUT/scores.csv" "$OUT/results.csv.tmp" && mv "$OUT/results.csv.tmp" "$OUT/results.csv"
echo "$(date +%T) done: $OUT/scores.csv"
