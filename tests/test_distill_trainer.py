"""DistillTrainer through nnU-Net's real console commands, and the teacher checks.

One tiny plain nnU-Net teacher (TSKDPlainTrainer_test) is trained once for the module; the
generic teacher loader treats it exactly as it treats the ViT teacher.
"""
import glob
import json
import os
import shutil

import pytest
import torch

from conftest import BIN, PHANTOM_ID, predict_test_images, run_cmd
from test_distill_transfer_set import DATASET, distill_env_with_teacher

TEACHER = "TSKDPlainTrainer_test"


@pytest.fixture(scope="module")
def teacher_env(nnunet_env, tmp_path_factory):
    return distill_env_with_teacher(nnunet_env, str(tmp_path_factory.mktemp("distill")), TEACHER)


def _train(env, trainer, *extra, expect_ok=True):
    return run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", trainer, "-device", "cpu",
                    *extra], env, expect_ok=expect_ok)


def _fold(env, trainer):
    return os.path.join(env["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__2d", "fold_0")


def _student_keys(trainer_cls, env):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(os.path.join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json"))
    net = trainer_cls.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, enable_deep_supervision=True)
    return set(net.state_dict().keys())


def test_distill_trains_validates_and_predicts_with_plain_nnunet(teacher_env, tmp_path):
    from tskd_nnunet.trainers.distill import HEADS_KEY, DistillTrainer_test

    env = dict(teacher_env, TSKD_TEACHER_TRAINER=TEACHER)
    proc = _train(env, "DistillTrainer_test")
    out = proc.stdout
    assert "Transfer set: 4 labeled, 5 pool, 1 synthetic, 1 real-unlabeled" in out
    # CPU default: cached teacher targets, computed once for all 11 transfer-set cases
    assert f"TSKD_KD_MODE=cached, TSKD_TEACHER_TRAINER={TEACHER}," in out and "Student PlainConvUNet (width 1.0)" in out
    assert "Teacher targets:" in out and "(11 computed now, 0 reused" in out
    assert "loss terms: sup" in out and "kd " in out
    debug = json.load(open(os.path.join(_fold(env, "DistillTrainer_test"), "debug.json")))
    assert debug["kd_mode"] == "cached" and "tskd_targets" in debug["target_cache_folder"]
    assert "'pool': 5" in debug["transfer_set_counts"]
    assert debug["teacher_checkpoint_name"] == "checkpoint_final.pth" and debug["teacher_plans"] == "nnUNetPlans"
    assert debug["teacher_tta"] == "True" and debug["unlabeled_fraction"] == "None"
    # every setting that changes training: printed, in debug.json and in the plans (plans.json, checkpoints)
    assert "'TSKD_SCHEDULE': '1,2,1'" in debug["tskd_settings"]
    assert "'TSKD_UNLABELED_FRACTION': None" in debug["tskd_settings"]
    plans = json.load(open(os.path.join(os.path.dirname(_fold(env, "DistillTrainer_test")), "plans.json")))
    assert plans["tskd_settings"]["TSKD_TEACHER_TRAINER"] == TEACHER and plans["tskd_settings"]["kd_weight"] == 1.0
    # the synthetic case is written again under its old name (as re-sampling does): its target is stale, the
    # other ten are reused by the second run
    syn_pkl, = glob.glob(os.path.join(env["nnUNet_preprocessed"], DATASET, "tskd_extension", "*", "fold_0", "*",
                                      "syn_*.pkl"))
    os.utime(syn_pkl)  # now: after its target was written
    out = _train(env, "DistillTrainer_test").stdout
    assert "(1 computed now, 10 reused" in out
    drawn = [l for l in out.splitlines() if "cases drawn this epoch" in l]
    assert drawn and sum(int(x.split()[-1]) for x in drawn[0].split(":")[-1].split(",")) == 2 * 2  # 2 iters x bs 2

    fold = _fold(env, "DistillTrainer_test")
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert set(ckpt["network_weights"]) == _student_keys(DistillTrainer_test, env)  # no teacher keys
    assert HEADS_KEY not in ckpt and ckpt["trainer_name"] == "DistillTrainer_test"
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))

    # inference never needs the teacher: hidden while predicting
    predict_test_images(env, "DistillTrainer_test", str(tmp_path / "pred"), hidden=os.path.dirname(_fold(env, TEACHER)))


