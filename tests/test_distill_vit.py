"""Distillation from the real ViT LoRA teacher (tiny, randomly initialised) and the task-agnostic
baseline from the same backbone. Slow: three real nnU-Net trainings."""
import json
import os

import pytest

from conftest import BIN, PHANTOM_ID, run_cmd, train_env
from test_backbones import TINY_VIT_OVERRIDES
from test_distill_transfer_set import make_distill_dataset

pytestmark = pytest.mark.slow
VIT_ENV = {"TSKD_TEACHER_BACKBONE": "vit_tiny", "TSKD_ALLOW_RANDOM_TEACHER": "1",
           "TSKD_TEACHER_ARCH_OVERRIDES": json.dumps(TINY_VIT_OVERRIDES)}


def _train(env, trainer):
    return run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", trainer, "-device", "cpu"],
                   env).stdout


@pytest.fixture(scope="module")
def vit_env(nnunet_env, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("distill_vit"))
    env = make_distill_dataset(nnunet_env, root)
    results = os.path.join(root, "nnUNet_results")
    os.makedirs(results)
    env = train_env(env, results, VIT_ENV)
    _train(env, "ViTLoRATeacherTrainer_test")
    return env


def test_pixel_and_feature_kd_from_vit_teacher(vit_env):
    # the teacher is rebuilt from its own plans.json: no TSKD_TEACHER_* variable is needed
    env = {k: v for k, v in vit_env.items() if k not in VIT_ENV}
    out = _train(dict(env, TSKD_TEACHER_TRAINER="ViTLoRATeacherTrainer_test", TSKD_SCHEDULE="1,2,1"),
                 "DistillTrainer_feat")
    assert "Teacher ViTLoRATeacherTrainer_test from" in out
    assert "Feature KD (mse): student encoder.stages.4 (512, 4, 4) -> features (64, 4, 4)" in out
    assert "loss terms: sup" in out and "kd " in out and "feat " in out


def test_task_agnostic_baseline_switches_phase(vit_env):
    out = _train(vit_env, "TaskAgnosticDistillTrainer_test")
    assert "Foundation model vit_tiny from RANDOM INIT" in out
    terms = [l.split("loss terms: ")[1] for l in out.splitlines() if "loss terms: " in l]
    assert terms[0].startswith("feat ") and terms[1].startswith("sup ")   # epoch 0: KD, epoch 1: supervised
    sets = [l for l in out.splitlines() if "Transfer set:" in l]
    assert "4 labeled, 5 pool, 1 synthetic, 1 real-unlabeled" in sets[0]
    assert "4 labeled, 0 pool, 0 synthetic, 0 real-unlabeled" in sets[-1]
