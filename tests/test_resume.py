"""Resume loses at most one epoch, checkpoints are atomic, and --c survives a damaged checkpoint.

Issue #14, item 1: nnU-Net wrote checkpoint_latest.pth only every 50 epochs, so a short run killed midway
resumed from checkpoint_best.pth (or from scratch), and a truncated checkpoint gave a raw torch error.
"""
import glob
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import BIN, REPO, run_cmd, train_env

TRAINER = "TSKDPlainTrainer"


def fold_dir(results: str) -> str:
    found = glob.glob(os.path.join(results, "Dataset990_*", f"{TRAINER}__nnUNetPlans__2d", "fold_0"))
    assert len(found) == 1, found
    return found[0]


def train_cmd(*extra: str):
    return [os.path.join(BIN, "nnUNetv2_train"), "990", "2d", "0", "-tr", TRAINER, "-device", "cpu", *extra]


def read_logs(folder: str) -> str:
    return "".join(open(p).read() for p in sorted(glob.glob(os.path.join(folder, "training_log_*.txt"))))


def kill_after_first_epoch_and_resume(env, results: str, trainer: str, first_epoch_timeout: float = 120) -> str:
    """Start ``trainer`` (3 epochs), SIGKILL it once checkpoint_latest.pth exists, resume with --c and
    check it continues from the saved epoch, at most one epoch behind the last one started. Returns
    the resumed run's stdout."""
    cmd = [c if c != TRAINER else trainer for c in train_cmd()]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = None
    try:
        deadline = time.time() + first_epoch_timeout
        while time.time() < deadline and proc.poll() is None:
            hits = glob.glob(os.path.join(results, "Dataset990_*", f"{trainer}__*", "fold_0", "checkpoint_latest.pth"))
            if hits:
                latest = hits[0]
                break
            time.sleep(0.05)
        assert latest is not None, "no checkpoint_latest.pth after the first epoch (old code: only every 50 epochs)"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    folder = os.path.dirname(latest)
    assert not os.path.isfile(os.path.join(folder, "checkpoint_final.pth")), "run finished before the kill"
    started = [int(e) for e in re.findall(r": Epoch (\d+)\s*$", read_logs(folder), re.M)]
    saved_epoch = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
    assert saved_epoch >= 1

    proc2 = run_cmd(cmd + ["--c"], env, timeout=300)
    m = re.search(r"loaded checkpoint (\S+): continuing from epoch (\d+)", proc2.stdout)
    assert m, proc2.stdout[-3000:]
    assert os.path.basename(m.group(1)) == "checkpoint_latest.pth"
    resumed = int(m.group(2))
    assert resumed == saved_epoch and resumed >= max(started) - 1, (resumed, started)
    final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    return proc2.stdout


def test_sigkill_after_first_epoch_resumes_within_one_epoch(nnunet_env, results_dir):
    env = train_env(nnunet_env, results_dir, {"TSKD_SCHEDULE": "3,2,1"})
    kill_after_first_epoch_and_resume(env, results_dir, TRAINER)


@pytest.mark.slow  # about 90 s on 2 busy cores: a teacher and two student runs
def test_student_sigkill_resumes_with_its_kd_heads(nnunet_env, tmp_path):
    """A distillation student (feature KD: extra projection heads in the checkpoint) resumes the same way."""
    from test_distill_transfer_set import distill_env_with_teacher

    env = distill_env_with_teacher(nnunet_env, str(tmp_path), "TSKDPlainTrainer_test",  # a 1-epoch teacher
                                   {"TSKD_TEACHER_TRAINER": "TSKDPlainTrainer_test"})
    out = kill_after_first_epoch_and_resume(dict(env, TSKD_SCHEDULE="3,2,1"), env["nnUNet_results"],
                                            "DistillTrainer_feat")
    assert "starts fresh" not in out  # the KD heads came back from checkpoint_latest.pth


