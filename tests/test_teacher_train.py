"""ViTLoRATeacherTrainer through nnU-Net's own commands on the phantom dataset (tiny SAM-format
checkpoint): base frozen, LoRA trained, adapter-only checkpoint, predict/--c/--val without any
TSKD variable, clear errors."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from conftest import BIN, PHANTOM_ID, predict_test_images, run_cmd, train_env
from test_backbones import (TINY_SAM_OVERRIDES, TINY_VIT_OVERRIDES, write_tiny_sam_checkpoint,
                            write_tiny_timm_checkpoint)

TEACHER_VARS = ("TSKD_TEACHER_BACKBONE", "TSKD_TEACHER_WEIGHTS", "TSKD_ALLOW_RANDOM_TEACHER",
                "TSKD_TEACHER_ARCH_OVERRIDES", "TSKD_TEACHER_IMG_SIZE")


def _no_teacher_vars(env):
    return {k: v for k, v in env.items() if k not in TEACHER_VARS}


def _fold(results, trainer):
    return os.path.join(results, "Dataset990_Phantom", f"{trainer}__nnUNetPlans__2d", "fold_0")


@pytest.fixture(scope="module")
def lora_run(nnunet_env, tmp_path_factory):
    """One real 1-epoch, 2-iteration LoRA training with a tiny SAM-format checkpoint."""
    root = tmp_path_factory.mktemp("teacher_lora")
    ckpt = str(root / "sam_tiny_01ec64.pth")
    sam_sd = write_tiny_sam_checkpoint(ckpt)
    results = str(root / "nnUNet_results")
    os.makedirs(results)
    env = train_env(nnunet_env, results, {"TSKD_TEACHER_BACKBONE": "sam_vit_b", "TSKD_TEACHER_WEIGHTS": ckpt,
                                          "TSKD_TEACHER_ARCH_OVERRIDES": json.dumps(TINY_SAM_OVERRIDES)})
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr",
                    "ViTLoRATeacherTrainer_test", "-device", "cpu"], env)
    return dict(env=env, results=results, ckpt=ckpt, sam_sd=sam_sd, stdout=proc.stdout, root=root)


def _rebuild(results, trainer_name, checkpoint="checkpoint_final.pth"):
    """What nnUNetv2_predict does: plans.json of the model folder -> trainer's build -> load_state_dict."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tskd_nnunet.nnunet_ext import tskd_trainers
    folder = os.path.dirname(_fold(results, trainer_name))
    pm = PlansManager(os.path.join(folder, "plans.json"))
    cm = pm.get_configuration("2d")
    net = getattr(tskd_trainers, trainer_name).build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False)
    saved = torch.load(os.path.join(folder, "fold_0", checkpoint), map_location="cpu", weights_only=False)
    net.load_state_dict(saved["network_weights"])
    return net, saved


