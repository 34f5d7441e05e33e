"""Distillation from the real ViT LoRA teacher (tiny, randomly initialised) and the task-agnostic
baseline from the same backbone. Slow: three real nnU-Net trainings."""
import json
import os

import pytest

from conftest import BIN, PHANTOM_ID, predict_test_images, run_cmd
from test_backbones import TINY_VIT_OVERRIDES
from test_distill_transfer_set import distill_env_with_teacher

pytestmark = pytest.mark.slow
VIT_ENV = {"TSKD_TEACHER_BACKBONE": "vit_tiny", "TSKD_ALLOW_RANDOM_TEACHER": "1",
           "TSKD_TEACHER_ARCH_OVERRIDES": json.dumps(TINY_VIT_OVERRIDES)}


def _train(env, trainer):
    return run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", trainer, "-device", "cpu"],
                   env).stdout


@pytest.fixture(scope="module")
def vit_env(nnunet_env, tmp_path_factory):
    return distill_env_with_teacher(nnunet_env, str(tmp_path_factory.mktemp("distill_vit")),
                                    "ViTLoRATeacherTrainer_test", VIT_ENV)


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


def test_vit_tiny_student_trains_and_predicts_from_plans_alone(vit_env, tmp_path):
    """The paper's ViT student: spec recorded in plans.json, whole network in the checkpoint,
    nnUNetv2_predict rebuilds it without any TSKD variable (and without the teacher)."""
    import torch
    from test_distill_transfer_set import DATASET
    from tskd_nnunet.trainers.distill import STUDENT_PLANS_KEY

    env = {k: v for k, v in vit_env.items() if k not in VIT_ENV}
    out = _train(dict(env, TSKD_STUDENT_ARCH_OVERRIDES=json.dumps(TINY_VIT_OVERRIDES)), "DistillTrainer_vittiny_test")
    assert "ViT student: vit_tiny (overrides {'depth': 2, 'embed_dim': 64, 'num_heads': 2}) from RANDOM INIT" in out
    assert "Student ViTSegNet (width 1.0):" in out and "TSKD_TEACHER_TRAINER=ViTLoRATeacherTrainer_test," in out
    assert "Teacher targets:" in out  # CPU: the teacher's targets are cached, not computed online
    assert "loss terms: sup" in out and "kd " in out

    model_dir = os.path.join(vit_env["nnUNet_results"], DATASET, "DistillTrainer_vittiny_test__nnUNetPlans__2d")
    with open(os.path.join(model_dir, "plans.json")) as f:
        spec = json.load(f)[STUDENT_PLANS_KEY]
    assert spec["backbone"] == "vit_tiny" and spec["lora"] is None and spec["arch_overrides"]["depth"] == 2
    ckpt = torch.load(os.path.join(model_dir, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    keys = set(ckpt["network_weights"])
    assert "backbone.model.patch_embed.proj.weight" in keys and "backbone.model.blocks.1.attn.qkv.weight" in keys
    assert not any("lora" in k for k in keys) and not any(k.startswith("teacher") for k in keys)

    teacher_dir = os.path.join(vit_env["nnUNet_results"], DATASET, "ViTLoRATeacherTrainer_test__nnUNetPlans__2d")
    predict_test_images(env, "DistillTrainer_vittiny_test", str(tmp_path / "pred"), hidden=teacher_dir)