@pytest.mark.slow  # about 110 s on 2 busy cores: a killed and a resumed 3-epoch LoRA run
def test_teacher_sigkill_resumes_with_adapter_only_checkpoint(nnunet_env, tmp_path):
    """A ViT LoRA teacher (tiny SAM-format checkpoint) killed after epoch 1 resumes the same way, and the
    resumed run still stores only adapter + decoder weights (no frozen base tensor)."""
    import json

    from test_backbones import TINY_SAM_OVERRIDES, write_tiny_sam_checkpoint

    ckpt = str(tmp_path / "sam_tiny_01ec64.pth")
    write_tiny_sam_checkpoint(ckpt)
    results = str(tmp_path / "nnUNet_results")
    os.makedirs(results)
    env = train_env(nnunet_env, results, {"TSKD_SCHEDULE": "3,2,1", "TSKD_TEACHER_BACKBONE": "sam_vit_b",
                                          "TSKD_TEACHER_WEIGHTS": ckpt,
                                          "TSKD_TEACHER_ARCH_OVERRIDES": json.dumps(TINY_SAM_OVERRIDES)})
    trainer = "ViTLoRATeacherTrainer"
    kill_after_first_epoch_and_resume(env, results, trainer, first_epoch_timeout=300)  # ViT start-up is slower
    final = glob.glob(os.path.join(results, "Dataset990_*", f"{trainer}__*", "fold_0", "checkpoint_final.pth"))
    weights = torch.load(final[0], map_location="cpu", weights_only=False)["network_weights"]
    assert not [k for k in weights if k.startswith("backbone.") and "lora_" not in k]
    assert any("lora_A" in k for k in weights) and any(k.startswith("decoder.") for k in weights)


def test_truncated_checkpoints_fall_back_with_a_message(nnunet_env, results_dir):
    env = train_env(nnunet_env, results_dir, {"TSKD_SCHEDULE": "2,2,1"})  # --c needs the same schedule
    run_cmd(train_cmd(), env, timeout=300)
    folder = fold_dir(results_dir)
    final, best = (os.path.join(folder, f"checkpoint_{k}.pth") for k in ("final", "best"))
    best_epoch = torch.load(best, map_location="cpu", weights_only=False)["current_epoch"]
    assert not glob.glob(os.path.join(folder, ".*tmp*")), "a temporary checkpoint file was left behind"
    # a kill during a non-atomic write leaves half a file: simulate it for final and latest
    data = open(final, "rb").read()
    with open(final, "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(folder, "checkpoint_latest.pth"), "wb") as f:
        f.write(data[:100])
    proc = run_cmd(train_cmd("--c"), env, timeout=300)
    out = proc.stdout
    assert re.search(r"checkpoint \S+checkpoint_final\.pth is unreadable", out), out[-3000:]
    assert re.search(r"checkpoint \S+checkpoint_latest\.pth is unreadable", out), out[-3000:]
    m = re.search(r"loaded checkpoint (\S+): continuing from epoch (\d+)", out)
    assert m and os.path.basename(m.group(1)) == "checkpoint_best.pth" and int(m.group(2)) == best_epoch, out[-3000:]
    assert torch.load(final, map_location="cpu", weights_only=False)["current_epoch"] == 2


def test_nothing_readable_starts_over(nnunet_env, results_dir):
    env = train_env(nnunet_env, results_dir, {"TSKD_SCHEDULE": "1,2,1"})
    name = os.path.basename(glob.glob(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_*"))[0])
    folder = os.path.join(results_dir, name, f"{TRAINER}__nnUNetPlans__2d", "fold_0")
    os.makedirs(folder)
    with open(os.path.join(folder, "checkpoint_best.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    proc = run_cmd(train_cmd("--c"), env, timeout=300)
    assert re.search(r"checkpoint \S+checkpoint_best\.pth is unreadable", proc.stdout), proc.stdout[-3000:]
    assert "starting a new training from epoch 0" in proc.stdout
    assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))


def test_save_every_setting(monkeypatch):
    from tskd_nnunet.config import TSKDConfigError, save_every_from_env
    monkeypatch.delenv("TSKD_SAVE_EVERY", raising=False)
    assert save_every_from_env() == 1
    monkeypatch.setenv("TSKD_SAVE_EVERY", "5")
    assert save_every_from_env() == 5
    for bad in ("0", "-2", "x"):
        monkeypatch.setenv("TSKD_SAVE_EVERY", bad)
        with pytest.raises(TSKDConfigError, match="TSKD_SAVE_EVERY=.* must be a positive integer"):
            save_every_from_env()


# ---- fast, in-process --------------------------------------------------------------------------------
def test_every_trainer_of_ours_has_the_checkpoint_behaviour():
    import importlib
    import inspect
    import pkgutil

    import tskd_nnunet.trainers as pkg
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from tskd_nnunet.trainers.base import ScheduledTrainer

    found = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"tskd_nnunet.trainers.{mod.name}")
        for _, cls in inspect.getmembers(m, inspect.isclass):
            if issubclass(cls, nnUNetTrainer) and cls.__module__.startswith("tskd_nnunet"):
                found.append(cls)
                assert issubclass(cls, ScheduledTrainer), cls
                assert "on_epoch_end" not in cls.__dict__ or cls is ScheduledTrainer, cls
    assert len(found) > 10


def _bare_trainer(folder, epoch=0):
    from tskd_nnunet.trainers.base import ScheduledTrainer
    t = object.__new__(ScheduledTrainer)  # no plans needed for the file handling
    t.output_folder, t.current_epoch, t.local_rank, t.num_epochs = str(folder), epoch, 0, 3
    return t


def test_save_is_atomic(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def killed_midway(self, filename):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", killed_midway)
    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"the previous good checkpoint")
    with pytest.raises(KeyboardInterrupt):
        _bare_trainer(tmp_path).save_checkpoint(str(target))
    assert target.read_bytes() == b"the previous good checkpoint" and list(tmp_path.iterdir()) == [target]


def test_unreadable_checkpoint_outside_resume_is_an_error(tmp_path, monkeypatch):
    import sys

    from tskd_nnunet.trainers.base import CheckpointError

    final = tmp_path / "checkpoint_final.pth"
    final.write_bytes(b"junk")
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "990", "2d", "0", "--val"])  # validating: no fallback
    with pytest.raises(CheckpointError, match=r"checkpoint_final\.pth cannot be loaded \(.*\)\. Fix: restore"):
        _bare_trainer(tmp_path).load_checkpoint(str(final))
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "990", "2d", "0", "--val_best"])
    best = tmp_path / "checkpoint_best.pth"
    best.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint_best\.pth cannot be loaded"):  # after training
        _bare_trainer(tmp_path, epoch=3).load_checkpoint(str(best))


