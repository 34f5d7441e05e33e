"""Teacher study on real data: test Dice, training minutes and peak memory of teacher settings vs plain nnU-Net,
and of students distilled from one of them (cached vs online KD).

Each arm is ``nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER -device DEVICE`` under one ``TSKD_SCHEDULE``, then
``nnUNetv2_predict`` on the raw dataset's imagesTs and ``tskd_evaluate`` against labelsTs. One JSON per arm lands
in the output folder as soon as the arm finishes (a re-run skips arms whose JSON exists), and the Markdown table
and the Dice-vs-minutes plot are rebuilt from those files alone. Peak memory = the largest summed PSS (proportional set size)
of the training process tree, sampled every second. Runs one arm at a time (2-core machines: never two torch jobs).

    python benchmarks/bench_teacher_study.py -d 501 -c 2d_128 -f 0 --schedule 20,15,4 \
        -o documentation/benchmarks/teacher_hc18 --arms plain lms_frozen lms_last
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Dict, List

import psutil

if TYPE_CHECKING:
    import pandas as pd

ARMS: Dict[str, Dict] = {
    "plain": {"trainer": "TSKDPlainTrainer", "what": "plain nnU-Net (same plans, schedule, batch)"},
    "lms_sam_lora": {"trainer": "LiteMedSAMTeacherTrainer", "what": "LiteMedSAM, SAM head, LoRA on all stages"},
    "lms_sam_last": {"trainer": "LiteMedSAMTeacherTrainer_last", "what": "LiteMedSAM, SAM head, LoRA on stages 2-3"},
    "lms_sam_frozen": {"trainer": "LiteMedSAMTeacherTrainer_frozen", "what": "LiteMedSAM, SAM head, frozen encoder"},
    "lms_unetr_frozen": {"trainer": "LiteMedSAMTeacherTrainer_unetr_frozen",
                         "what": "LiteMedSAM, pyramid (UNETR-style) head, frozen encoder"},
    "lms_unetr_last": {"trainer": "LiteMedSAMTeacherTrainer_unetr_last",
                       "what": "LiteMedSAM, pyramid head, LoRA on stages 2-3"},
    "lms_unetr_lora": {"trainer": "LiteMedSAMTeacherTrainer_unetr", "what": "LiteMedSAM, pyramid head, LoRA all stages"},
    "lms_sam_last_random": {"trainer": "LiteMedSAMTeacherTrainer_last", "env": {"TSKD_ALLOW_RANDOM_TEACHER": "1"},
                            "results_suffix": "_random",
                            "what": "as lms_sam_last, RANDOM weights (the foundation's contribution)"},
    "lms_sam_frozen_random": {"trainer": "LiteMedSAMTeacherTrainer_frozen", "env": {"TSKD_ALLOW_RANDOM_TEACHER": "1"},
                              "results_suffix": "_random", "what": "as lms_sam_frozen, RANDOM weights"},
    # students (transfer set = labeled + the unlabeled pool): cached vs online KD from the same teacher
    "kd_cached": {"trainer": "DistillTrainer", "env": {"TSKD_KD_MODE": "cached"}, "teacher_from": "--teacher",
                  "what": "TS-KD student, cached teacher targets"},
    "kd_twostage": {"trainer": "DistillTrainer_twostage", "env": {"TSKD_KD_MODE": "cached"}, "teacher_from": "--teacher",
                    "what": "TS-KD student, two-stage (KD on all, then fine-tune on labeled), cached targets"},
    # the same students from the foundation teacher, into their own results root (the names above are taken)
    "kd_cached_lms": {"trainer": "DistillTrainer", "env": {"TSKD_KD_MODE": "cached"}, "teacher_from": "--teacher",
                      "results_suffix": "_kdlms", "what": "TS-KD student, cached teacher targets"},
    "kd_twostage_lms": {"trainer": "DistillTrainer_twostage", "env": {"TSKD_KD_MODE": "cached"},
                        "teacher_from": "--teacher", "results_suffix": "_kdlms",
                        "what": "TS-KD student, two-stage, cached targets"},
    "kd_online": {"trainer": "DistillTrainer", "env": {"TSKD_KD_MODE": "online"}, "teacher_from": "--teacher",
                  "results_suffix": "_online", "what": "TS-KD student, online teacher"},
}


def link_teachers(src_results: str, dst_results: str, teachers: List[str]) -> None:
    """Make the teachers' model folders (only those) of ``src_results`` visible in ``dst_results``, for a
    student trained into another results root. Linking anything else would let a student find a finished
    run of its own trainer name there and resume it."""
    for ds in os.listdir(src_results):
        for model in os.listdir(os.path.join(src_results, ds)):
            if model.split("__")[0] not in teachers:
                continue
            dst = os.path.join(dst_results, ds, model)
            if not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.symlink(os.path.join(src_results, ds, model), dst)


def run_measured(cmd: List[str], env: Dict[str, str], log: str) -> Dict[str, float]:
    """Run ``cmd``; wall minutes and peak summed RSS (GB) of its process tree."""
    t0, peak = time.time(), 0
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:  # proportional set size: pages shared by forked workers are counted once
                procs = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(1.0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return {"minutes": (time.time() - t0) / 60, "peak_gb": peak / 1e9}


def dice_column(df: pd.DataFrame) -> str:
    return next(c for c in df.columns if c.lower().startswith("dice"))


def case_dice(df: pd.DataFrame) -> pd.Series:
    """Dice per test case (mean over the classes) of a per-case table written by tskd_evaluate."""
    col = dice_column(df)
    return df.groupby("case")[col].mean() if "case" in df.columns else df[col]


def mean_dice(csv: str) -> Dict[str, float]:
    import pandas as pd
    df = pd.read_csv(csv)
    by_class = df.groupby("class")[dice_column(df)].mean().to_dict() if "class" in df.columns else {}
    per_case = case_dice(df)
    return {"dice": float(per_case.mean()), "dice_median": float(per_case.median()),
            "dice_per_class": {str(k): float(v) for k, v in by_class.items()}, "n_cases": int(len(per_case))}


def run_arm(name: str, a: argparse.Namespace, out_dir: str) -> dict:
    spec = ARMS[name]
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, TSKD_SCHEDULE=a.schedule, nnUNet_n_proc_DA="0")
    env.update(spec.get("env", {}))
    if spec.get("teacher_from"):
        if not a.teacher:
            raise SystemExit(f"arm {name} distils a teacher: pass --teacher TRAINER (a trained arm's trainer)")
        env["TSKD_TEACHER_TRAINER"] = a.teacher
    if spec.get("results_suffix"):  # another nnUNet_results, so the same trainer name can be trained twice
        env["nnUNet_results"] = os.environ["nnUNet_results"] + spec["results_suffix"]
        os.makedirs(env["nnUNet_results"], exist_ok=True)
        if spec.get("teacher_from"):
            link_teachers(os.environ["nnUNet_results"], env["nnUNet_results"], a.teacher.split(","))
    log = os.path.join(a.work, f"{name}.log")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    ds = maybe_convert_to_dataset_name(str(a.dataset))
    fold_dir = os.path.join(env["nnUNet_results"], ds, f"{spec['trainer']}__nnUNetPlans__{a.configuration}",
                            f"fold_{a.fold}")
    # an interrupted arm continues from its last epoch (our trainers save checkpoint_latest every epoch);
    # its minutes then count only this invocation, which the JSON says
    resumed = any(os.path.isfile(os.path.join(fold_dir, c)) for c in ("checkpoint_latest.pth", "checkpoint_final.pth"))
    train = run_measured([os.path.join(bin_dir, "nnUNetv2_train"), str(a.dataset), a.configuration, str(a.fold),
                          "-tr", spec["trainer"], "-device", a.device] + (["--c"] if resumed else []), env, log)
    raw = os.path.join(os.environ["nnUNet_raw"], ds)
    pred = os.path.join(a.work, f"pred_{name}")
    env_pred = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    predict = run_measured([os.path.join(bin_dir, "nnUNetv2_predict"), "-i", os.path.join(raw, "imagesTs"), "-o", pred,
                            "-d", str(a.dataset), "-c", a.configuration, "-f", str(a.fold), "-tr", spec["trainer"],
                            "-device", a.device, "--disable_tta", "-npp", "1", "-nps", "1"], env_pred, log)
    csv = os.path.join(out_dir, f"{name}_cases.csv")
    subprocess.run([sys.executable, "-m", "tskd_nnunet.evaluation.cli", os.path.join(raw, "labelsTs"),
                    pred, "-djfile", os.path.join(raw, "dataset.json"), "-o", csv], env=env_pred, check=True,
                   stdout=subprocess.DEVNULL)
    result = dict(arm=name, trainer=spec["trainer"], what=spec["what"] + (f" ({a.teacher})" if spec.get("teacher_from")
                                                                          else ""), schedule=a.schedule, fold=a.fold,
                  configuration=a.configuration, dataset=ds, device=a.device, train_minutes=train["minutes"],
                  train_peak_gb=train["peak_gb"], predict_minutes=predict["minutes"], resumed=resumed,
                  omp_threads=os.environ.get("OMP_NUM_THREADS", "default"),
                  commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
                  **mean_dice(csv))
    return result


def paired(out_dir: str, arm_a: str, arm_b: str) -> Dict[str, float]:
    """Paired comparison of two finished arms over their common test cases: mean Dice difference with a 95%
    bootstrap CI, two-sided Wilcoxon signed-rank p and rank-biserial r."""
    import pandas as pd
    from tskd_nnunet.evaluation.stats import bootstrap_ci, paired_wilcoxon
    a, b = (case_dice(pd.read_csv(os.path.join(out_dir, f"{arm}_cases.csv"))) for arm in (arm_a, arm_b))
    cases = sorted(set(a.index) & set(b.index))
    x, y = a[cases].to_numpy(float), b[cases].to_numpy(float)
    lo, hi = bootstrap_ci(x - y)
    w = paired_wilcoxon(x, y)
    return dict(diff=float((x - y).mean()), lo=lo, hi=hi, p=w.p_value, r=w.rank_biserial, n=len(cases),
                mean_a=float(x.mean()), mean_b=float(y.mean()))


def compare(out_dir: str, arm_a: str, arm_b: str) -> str:
    c = paired(out_dir, arm_a, arm_b)
    return (f"{arm_a} - {arm_b}: {c['diff']:+.3f} Dice [{c['lo']:+.3f}, {c['hi']:+.3f}] over {c['n']} cases "
            f"({c['mean_a']:.3f} vs {c['mean_b']:.3f}); Wilcoxon p = {c['p']:.2g}, r = {c['r']:.2f}")


def per_class_lines(out_dir: str, arms: List[str]) -> List[str]:
    """Per class: Dice over the test cases that show the class, and how often a class absent from the reference
    is predicted anyway (an empty-vs-empty case scores Dice 1, which hides both in the mean)."""
    import pandas as pd
    frames = {arm: pd.read_csv(os.path.join(out_dir, f"{arm}_cases.csv")) for arm in arms}
    classes = list(dict.fromkeys(c for df in frames.values() for c in df["class"].astype(str)))
    if all((df["ref_voxels"] > 0).all() for df in frames.values()) and len(classes) == 1:
        return []
    lines = ["", "Per class: Dice on the test cases whose reference shows the class (n) / false-positive rate on "
             "those that do not (predicted although absent).", "",
             "| arm | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for arm in arms:
        df, cells = frames[arm], []
        for c in classes:
            d = df[df["class"].astype(str) == c]
            shown, absent = d[d["ref_voxels"] > 0], d[d["ref_voxels"] == 0]
            fp = f"{(absent['pred_voxels'] > 0).mean():.2f}" if len(absent) else "-"
            cells.append(f"{shown['dice'].mean():.3f} (n={len(shown)}) / {fp}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def write_report(out_dir: str) -> None:
    """Rebuild report.md and dice_vs_minutes.png from the arms' JSONs and per-case CSVs alone."""
    rows = []
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".json"):
            with open(os.path.join(out_dir, f)) as fh:
                rows.append(json.load(fh))
    if not rows:
        return
    from tskd_nnunet.atomic_io import atomic_path, atomic_write_text
    rows.sort(key=lambda r: -r["dice"])
    has_plain = any(r["arm"] == "plain" for r in rows)
    lines = [f"# Teacher study: {rows[0]['dataset']}, configuration {rows[0]['configuration']}, fold {rows[0]['fold']}",
             "", f"Schedule (epochs, train iterations, val iterations): {rows[0]['schedule']}; test = imagesTs "
             f"({rows[0]['n_cases']} cases), no test-time mirroring; device {rows[0]['device']}. "
             "Vs plain: paired difference of the case Dice (mean over classes) with its 95% bootstrap CI, "
             "Wilcoxon p, rank-biserial r.", "",
             "| arm | trainer | what | test Dice (mean) | median | vs plain | train min | threads | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = " (RSS)" if r.get("peak_note") else ""
        vs = "-"
        if has_plain and r["arm"] != "plain":
            c = paired(out_dir, r["arm"], "plain")
            vs = f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}], p={c['p']:.1g}, r={c['r']:.2f}"
        lines.append(f"| {r['arm']} | {r['trainer']} | {r['what']} | {r['dice']:.3f} | {r['dice_median']:.3f} | {vs} | "
                     f"{r['train_minutes']:.1f} | {r.get('omp_threads', 2)} | {r['train_peak_gb']:.2f}{note} |")
    lines += per_class_lines(out_dir, [r["arm"] for r in rows])
    lines += ["", "Train minutes are wall-clock on a 2-core machine shared with other jobs (threads = the run's "
              "OMP_NUM_THREADS): comparable within a row's setting, not between arms; "
              "`benchmarks/bench_litemedsam_cpu.py` compares step costs in one run."]
    if any(r.get("peak_note") for r in rows):
        lines += ["", "(RSS): " + next(r["peak_note"] for r in rows if r.get("peak_note"))]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["train_minutes"], r["dice"], s=40)
        ax.annotate(r["arm"], (r["train_minutes"], r["dice"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training minutes (2 CPU cores, shared)")
    ax.set_ylabel("test Dice (mean over cases)")
    ax.set_title(f"{rows[0]['dataset']}: teacher settings vs plain nnU-Net")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(os.path.join(out_dir, "dice_vs_minutes.png")) as tmp:
        fig.savefig(tmp, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", dest="dataset", help="dataset id or name (required unless --compare/--report)")
    p.add_argument("-c", dest="configuration", default="2d")
    p.add_argument("-f", dest="fold", type=int, default=0)
    p.add_argument("-device", dest="device", default="cpu")
    p.add_argument("--schedule", default=None,
                   help="TSKD_SCHEDULE for every arm, e.g. 20,15,4 (required unless --compare)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--teacher", default=None, help="teacher trainer of the student arms (kd_cached, kd_online)")
    p.add_argument("-o", dest="out", required=True, help="result folder (one JSON per arm, report.md, PNG)")
    p.add_argument("--work", default=None, help="logs and predictions (default: OUT/../work_<name>)")
    p.add_argument("--compare", nargs=2, metavar=("ARM_A", "ARM_B"),
                   help="only print the paired comparison of two finished arms (from OUT's per-case CSVs)")
    p.add_argument("--report", action="store_true", help="only rebuild OUT's report.md and plot from its files")
    a = p.parse_args()
    if a.compare:
        print(compare(a.out, *a.compare))
        return
    if a.report:
        write_report(a.out)
        return
    if not a.schedule or not a.dataset:
        p.error("-d and --schedule are required to train arms (e.g. -d 501 --schedule 20,15,4)")
    a.work = a.work or os.path.join(os.environ.get("nnUNet_results", "."), "..", "teacher_study_work")
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    for name in a.arms:
        target = os.path.join(a.out, f"{name}.json")
        if os.path.isfile(target):
            print(f"[{name}] done before: {target}")
            continue
        print(f"[{name}] training {ARMS[name]['trainer']} ...", flush=True)
        result = run_arm(name, a, a.out)
        from tskd_nnunet.atomic_io import atomic_write_text
        atomic_write_text(target, json.dumps(result, indent=1))
        print(f"[{name}] Dice {result['dice']:.3f} in {result['train_minutes']:.1f} min", flush=True)
        write_report(a.out)
    write_report(a.out)


if __name__ == "__main__":
    main()