def test_feature_kd_resume_keeps_projection_out_of_student_weights(teacher_env):
    from tskd_nnunet.trainers.distill import HEADS_KEY, DistillTrainer_feat

    env = dict(teacher_env, TSKD_TEACHER_TRAINER=TEACHER, TSKD_SCHEDULE="1,2,1", TSKD_UNLABELED_FRACTION="0.5")
    out = _train(env, "DistillTrainer_feat").stdout
    assert "Feature KD (mse): student encoder.stages.4" in out and "feat " in out
    assert "TSKD_KD_MODE=online" in out and f"Teacher {TEACHER} from" in out  # features are not cached: teacher online
    final = os.path.join(_fold(env, "DistillTrainer_feat"), "checkpoint_final.pth")
    first = torch.load(final, map_location="cpu", weights_only=False)
    assert set(first["network_weights"]) == _student_keys(DistillTrainer_feat, env)
    assert set(first[HEADS_KEY]) == {"feature.proj.weight", "feature.proj.bias"}

    # --c with another setting that changes training is refused in one line naming the checkpoint and the fix
    proc = _train(dict(env, TSKD_UNLABELED_FRACTION="0.3"), "DistillTrainer_feat", "--c", expect_ok=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("tskd_nnunet.config.TSKDConfigError: ") and final in last
    assert "TSKD_UNLABELED_FRACTION=0.5 (now 0.3). Fix: export TSKD_UNLABELED_FRACTION=0.5 to continue it" in last

    out = _train(env, "DistillTrainer_feat", "--c").stdout  # loads network, optimizer (2 groups) and heads
    assert "starts fresh" not in out
    second = torch.load(final, map_location="cpu", weights_only=False)
    for k, v in first[HEADS_KEY].items():  # nothing left to train: restored heads are saved unchanged
        assert torch.equal(v, second[HEADS_KEY][k])

    _train(env, "DistillTrainer_feat", "--val")
    assert os.path.isfile(os.path.join(_fold(env, "DistillTrainer_feat"), "validation", "summary.json"))


def test_missing_teacher_is_a_one_line_error_through_nnunet(teacher_env):
    proc = _train(teacher_env, "DistillTrainer_test", expect_ok=False)  # default: ViTLoRATeacherTrainer_test
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tskd_nnunet.distill.teacher_io.TeacherError: Teacher not found:")
    assert "ViTLoRATeacherTrainer_test__nnUNetPlans__2d does not exist" in last
    assert "nnUNetv2_train 990 2d 0 -tr ViTLoRATeacherTrainer_test" in last


# ---- teacher checks in-process (fast): each mismatch names the file and the fix ----------------

@pytest.fixture
def teacher_copy(teacher_env, tmp_path):
    """A copy of the trained teacher's results folder that a test may break."""
    results = str(tmp_path / "results")
    src = os.path.dirname(_fold(teacher_env, TEACHER))
    shutil.copytree(src, os.path.join(results, DATASET, os.path.basename(src)))
    with open(os.path.join(teacher_env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(src, "dataset.json")) as f:
        dataset_json = json.load(f)
    return results, os.path.join(results, DATASET, os.path.basename(src)), plans, dataset_json


def _edit_json(path, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def test_teacher_loads_frozen_and_matches(teacher_copy):
    from tskd_nnunet.distill.teacher_io import load_teacher

    results, _, plans, dataset_json = teacher_copy
    net, loc = load_teacher(results, plans, "2d", dataset_json, 0, TEACHER)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert loc.checkpoint.endswith(os.path.join("fold_0", "checkpoint_final.pth"))
    assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)  # deep supervision off


@pytest.mark.parametrize("case, pattern", [
    ("labels", r"other labels: .*dataset.json has labels="),
    ("channels", r"other channels: .*dataset.json has channel_names="),
    ("plans", r"other plans: .*plans.json has 2d.patch_size=\[32, 32\].*retrain the teacher"),
    ("fold", r"trained on fold 0, the student trains fold 1"),
    ("unfinished", r"checkpoint_final.pth is missing \(found .*checkpoint_latest.pth.*TSKD_TEACHER_CHECKPOINT"),
    ("trainer", r"Teacher not found: .*NoSuchTeacher__nnUNetPlans__2d does not exist; train it first: "
                r"nnUNetv2_train 990 2d 0 -tr NoSuchTeacher"),
])
def test_teacher_mismatch_errors(teacher_copy, case, pattern):
    from tskd_nnunet.distill.teacher_io import TeacherError, load_teacher

    results, model_dir, plans, dataset_json = teacher_copy
    fold, trainer = 0, TEACHER
    if case == "labels":
        _edit_json(os.path.join(model_dir, "dataset.json"), lambda d: d["labels"].update(extra=2))
    elif case == "channels":
        _edit_json(os.path.join(model_dir, "dataset.json"), lambda d: d["channel_names"].update({"0": "CT"}))
    elif case == "plans":
        _edit_json(os.path.join(model_dir, "plans.json"),
                   lambda d: d["configurations"]["2d"].update(patch_size=[32, 32]))
    elif case == "fold":
        shutil.copytree(os.path.join(model_dir, "fold_0"), os.path.join(model_dir, "fold_1"))
        fold = 1
    elif case == "unfinished":
        os.replace(os.path.join(model_dir, "fold_0", "checkpoint_final.pth"),
                   os.path.join(model_dir, "fold_0", "checkpoint_latest.pth"))
    elif case == "trainer":
        trainer = "NoSuchTeacher"
    with pytest.raises(TeacherError, match=pattern) as info:
        load_teacher(results, plans, "2d", dataset_json, fold, trainer)
    assert "\n" not in str(info.value)


def test_vit_student_weights_env_and_builder(tmp_path, monkeypatch):
    """TSKD_STUDENT_WEIGHTS: missing file is a one-line config error; a timm-format file is copied into
    the backbone; the network built from the spec (as at inference) stores every weight."""
    import timm
    from test_backbones import TINY_VIT_OVERRIDES
    from tskd_nnunet import config
    from tskd_nnunet.models.students import build_vit_student, load_vit_student_weights, resolve_vit_student_spec

    monkeypatch.setenv("TSKD_STUDENT_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(config.TSKDConfigError, match=r"TSKD_STUDENT_WEIGHTS=.*nope\.pth.*does not exist\. Fix:"):
        config.student_weights()

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, in_chans=1, num_classes=0,
                            depth=2, embed_dim=64, num_heads=2)
    path = str(tmp_path / "mae_vit_tiny.pth")
    torch.save({"model": src.state_dict()}, path)
    monkeypatch.setenv("TSKD_STUDENT_WEIGHTS", path)
    spec = resolve_vit_student_spec("vit_tiny", config.student_weights(), TINY_VIT_OVERRIDES, (64, 64), 16)
    assert spec.in_chans == 1 and spec.lora is None and spec.stores_base
    net = build_vit_student(spec, 1, 2, [[1.0, 1.0], [0.5, 0.5]], enable_deep_supervision=True)
    ref = src.patch_embed.proj.weight
    assert not torch.equal(net.backbone.model.patch_embed.proj.weight, ref)  # built at random: no file read
    assert load_vit_student_weights(net, spec)
    assert torch.equal(net.backbone.model.patch_embed.proj.weight, ref)
    assert all(p.requires_grad for p in net.parameters())
    assert set(net.state_dict()) == set(dict(net.named_parameters())) | set(dict(net.named_buffers()))
    outs = net(torch.zeros(2, 1, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 2, 64, 64), (2, 2, 32, 32)]


def test_cache_command_builds_the_trainers_cache_and_ingests_the_teachers_own_predictions(teacher_env, tmp_path):
    """tskd_cache_targets computes exactly the cache training would use; a folder the teacher predicted with
    nnUNetv2_predict --save_probabilities is taken instead of a second teacher pass, and agrees with it."""
    import numpy as np
    import sys
    env = dict(teacher_env, TSKD_TEACHER_TRAINER=TEACHER)
    cmd = [sys.executable, "-m", "tskd_nnunet.distill.cache_cli", str(PHANTOM_ID), "2d", "0", "-t", TEACHER]
    out = run_cmd(cmd, env).stdout
    folder = out.strip().splitlines()[-1].split("teacher targets ready: ")[1]
    direct = {f: np.load(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".npy")}
    assert len(direct) == 11  # 4 labeled + 5 pool + 1 synthetic + 1 real-unlabeled
    shutil.rmtree(folder)

    pred = str(tmp_path / "teacher_pred")
    run_cmd([os.path.join(BIN, "nnUNetv2_predict"), "-i", os.path.join(env["nnUNet_raw"], DATASET, "imagesTr"), "-o",
             pred, "-d", str(PHANTOM_ID), "-c", "2d", "-tr", TEACHER, "-f", "0", "-device", "cpu",
             "--save_probabilities", "-npp", "1", "-nps", "1"], env)
    out = run_cmd(cmd + ["--from_predictions", pred], env).stdout
    taken = int(out.split(" case(s) taken from the predictions")[0].split("Teacher targets: ")[-1])
    assert taken == 9  # the training images; the two extension cases are not in imagesTr and are computed
    for name, ref in direct.items():
        got = np.load(os.path.join(folder, name))
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.float32) - ref.astype(np.float32)).max() < 2e-2, name


def test_hard_label_variant_is_recorded_and_builds_its_loss(use_nnunet_env):
    """DistillTrainer_hard = T 1 + soft Dice + the teacher's argmax; its settings say so (a --c with another
    variant is refused), and the default trainer's settings do not carry the knob (old checkpoints continue)."""
    from tskd_nnunet.trainers.distill import DistillTrainer, DistillTrainer_hard

    pre = os.path.join(use_nnunet_env["nnUNet_preprocessed"], DATASET)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)

    def make(cls):  # nnU-Net pops continue_training from the plans it is given
        return cls(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))
    hard = make(DistillTrainer_hard)
    settings = hard.training_settings()
    assert settings["kd_hard_labels"] is True and settings["kd_temperature"] == 1.0
    assert settings["kd_dice_weight"] == 1.0
    assert "kd_hard_labels" not in make(DistillTrainer).training_settings()
    hard.initialize()
    assert hard.pixel_kd.hard and hard.pixel_kd.temperature == 1.0 and hard.pixel_kd.dice_weight == 1.0
