"""Committed teacher weights: a finished teacher's trainable weights (fp16, weights only) travel with its committed
results, and a runner on an empty work directory restores the teacher from them instead of retraining it; a file
whose hash or settings differ is refused with one line and its fix.

The teacher is real (LiteMedSAM, LoRA, trained 1 epoch on the phantom by nnUNetv2_train); tskd_benchmark runs
through its engine with the fakes of tests/bench_fakes (the teacher's 'training' copies that real model folder;
the student's training, prediction and measurement are faked).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import BIN, PHANTOM_ID, run_cmd, train_env
from test_benchmark_committed import FakeBench
from test_teacher_train import _no_teacher_vars
from tskd_nnunet.benchmark.committed import CommittedStore
from tskd_nnunet.benchmark.committed_model import (MAX_MODEL_BYTES, CommittedModelError, pack_model,
                                                   restore_model)
from tskd_nnunet.benchmark.config import load_config
from tskd_nnunet.benchmark.runner import committed_root
from tskd_nnunet.distill.teacher_io import build_teacher_network, locate_teacher, read_checkpoint

TEACHER = "LiteMedSAMTeacherTrainer_test"
DATASET = "Dataset990_Phantom"
CONFIG = {
    "name": "phantom_model", "dataset": {"id": PHANTOM_ID, "convert": None}, "configuration": "2d",
    "budgets": [4], "folds": [0], "num_folds": 3, "batch_size": 2, "methods": ["teacher", "tskd"],
    "method_defs": {"teacher": {"trainer": TEACHER}, "tskd": {"trainer": "DistillTrainer",
                                                             "env": {"TSKD_TEACHER_TRAINER": TEACHER}}},
    "profiles": {"cpu": {"schedule": "1,2,1", "params": {"latency_cases": 1, "preprocess_processes": 1}}},
    "committed": "{config_dir}/committed/{name}_{profile}",
}


@pytest.fixture(scope="module")
def real_teacher(nnunet_env, tmp_path_factory) -> str:
    """The model folder of a real 1-epoch LiteMedSAM LoRA teacher on the phantom."""
    results = str(tmp_path_factory.mktemp("teacher") / "nnUNet_results")
    os.makedirs(results)
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", TEACHER, "-device", "cpu"],
            train_env(_no_teacher_vars(nnunet_env), results))
    return os.path.join(results, DATASET, f"{TEACHER}__nnUNetPlans__2d")


def _outputs(model_dir: str) -> torch.Tensor:
    loc = locate_teacher(os.path.dirname(os.path.dirname(model_dir)), DATASET, TEACHER, "nnUNetPlans", "2d", 0)
    net = build_teacher_network(loc, read_checkpoint(loc.checkpoint)).eval()
    with torch.no_grad():
        out = net(torch.linspace(-2, 2, 64 * 64).reshape(1, 1, 64, 64))
    return torch.softmax(out[0] if isinstance(out, (list, tuple)) else out, 1)


@pytest.fixture(scope="module")
def bench(nnunet_env, real_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("model_bench")
    (root / "phantom.json").write_text(json.dumps(CONFIG))
    fakes = FakeBench(nnunet_env, root, teacher_dir=real_teacher)
    first = fakes(root / "phantom.json", "--workdir", root / "work1")
    shutil.rmtree(root / "work1")
    cfg = load_config(str(root / "phantom.json"))
    return {"root": root, "cfg": cfg, "store": committed_root(cfg, "cpu", None, False), "first": first,
            "fakes": fakes}


def _student_again(bench, workdir):
    """Drop the committed student and run it again on an empty work directory: its teacher must come from the
    committed weights. Returns (counts, console output, what was 'trained')."""
    store = CommittedStore(bench["store"])
    shutil.rmtree(store.run_dir("tskd", 4, 0), ignore_errors=True)
    fakes = bench["fakes"]
    n0 = len(fakes.log("trained"))
    proc = fakes(bench["root"] / "phantom.json", "--workdir", workdir, "--only", "tskd")
    return proc.counts, proc.stdout + proc.stderr, fakes.log("trained")[n0:]


def test_teacher_weights_are_committed_small_and_weights_only(bench):
    assert bench["first"].counts == {"done": 2, "failed": 0}, bench["first"].stdout[-3000:] + bench["first"].stderr
    store = CommittedStore(bench["store"])
    rec = store.settings("teacher", 4, 0)["model"]
    assert rec["committed"] is True and rec["dtype"] == "float16" and 0 < rec["bytes"] <= MAX_MODEL_BYTES
    path = os.path.join(store.run_dir("teacher", 4, 0), rec["file"])
    assert os.path.getsize(path) == rec["bytes"] and len(rec["sha256"]) == 64
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert "optimizer_state" not in ckpt and ckpt["trainer_name"] == TEACHER
    assert all(v.dtype == torch.float16 for v in ckpt["network_weights"].values() if v.is_floating_point())
    # the frozen LiteMedSAM base is not in it (it is re-read from the package)
    assert not [k for k in ckpt["network_weights"] if k.startswith("backbone.") and "lora_" not in k]
    for f in ("plans.json", "dataset.json"):
        assert os.path.isfile(os.path.join(store.run_dir("teacher", 4, 0), "model", f))
    assert "model" not in store.settings("tskd", 4, 0)  # only models another arm needs travel


def test_engine_restores_the_committed_teacher_on_an_empty_workdir(bench, real_teacher, tmp_path):
    counts, out, trained = _student_again(bench, tmp_path / "w")
    assert counts == {"done": 2, "failed": 0}, out[-3000:]
    assert trained == [["tskd", "b4", "DistillTrainer"]]  # only the student trained
    assert "model restored for tskd from the committed weights" in out and "not retrained" in out
    restored = tmp_path / "w" / "runs" / "b4" / "teacher" / "nnUNet_results" / DATASET / f"{TEACHER}__nnUNetPlans__2d"
    plans = json.load(open(restored / "plans.json"))
    from tskd_nnunet.models.litemedsam import packaged_checkpoint
    assert plans["tskd_teacher"]["checkpoint"] == packaged_checkpoint()[0]
    # the restored teacher predicts what the trained one does (fp16 weights: probabilities within 1e-2)
    assert (_outputs(str(restored)) - _outputs(real_teacher)).abs().max() < 1e-2
    store = CommittedStore(bench["store"])
    assert store.settings("tskd", 4, 0)["teacher"]["restored_from_committed_model"] == \
        store.settings("teacher", 4, 0)["model"]["sha256"]


def test_changed_committed_weights_are_refused_with_the_fix(bench, tmp_path):
    store = CommittedStore(bench["store"])
    path = os.path.join(store.run_dir("teacher", 4, 0), store.settings("teacher", 4, 0)["model"]["file"])
    saved = open(path, "rb").read()
    try:
        with open(path, "ab") as f:
            f.write(b"\0")
        counts, out, trained = _student_again(bench, tmp_path / "w")
    finally:
        with open(path, "wb") as f:
            f.write(saved)
    assert counts == {"done": 1, "failed": 1} and trained == []  # the teacher is done (committed)
    assert "the file was changed. Fix: restore it with git" in out
    failed = os.path.join(bench["store"], "failed")  # the student failed, not its committed teacher
    assert os.listdir(failed) == ["tskd_b4_f0.json"]
    assert "the file was changed" in json.load(open(os.path.join(failed, "tskd_b4_f0.json")))["error"]


def test_committed_teacher_of_other_labels_is_refused_with_the_fix(bench, tmp_path):
    store = CommittedStore(bench["store"])
    sfile = os.path.join(store.run_dir("teacher", 4, 0), "settings.json")
    saved = open(sfile).read()
    try:
        s = json.loads(saved)
        s["labeled_cases"] = s["labeled_cases"][:-1] + ["someone_else"]
        open(sfile, "w").write(json.dumps(s))
        counts, out, trained = _student_again(bench, tmp_path / "w")
    finally:
        open(sfile, "w").write(saved)
    assert counts == {"done": 1, "failed": 1} and trained == []  # the teacher is done (committed)
    assert "was trained on other labeled cases than this work directory's. Fix: delete" in out


def test_restore_refuses_another_litemedsam_base(real_teacher, tmp_path):
    run = tmp_path / "run"
    rec = pack_model(real_teacher, 0, str(run))
    plans_file = run / "model" / "plans.json"
    plans = json.load(open(plans_file))
    plans["tskd_teacher"]["checkpoint_sha256"] = "0" * 64
    json.dump(plans, open(plans_file, "w"))
    with pytest.raises(CommittedModelError, match="adapts LiteMedSAM with sha256 000000000000.*Fix: pip install"):
        restore_model(str(run), {"model": rec}, str(tmp_path / "out" / "m"), 0)
    assert not os.path.exists(tmp_path / "out" / "m")  # nothing half-written


def test_a_model_over_the_limit_is_not_committed(real_teacher, tmp_path):
    rec = pack_model(real_teacher, 0, str(tmp_path), max_bytes=1000)
    assert rec["committed"] is False and "MB >" in rec["why"] and not os.path.exists(tmp_path / "model")


def test_an_unfinished_teacher_is_parked_and_continued_on_a_new_machine(nnunet_env, real_teacher, tmp_path):
    # tskd is planned (so the teacher's model is committed with its results) but only the teacher runs; its first
    # 'training' is killed after an epoch (checkpoint_latest only), later ones finish
    (tmp_path / "p.json").write_text(json.dumps(CONFIG))
    fakes = FakeBench(nnunet_env, tmp_path, teacher_dir=real_teacher, interrupt_teacher=True)
    store = str(tmp_path / "committed")
    args = [tmp_path / "p.json", "--committed", store, "--only", "teacher"]
    first = fakes(*args, "--workdir", tmp_path / "w1")
    assert first.counts == {"done": 0, "failed": 1}, first.stdout[-3000:] + first.stderr[-3000:]
    parking = fakes(*args, "--workdir", tmp_path / "w1", "--park")
    assert "parked 1 unfinished run(s)" in parking.stdout, parking.stdout + parking.stderr
    parked = os.path.join(store, "partial", "teacher_b4_f0")
    rec = json.load(open(os.path.join(parked, "partial.json")))
    assert rec["trainer"] == TEACHER and rec["schedule"] == "1,2,1" and len(rec["sha256"]) == 64
    shutil.rmtree(tmp_path / "w1")  # a new machine: only the committed folder is left
    second = fakes(*args, "--workdir", tmp_path / "w2")
    assert second.counts == {"done": 1, "failed": 0}, second.stdout[-3000:] + second.stderr[-3000:]
    commands = [c for c in fakes.log("cmd")]
    assert "continuing the parked run from epoch" in second.stdout
    assert "--c" not in commands[0] and commands[1][-1] == "--c"
    assert not os.path.exists(parked)  # finished and committed: the parked checkpoint is gone
    assert CommittedStore(store).settings("teacher", 4, 0)["model"]["committed"] is True
