"""Shared fixtures: one tiny preprocessed nnU-Net dataset per test session.

The phantom dataset (tskd_nnunet.demo.phantom) goes through nnU-Net's own
``nnUNetv2_plan_and_preprocess`` once; tests that train copy nothing and share it. Tests that
must not see each other's results get their own ``nnUNet_results`` through ``results_dir``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHANTOM_ID = 990
BIN = os.path.dirname(sys.executable)


def subprocess_env(extra: Dict[str, str] | None = None) -> Dict[str, str]:
    """Environment for nnU-Net console commands: the source checkout first on PYTHONPATH, so the
    commands run this tree's code (the installed copy can be older), and 1 worker process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
    env.setdefault("nnUNet_def_n_proc", "1")
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks plan_and_preprocess; training sets it itself
    env.pop("TSKD_SCHEDULE", None)
    env.update(extra or {})
    return env


def run_cmd(args: List[str], env: Dict[str, str], timeout: int = 900, expect_ok: bool = True
            ) -> subprocess.CompletedProcess:
    """Run a console command; on unexpected failure show its output in the assertion."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def predict_test_images(env: Dict[str, str], trainer: str, out: str, hidden: Optional[str] = None) -> List[str]:
    """``nnUNetv2_predict`` (fold 0, CPU) of the phantom's imagesTs into ``out`` with the model folder of
    ``trainer``, the folder ``hidden`` (e.g. a teacher the model must not need) moved away meanwhile. Asserts one
    segmentation per image, named after its case; returns their names."""
    images = os.path.join(env["nnUNet_raw"], f"Dataset{PHANTOM_ID}_Phantom", "imagesTs")
    if hidden:
        shutil.move(hidden, hidden + ".hidden")
    try:
        run_cmd([os.path.join(BIN, "nnUNetv2_predict"), "-i", images, "-o", out, "-d", str(PHANTOM_ID), "-c", "2d",
                 "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    finally:
        if hidden:
            shutil.move(hidden + ".hidden", hidden)
    found = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert found == sorted(f.replace("_0000", "") for f in os.listdir(images))
    return found


def train_env(nnunet_env: Dict[str, str], results: str, extra: Dict[str, str] | None = None) -> Dict[str, str]:
    env = dict(nnunet_env, nnUNet_results=results, nnUNet_n_proc_DA="0")
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> Dict[str, str]:
    """nnU-Net folders with the phantom dataset planned and preprocessed (2d)."""
    from tskd_nnunet.demo.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("nnunet")
    paths = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    write_phantom_dataset(paths["nnUNet_raw"], PHANTOM_ID, num_train=12, num_test=3, size=64, seed=0)
    env = subprocess_env(paths)
    run_cmd([os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(PHANTOM_ID), "-c", "2d", "-np", "1",
             "--verify_dataset_integrity"], env)
    return env


@pytest.fixture
def results_dir(tmp_path) -> str:
    path = tmp_path / "nnUNet_results"
    path.mkdir()
    return str(path)


@pytest.fixture
def use_nnunet_env(nnunet_env, monkeypatch):
    """Point this process's nnU-Net paths at the session dataset (for in-process API calls)."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, nnunet_env[k])
    return nnunet_env


@pytest.fixture
def empty_nnunet_env(tmp_path, monkeypatch):
    """Empty nnU-Net folders under tmp_path, set in this process's environment (converter tests)."""
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / v).mkdir()
        monkeypatch.setenv(v, str(tmp_path / v))
    return tmp_path


def assert_integrity(folder, capfd) -> None:
    """nnU-Net's own verify_dataset_integrity passes and prints no error or warning."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    capfd.readouterr()
    verify_dataset_integrity(str(folder), num_processes=1)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Error" not in text and "WARNING" not in text and "Warning" not in text, text
