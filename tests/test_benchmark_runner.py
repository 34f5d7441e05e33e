"""tskd_benchmark on the phantom through its engine (Snakemake, one job per step): a complete report, resume after
a real kill, a failed method shown as FAILED.

One real nnUNetv2_train (schedule 1,2,1) serves every assertion: tskd_benchmark is killed (SIGKILL to its process
group: Snakemake and its job) while it predicts with the freshly trained baseline; Snakemake's lock survives the
kill, so the next call says how to remove it (``--unlock``, passed through); then it runs again (must finish
without retraining) and a third time (must skip the finished run and retry only the failed one).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import PHANTOM_ID, REPO

CONFIG = {
    "name": "phantom_tiny", "dataset": {"id": PHANTOM_ID, "convert": None}, "configuration": "2d",
    "budgets": [4], "folds": [0], "num_folds": 3, "methods": ["nnUNetTrainer", "broken"],
    # a method whose training cannot start: nnU-Net does not know this trainer
    "method_defs": {"broken": {"trainer": "NoSuchTrainer_xyz", "data": "labeled"}},
    "profiles": {"cpu": {"schedule": "1,2,1", "params": {"latency_cases": 1}}},
}


def _bench(args):
    return [sys.executable, "-m", "tskd_nnunet.benchmark.cli", *args]


def _state(workdir, method):
    with open(os.path.join(workdir, "runs", "b4", method, "fold_0", "state.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bench(nnunet_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(CONFIG))
    workdir = str(root / "work")
    env = dict(nnunet_env)
    env.pop("nnUNet_results", None)  # the benchmark keeps its own results roots
    args = [str(cfg), "--workdir", workdir, "--profile", "cpu"]
    logs = {}

    def run(*extra, timeout=1500):
        return subprocess.run(_bench(args + list(extra)), env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    # 1) start, and SIGKILL the whole process group once the baseline's prediction has begun
    out1 = open(root / "run1.log", "w")
    proc = subprocess.Popen(_bench(args), env=env, cwd=REPO, stdout=out1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    predict_log = os.path.join(workdir, "runs", "b4", "nnUNetTrainer", "fold_0", "logs", "predict.log")
    deadline = time.time() + 1500
    while not os.path.exists(predict_log) and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert proc.poll() is None, f"tskd_benchmark ended before predicting: {(root / 'run1.log').read_text()[-3000:]}"
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out1.close()
    logs["killed_state"] = _state(workdir, "nnUNetTrainer")
    ckpt = os.path.join(workdir, "runs", "b4", "nnUNetTrainer", "nnUNet_results", "Dataset990_Phantom",
                        "TSKDPlainTrainer__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth")
    logs["ckpt_mtime"] = os.path.getmtime(ckpt)

    # 2) the lock left by the kill, removed by Snakemake; then resume
    logs["locked"] = run(timeout=600)
    logs["unlock"] = run("--unlock", timeout=600)
    logs["run2"] = run()
    logs["state_after_2"] = _state(workdir, "nnUNetTrainer")
    logs["broken_after_2"] = _state(workdir, "broken")
    logs["state_mtime_2"] = os.path.getmtime(os.path.join(workdir, "runs", "b4", "nnUNetTrainer", "fold_0",
                                                          "state.json"))
    # 3) again: the finished run is skipped, the failed one retried
    logs["run3"] = run(timeout=900)
    return {"workdir": workdir, "ckpt": ckpt, "cfg": str(cfg), "env": env, **logs}


def test_kill_then_rerun_resumes_without_retraining(bench):
    assert bench["killed_state"]["status"] == "running"
    locked = bench["locked"]
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr, locked.stderr[-3000:]
    # the killed run is counted as not run, not as failed (the broken method may have failed before the kill, or
    # never started: timing)
    m = re.search(r"0 runs done, (\d+) failed, (\d+) not run\.", locked.stdout)
    assert m and int(m.group(2)) >= 1 and int(m.group(1)) + int(m.group(2)) == 2, locked.stdout[-3000:]
    assert bench["unlock"].returncode == 0, bench["unlock"].stderr[-3000:]
    r2 = bench["run2"]
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 1, out2[-6000:]  # 1: a run failed (the broken method)
    assert "1 runs done, 1 failed, 0 not run." in r2.stdout
    st = bench["state_after_2"]
    assert st["status"] == "done" and st["attempts"] == 1  # trained once, in the killed call
    # the checkpoint of the killed run was reused: no second nnUNetv2_train, only the prediction again
    assert os.path.getmtime(bench["ckpt"]) == bench["ckpt_mtime"]
    train_log = os.path.join(bench["workdir"], "runs", "b4", "nnUNetTrainer", "fold_0", "logs", "train.log")
    assert open(train_log).read().count("$ ") == 1
    assert "nnUNetv2_train" not in "".join(ln for ln in out2.splitlines(True) if "NoSuchTrainer" not in ln)
    assert re.search(r"predict budget=4 method=nnUNetTrainer fold=0|wildcards: .*method=nnUNetTrainer", out2)

    r3 = bench["run3"]
    out3 = r3.stdout + r3.stderr
    assert "method=nnUNetTrainer" not in out3, out3[-4000:]  # nothing of the finished run runs again
    assert os.path.getmtime(os.path.join(bench["workdir"], "runs", "b4", "nnUNetTrainer", "fold_0",
                                         "state.json")) == bench["state_mtime_2"]
    assert _state(bench["workdir"], "nnUNetTrainer")["attempts"] == 1
    # failed runs are retried
    assert _state(bench["workdir"], "broken")["attempts"] == bench["broken_after_2"]["attempts"] + 1


def test_report_is_complete_and_failed_method_shows_failed(bench):
    report = os.path.join(bench["workdir"], "report")
    for name in ("report.md", "summary.csv", "runs.csv", "case_values.csv", "label_efficiency_dice.png",
                 "boxplot_dice.png", "overlays_Dataset990_Phantom.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0, name
    md = open(os.path.join(report, "report.md")).read()
    assert "nnUNetTrainer (baseline)" in md and "| broken | FAILED |" in md
    assert "NoSuchTrainer_xyz" in md
    summary = pd.read_csv(os.path.join(report, "summary.csv"))
    base = summary[summary["method"] == "nnUNetTrainer"].iloc[0]
    broken = summary[summary["method"] == "broken"].iloc[0]
    assert base["status"] == "done" and base["n_cases"] == 3 and 0.0 <= base["dice_mean"] <= 1.0
    assert base["params"] > 1e5 and base["latency_ms"] > 0
    assert broken["status"] == "FAILED" and pd.isna(broken["dice_mean"])  # not zero, not missing
    runs = pd.read_csv(os.path.join(report, "runs.csv"))
    assert set(zip(runs["method"], runs["status"])) == {("nnUNetTrainer", "done"), ("broken", "failed")}
    # the budget's splits: 4 labeled cases, test cases never in them
    with open(os.path.join(bench["workdir"], "budgets", "b4", "labeled", "nnUNet_preprocessed",
                           "Dataset990_Phantom", "splits_final.json")) as f:
        splits = json.load(f)
    assert len(splits) == 3 and all(len(s["train"]) == 4 for s in splits)
    scores = pd.read_csv(os.path.join(bench["workdir"], "runs", "b4", "nnUNetTrainer", "fold_0", "scores.csv"))
    assert not set(scores["case"]) & {c for s in splits for c in s["train"] + s["val"]}


def test_dry_run_lists_the_matrix_and_runs_nothing(nnunet_env, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**CONFIG, "budgets": [2, 4], "methods": ["nnUNetTrainer", "tskd", "tskd_vit", "mae_ft"],
                               "foundation": {"kind": "mae", "arch": "vit_tiny", "steps": 5}}))
    proc = subprocess.run(_bench([str(cfg), "--workdir", str(tmp_path / "w"), "--dry-run"]),
                          env=nnunet_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # tskd pulls in the LiteMedSAM teacher (the CPU profile's trainer), tskd_vit the in-house ViT teacher and its
    # pretraining stage; 2 budgets x 6 methods
    assert "runs (12):" in out
    assert "-tr LiteMedSAMTeacherTrainer_last" in out
    assert "teacher_lora" in out and "TSKD_TEACHER_WEIGHTS=" in out and "stage foundation fold 0: pending" in out
    assert "-pretrained_weights" in out and "-tr DistillTrainer" in out
    # and Snakemake's own dry run of the jobs still to do (in a scratch folder)
    assert re.search(r"(local)?rule train:", out) and "method=tskd_vit" in out
    assert not (tmp_path / "w").exists()


def test_bad_config_is_one_line_error(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({**CONFIG, "methods": ["nnUNetTrainer", "nope"]}))
    proc = subprocess.run(_bench([str(cfg), "--dry-run"]), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tskd_benchmark: error:") and "unknown method 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