def test_check_checkpoint_reasons(tmp_path):
    from tskd_nnunet.trainers.base import check_checkpoint
    torch.save({"network_weights": {}}, tmp_path / "a_state_dict.pth")
    assert "is not an nnU-Net training checkpoint (missing optimizer_state" in check_checkpoint(
        str(tmp_path / "a_state_dict.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    assert check_checkpoint(str(tmp_path / "empty.pth")).startswith("EOFError")


def test_continue_with_other_training_settings_is_refused(use_nnunet_env, tmp_path, monkeypatch):
    """--c refuses a checkpoint recorded with other TSKD_* settings, in one line naming the file, what differs and
    the export that continues it; the same settings pass."""
    import json

    from tskd_nnunet.config import TSKDConfigError
    from tskd_nnunet.trainers.base import SETTINGS_KEY, settings_conflict
    from tskd_nnunet.trainers.distill import DistillTrainer_test

    pre = os.path.join(use_nnunet_env["nnUNet_preprocessed"], "Dataset990_Phantom")
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("TSKD_SCHEDULE", "3,2,1")
    monkeypatch.setenv("TSKD_UNLABELED_FRACTION", "0.5")

    def trainer():
        return DistillTrainer_test(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))
    recorded = trainer().training_settings()
    assert recorded["TSKD_SCHEDULE"] == "3,2,1" and recorded["TSKD_TEACHER_TRAINER"] == "ViTLoRATeacherTrainer_test"
    ckpt = str(tmp_path / "checkpoint_latest.pth")
    torch.save({"network_weights": {}, "optimizer_state": {}, "current_epoch": 1, "logging": {},
                "init_args": {"plans": {SETTINGS_KEY: recorded}}}, ckpt)
    monkeypatch.setenv("TSKD_UNLABELED_FRACTION", "0.3")
    monkeypatch.delenv("TSKD_SCHEDULE")  # back to the class's (1, 2, 1)
    with pytest.raises(TSKDConfigError) as e:
        trainer().load_checkpoint(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{ckpt} was trained with other settings: TSKD_SCHEDULE=3,2,1 (now "
                                              f"1,2,1), TSKD_UNLABELED_FRACTION=0.5 (now 0.3). Fix: export "
                                              f"TSKD_SCHEDULE=3,2,1; export TSKD_UNLABELED_FRACTION=0.5 to continue it")
    assert settings_conflict(recorded, dict(recorded), ckpt) is None
    assert "Fix: unset TSKD_UNLABELED_FRACTION" in settings_conflict({"TSKD_UNLABELED_FRACTION": None},
                                                                     {"TSKD_UNLABELED_FRACTION": 0.3}, ckpt)
    assert "Fix: set the trainer's kd_weight back to 1.0" in settings_conflict({"kd_weight": 1.0}, {"kd_weight": 0.5},
                                                                               ckpt)