def test_lora_training_freezes_base_and_trains_adapters(lora_run, monkeypatch):
    for k in TEACHER_VARS:
        monkeypatch.delenv(k, raising=False)
    assert "Teacher: sam_vit_b from" in lora_run["stdout"]
    net, saved = _rebuild(lora_run["results"], "ViTLoRATeacherTrainer_test")
    weights = saved["network_weights"]
    # adapter-only checkpoint: no frozen base tensor, but LoRA + decoder + input adapter
    assert not [k for k in weights if k.startswith("backbone.") and "lora_" not in k]
    assert any("lora_A" in k for k in weights) and any(k.startswith("decoder.") for k in weights)
    assert any(k.startswith("adapter.") for k in weights)
    # base weights are exactly the checkpoint file's (frozen), LoRA B moved away from its zero init
    sam = lora_run["sam_sd"]
    blocks = net.backbone.model.blocks
    assert torch.equal(blocks[0].attn.qkv.base_layer.weight, sam["image_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(blocks[1].mlp.fc2.weight, sam["image_encoder.blocks.1.mlp.lin2.weight"])
    assert torch.equal(net.backbone.model.patch_embed.proj.weight, sam["image_encoder.patch_embed.proj.weight"])
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    plans = json.load(open(os.path.join(os.path.dirname(_fold(lora_run["results"], "ViTLoRATeacherTrainer_test")),
                                        "plans.json")))
    spec = plans["tskd_teacher"]
    assert spec["checkpoint"] == lora_run["ckpt"] and len(spec["checkpoint_sha256"]) == 64
    assert spec["lora"]["r"] == 8 and spec["img_size"] == [64, 64]


def test_predict_from_saved_teacher_without_tskd_vars(lora_run, nnunet_env, tmp_path):
    predict_test_images(_no_teacher_vars(lora_run["env"]), "ViTLoRATeacherTrainer_test", str(tmp_path / "pred"))


def test_changed_base_file_and_conflicting_settings_are_clear(lora_run, use_nnunet_env, monkeypatch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tskd_nnunet.models.vit_backbones import TeacherCheckpointError
    from tskd_nnunet.trainers.teacher import ViTLoRATeacherTrainer_test
    folder = os.path.dirname(_fold(lora_run["results"], "ViTLoRATeacherTrainer_test"))
    plans = json.load(open(os.path.join(folder, "plans.json")))
    changed = str(lora_run["root"] / "changed.pth")
    write_tiny_sam_checkpoint(changed, seed=3)
    plans["tskd_teacher"]["checkpoint"] = changed  # same recorded sha256, other bytes
    pm = PlansManager(plans)
    with pytest.raises(TeacherCheckpointError, match=r"changed\.pth changed since training"):
        ViTLoRATeacherTrainer_test.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, False)
    # asking the same output folder for another teacher
    monkeypatch.setenv("nnUNet_results", lora_run["results"])
    monkeypatch.setenv("TSKD_TEACHER_WEIGHTS", changed)
    monkeypatch.setenv("TSKD_TEACHER_ARCH_OVERRIDES", json.dumps(TINY_SAM_OVERRIDES))
    pre = os.path.join(use_nnunet_env["nnUNet_preprocessed"], "Dataset990_Phantom")
    fresh_plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    fresh_plans["continue_training"] = False
    dj = json.load(open(os.path.join(pre, "dataset.json")))
    with pytest.raises(TeacherCheckpointError, match=r"plans\.json records a teacher.*Fix: unset TSKD_TEACHER_"):
        ViTLoRATeacherTrainer_test(fresh_plans, "2d", 0, dj, torch.device("cpu"))


def test_missing_weights_and_channel_mismatch_fail_clearly_in_nnunet(nnunet_env, results_dir, tmp_path):
    base = [os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "ViTLoRATeacherTrainer_test",
            "-device", "cpu"]
    env = _no_teacher_vars(train_env(nnunet_env, results_dir))
    proc = run_cmd(base, env, expect_ok=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "No weights given for teacher backbone 'sam_vit_b'" in last and "TSKD_TEACHER_WEIGHTS" in last
    # a backbone pretrained on 2 channels (e.g. our MAE on 2-channel MRI) vs the 1-channel phantom
    two = str(tmp_path / "mae_2ch.pth")
    write_tiny_timm_checkpoint(two, in_chans=2)
    env.update(TSKD_TEACHER_BACKBONE="vit_tiny", TSKD_TEACHER_WEIGHTS=two,
               TSKD_TEACHER_ARCH_OVERRIDES=json.dumps(TINY_VIT_OVERRIDES))
    proc = run_cmd(base, env, expect_ok=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "TeacherCheckpointError" in last and "declares 1 input channel" in last
    assert "dataset.json declares 1 input channel(s)" in last and "mae_2ch.pth" in last and "Fix:" in last


@pytest.mark.slow
def test_continue_and_val_rebuild_the_same_teacher(lora_run):
    env = _no_teacher_vars(lora_run["env"])
    fold = _fold(lora_run["results"], "ViTLoRATeacherTrainer_test")
    cmd = [os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "ViTLoRATeacherTrainer_test",
           "-device", "cpu"]
    # a longer schedule changes the LR schedule of the run: --c refuses it in one line, naming the fix
    proc = run_cmd(cmd + ["--c"], dict(env, TSKD_SCHEDULE="2,2,1"), expect_ok=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "TSKD_SCHEDULE=1,2,1 (now 2,2,1). Fix: export TSKD_SCHEDULE=1,2,1" in last
    out = run_cmd(cmd + ["--c"], env).stdout  # the teacher is rebuilt from plans.json and its checkpoint loaded
    assert re.search(r"loaded checkpoint \S+checkpoint_final\.pth: continuing from epoch 1", out), out[-3000:]
    saved = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert saved["current_epoch"] == 1
    os.remove(os.path.join(fold, "validation", "summary.json"))
    run_cmd(cmd + ["--val"], env)
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))


@pytest.mark.slow
def test_full_finetune_timm_teacher_stores_and_trains_everything(nnunet_env, tmp_path):
    ckpt = str(tmp_path / "vit_tiny_mae.pth")
    sd = write_tiny_timm_checkpoint(ckpt, wrap="model")
    results = str(tmp_path / "res")
    os.makedirs(results)
    env = train_env(nnunet_env, results, {"TSKD_TEACHER_BACKBONE": "vit_tiny", "TSKD_TEACHER_WEIGHTS": ckpt,
                                          "TSKD_TEACHER_ARCH_OVERRIDES": json.dumps(TINY_VIT_OVERRIDES)})
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "ViTFullFTTeacherTrainer_test",
             "-device", "cpu"], env)
    net, saved = _rebuild(results, "ViTFullFTTeacherTrainer_test")
    weights = saved["network_weights"]
    assert "backbone.model.blocks.0.attn.qkv.weight" in weights and not any("lora_" in k for k in weights)
    assert not torch.equal(weights["backbone.model.blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
