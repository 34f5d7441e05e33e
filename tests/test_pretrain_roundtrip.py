"""The corpus keeps test and validation cases out; the commands resume; their outputs load where they
are meant to: ViT files in the teacher's create_backbone / ViTLoRATeacherTrainer, CNN files in
``nnUNetv2_train -pretrained_weights``."""
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import BIN, PHANTOM_ID, run_cmd, train_env

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _cli(func: str, args, env, expect_ok=True):
    return run_cmd([sys.executable, "-c", f"from tskd_nnunet.pretrain.cli import {func}; {func}()"] + list(args), env,
                   expect_ok=expect_ok)


def test_corpus_excludes_validation_and_pool_and_refuses_test_cases(use_nnunet_env, tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from tskd_nnunet.pretrain.corpus import PretrainCorpus, PretrainError
    pre = use_nnunet_env["nnUNet_preprocessed"]
    everything = PretrainCorpus([PHANTOM_ID], resolution=32)
    ids = sorted(i for _, i in everything.cases)
    assert len(ids) == 12
    val = generate_crossval_split(ids, seed=12345, n_splits=5)[0]["val"]
    fold0 = PretrainCorpus([PHANTOM_ID], resolution=32, fold=0)
    assert sorted(i for _, i in fold0.cases) == sorted(set(ids) - set(val))
    img = fold0.batch(2, __import__("numpy").random.default_rng(0))
    assert img.shape == (2, 3, 32, 32) and torch.equal(img[:, 0], img[:, 2])  # grey -> x3

    # a private copy of the preprocessed dataset for the pool file (the session one is shared)
    own_pre = tmp_path / "pre"
    shutil.copytree(os.path.join(pre, "Dataset990_Phantom"), own_pre / "Dataset990_Phantom")
    (own_pre / "Dataset990_Phantom" / "tskd_unlabeled_pool.json").write_text(json.dumps([ids[:3]] * 5))
    no_pool = PretrainCorpus([PHANTOM_ID], resolution=32, include_pool=False, preprocessed_root=str(own_pre))
    assert sorted(i for _, i in no_pool.cases) == ids[3:]

    # a training case id that is also in imagesTs (a test case) is a hard error naming both
    raw = tmp_path / "raw" / "Dataset990_Phantom" / "imagesTs"
    raw.mkdir(parents=True)
    (raw / f"{ids[4]}_0000.png").write_bytes(b"")
    with pytest.raises(PretrainError, match=rf"Dataset990_Phantom: case '{ids[4]}'.*test case"):
        PretrainCorpus([PHANTOM_ID], resolution=32, raw_root=str(tmp_path / "raw"))


@pytest.fixture(scope="module")
def mae_file(nnunet_env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mae") / "mae.pth")
    args = ["-d", str(PHANTOM_ID), "-c", "2d", "--arch", "vit_tiny", "--arch-overrides", json.dumps(TINY),
            "--resolution", "32", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--batch-size", "4", "--lr", "1e-3", "-device", "cpu", "--no-progress", "-o", out, "-f", "0"]
    env = dict(nnunet_env, OMP_NUM_THREADS="1")
    _cli("mae_main", args + ["--steps", "2", "--save-every", "1"], env)
    again = _cli("mae_main", args + ["--steps", "2"], env, expect_ok=False)  # no silent overwrite
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = _cli("mae_main", args + ["--steps", "4", "--resume"], env)
    assert "Resuming from" in resumed.stdout and "at step 2/4" in resumed.stdout
    return out


def test_mae_file_resumed_and_loads_as_timm_and_as_teacher_backbone(mae_file):
    import timm
    from tskd_nnunet.models.vit_backbones import create_backbone
    saved = torch.load(mae_file, weights_only=True)
    assert saved["tskd"]["steps"] == 4 and saved["tskd"]["corpus"] == {"Dataset990_Phantom": {"preprocessed": 9}}
    rows = open(mae_file[:-4] + "_loss.csv").read().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, **TINY)
    model.load_state_dict(saved["state_dict"])  # strict: exactly the timm keys
    backbone = create_backbone("vit_tiny", mae_file, 32, overrides=TINY)
    loaded = dict(backbone.named_parameters())
    key = next(k for k in loaded if k.endswith("blocks.0.attn.qkv.weight"))
    assert torch.equal(loaded[key].detach(), saved["state_dict"]["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_mae_file_is_the_foundation_of_a_lora_teacher_run(mae_file, nnunet_env, results_dir):
    env = train_env(nnunet_env, results_dir, {"TSKD_TEACHER_BACKBONE": "vit_tiny", "TSKD_TEACHER_WEIGHTS": mae_file,
                                              "TSKD_TEACHER_ARCH_OVERRIDES": json.dumps(TINY)})
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "ViTLoRATeacherTrainer_test",
                    "-device", "cpu"], env)
    assert f"Teacher: vit_tiny from {mae_file}" in proc.stdout


@pytest.mark.slow
def test_cnn_mim_file_loads_with_nnunet_pretrained_weights(nnunet_env, results_dir, tmp_path):
    out = str(tmp_path / "cnn_mim.pth")
    _cli("cnn_mim_main", [str(PHANTOM_ID), "2d", "0", "-tr", "TSKDPlainTrainer_test", "--steps", "2",
                          "--batch-size", "2", "-device", "cpu", "--no-progress", "-o", out],
         dict(nnunet_env, OMP_NUM_THREADS="1"))
    saved = torch.load(out, weights_only=True)
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "TSKDPlainTrainer_test",
                    "-device", "cpu", "-pretrained_weights", out], train_env(nnunet_env, results_dir))
    assert "Loading pretrained weights from file" in proc.stdout
    # the run started from the pretrained encoder: its first conv is the pretrained one moved by <= 2 steps
    fold = os.path.join(results_dir, "Dataset990_Phantom", "TSKDPlainTrainer_test__nnUNetPlans__2d", "fold_0")
    final = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)["network_weights"]
    k = "encoder.stages.0.0.convs.0.conv.weight"
    rel = (final[k] - saved["network_weights"][k]).norm() / saved["network_weights"][k].norm()
    assert rel < 0.5, rel
