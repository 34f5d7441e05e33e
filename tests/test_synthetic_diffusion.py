"""Diffusion-generated transfer set: train on one fold's training cases, sample, write the extension.

Runs on a private copy of the phantom's preprocessed folder (the extension written here must not be
seen by other tests), with a tiny model: (8, 16) channels at 16x16, a few steps.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PHANTOM_ID, REPO, run_cmd

DS = "Dataset990_Phantom"
TINY = dict(steps=3, resolution=16, batch_size=2, checkpoint_every=2, grid_every=3, grid_images=2,
            grid_inference_steps=2, block_out_channels=(8, 16), seed=0)


def isolated_copy(nnunet_env, root) -> dict:
    """nnU-Net env with a private copy of the phantom's preprocessed dataset and empty results."""
    pre = os.path.join(root, "nnUNet_preprocessed")
    shutil.copytree(os.path.join(nnunet_env["nnUNet_preprocessed"], DS), os.path.join(pre, DS),
                    ignore=shutil.ignore_patterns("tskd_extension", "splits_final.json", "tskd_unlabeled_pool.json"))
    env = dict(nnunet_env, nnUNet_preprocessed=pre, nnUNet_results=os.path.join(root, "nnUNet_results"),
               OMP_NUM_THREADS="1")  # tiny models on a shared 2-core machine: threads only spin
    os.makedirs(env["nnUNet_results"], exist_ok=True)
    return env


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def syn(one_thread, nnunet_env, tmp_path_factory):
    """Label budget on fold 0 (6 labeled + 3 pool), a tiny trained diffusion model, and the ids it loaded."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    env = isolated_copy(nnunet_env, str(tmp_path_factory.mktemp("syn")))
    base = os.path.join(env["nnUNet_preprocessed"], DS)
    ids = sorted(nnUNetDatasetBlosc2.get_identifiers(os.path.join(base, "nnUNetPlans_2d")))
    splits = generate_crossval_split(ids, seed=12345, n_splits=5)
    labeled, pool = splits[0]["train"][:6], splits[0]["train"][6:]
    splits[0]["train"] = labeled
    with open(os.path.join(base, "splits_final.json"), "w") as f:
        json.dump(splits, f)
    with open(os.path.join(base, "tskd_unlabeled_pool.json"), "w") as f:
        json.dump([pool] + [[] for _ in splits[1:]], f)

    loaded = []
    original = nnUNetDatasetBlosc2.load_case
    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(k, env[k])

        def spy(self, identifier):
            loaded.append(identifier)
            return original(self, identifier)
        mp.setattr(nnUNetDatasetBlosc2, "load_case", spy)
        from tskd_nnunet.synthetic.train import DiffusionTrainSettings, train_diffusion
        final = train_diffusion(PHANTOM_ID, "2d", 0, settings=DiffusionTrainSettings(**TINY), progress=False)
    yield dict(env=env, final=final, labeled=labeled, pool=pool, val=splits[0]["val"], loaded=set(loaded),
               folder=os.path.dirname(final))


@pytest.fixture
def in_env(syn, monkeypatch):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, syn["env"][k])
    return syn


def test_generator_saw_only_the_folds_training_cases(syn):
    from tskd_nnunet.synthetic.model import load_checkpoint
    ck = load_checkpoint(syn["final"])
    expected = sorted(syn["labeled"] + syn["pool"])
    assert ck["case_ids"] == expected                      # recorded in the checkpoint
    assert syn["loaded"] == set(expected)                  # and exactly what was read from disk
    assert not set(ck["case_ids"]) & set(syn["val"]) and len(syn["val"]) > 0
    raw_test = os.listdir(os.path.join(syn["env"]["nnUNet_raw"], DS, "imagesTs"))
    assert not {f.rsplit("_", 1)[0] for f in raw_test} & syn["loaded"]


def test_pool_flag_off_uses_labeled_cases_only(in_env):
    from tskd_nnunet.synthetic.cases import fold_case_ids
    ids = fold_case_ids(PHANTOM_ID, "nnUNetPlans", "2d", 0, include_unlabeled_pool=False)
    assert ids["used"] == sorted(in_env["labeled"]) and ids["pool"] == []


def test_training_writes_checkpoints_grid_and_resumes_exactly(in_env, tmp_path, monkeypatch):
    from PIL import Image
    from tskd_nnunet.synthetic.model import load_checkpoint
    from tskd_nnunet.synthetic.train import DiffusionTrainSettings, train_diffusion
    folder = in_env["folder"]
    assert {"checkpoint_latest.pth", "checkpoint_final.pth", "progress_grid.png"} <= set(os.listdir(folder))
    assert Image.open(os.path.join(folder, "progress_grid.png")).size[0] > 16
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp")]

    # resume 3 -> 5 steps vs. 5 steps straight in another results folder: same weights
    seconds_before = load_checkpoint(os.path.join(folder, "checkpoint_latest.pth"))["train_seconds"]  # resumed from
    resumed = load_checkpoint(train_diffusion(PHANTOM_ID, "2d", 0, progress=False,
                                              settings=DiffusionTrainSettings(**dict(TINY, steps=5))))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    straight = load_checkpoint(train_diffusion(PHANTOM_ID, "2d", 0, progress=False,
                                               settings=DiffusionTrainSettings(**dict(TINY, steps=5))))
    assert resumed["step"] == straight["step"] == 5
    assert resumed["train_seconds"] > seconds_before > 0  # training time adds up over invocations
    for k, v in straight["unet"].items():
        torch.testing.assert_close(resumed["unet"][k], v, msg=k)
    for a, b in zip(resumed["ema"]["shadow_params"], straight["ema"]["shadow_params"]):
        torch.testing.assert_close(a, b)


def test_resume_refuses_other_architecture(in_env):
    from tskd_nnunet.synthetic.model import DiffusionCheckpointError
    from tskd_nnunet.synthetic.train import DiffusionTrainSettings, train_diffusion
    with pytest.raises(DiffusionCheckpointError, match="resolution"):
        train_diffusion(PHANTOM_ID, "2d", 0, settings=DiffusionTrainSettings(**dict(TINY, resolution=32)),
                        progress=False)


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "unipc"])
def test_same_seed_gives_same_images_whatever_the_batching(in_env, sampler):
    from tskd_nnunet.synthetic.sample import SyntheticGenerator
    gen = SyntheticGenerator(in_env["final"], sampler, inference_steps=3)
    a = gen.generate(7, [0, 1, 2])
    b = gen.generate(7, [0, 1, 2])
    assert a.shape == (3, 1, 64, 64) and a.dtype == np.float32   # upsampled 16 -> patch size 64
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.concatenate([gen.generate(7, [0]), gen.generate(7, [1, 2])]), a, atol=1e-4)
    assert np.abs(gen.generate(8, [0]) - a[:1]).mean() > 1e-3
    assert np.abs(a[0] - a[1]).mean() > 1e-3
    gen.channels_last = False  # the sampling layout changes speed, not the images
    np.testing.assert_allclose(gen.generate(7, [0, 1, 2]), a, atol=1e-4)
    assert next(gen.unet.parameters()).is_contiguous()  # the model keeps its layout after sampling


def test_sample_command_writes_an_extension_nnunet_reads(in_env):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tskd_nnunet.data.extension import extension_folder, list_extension_cases
    from tskd_nnunet.synthetic.model import sha256_of
    from tskd_nnunet.synthetic.sample import SyntheticGenerator

    run_cmd([sys.executable, "-m", "tskd_nnunet.synthetic.sample", str(PHANTOM_ID), "2d", "0", "-n", "4",
             "--steps", "3", "--seed", "5", "--batch-size", "3", "-device", "cpu"], in_env["env"])
    folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "synthetic")
    assert folder.endswith(os.path.join(DS, "tskd_extension", "nnUNetPlans_2d", "fold_0", "synthetic"))
    ids = list_extension_cases(folder)
    assert ids == [f"syn_s5_{i:05d}" for i in range(4)]

    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    run = manifest["runs"][-1]
    assert (run["seed"], run["sampler"], run["inference_steps"], run["count"], run["written"]) == (5, "ddim", 3, 4, 4)
    assert run["checkpoint_sha256"] == sha256_of(in_env["final"]) and run["resolution"] == [16, 16]
    assert (run["resize"], run["upsampled_to"], run["working_resolution"]) == ("bilinear", [64, 64], [64, 64])
    assert run["training_case_ids"] == sorted(in_env["labeled"] + in_env["pool"])
    q = manifest["quality"]
    # default feature space: the packaged LiteMedSAM encoder (fixed, comparable across runs)
    assert q["feature_extractor"] == "litemedsam_encoder" and np.isfinite(q["kid_mean"]) and q["fd"] >= 0
    assert os.path.isfile(os.path.join(folder, q["grid_png"]))

    # nnU-Net's own dataset class and dataloader read the cases; the images are the generator's
    base = os.path.join(in_env["env"]["nnUNet_preprocessed"], DS)
    ds = infer_dataset_class(os.path.join(base, "nnUNetPlans_2d"))(folder)
    assert sorted(ds.identifiers) == ids
    data, seg, _, props = ds.load_case(ids[1])
    assert data.shape == (1, 1, 64, 64) and not np.asarray(seg[:]).any()
    expected = SyntheticGenerator(in_env["final"], "ddim", 3).generate(5, [1])[0]
    np.testing.assert_allclose(np.asarray(data[:, 0]), expected, atol=1e-5)
    real_props = __import__("pickle").load(open(os.path.join(base, "nnUNetPlans_2d", in_env["labeled"][0] + ".pkl"), "rb"))
    assert set(real_props) <= set(props) and set(props["class_locations"]) == set(real_props["class_locations"])

    pm = PlansManager(os.path.join(base, "nnUNetPlans.json"))
    with open(os.path.join(base, "dataset.json")) as f:
        lm = pm.get_label_manager(json.load(f))
    dl = nnUNetDataLoader(ds, 2, (64, 64), (64, 64), lm, oversample_foreground_percent=1.0)
    batch = dl.generate_train_batch()
    assert tuple(batch["data"].shape) == (2, 1, 64, 64) and set(batch["keys"]) <= set(ids)


CRASH_SCRIPT = """
import os, sys
import tskd_nnunet.data.extension as ext
real_replace, moved = os.replace, []
def dying_replace(src, dst):
    real_replace(src, dst)
    if not os.path.basename(dst).startswith(('.tmp', 'manifest')):
        moved.append(dst)
        if len(moved) == 4:      # case 0 complete (3 files), one file of case 1 moved
            os._exit(3)          # a killed process: no cleanup, no exception handlers
ext.os.replace = dying_replace
from tskd_nnunet.synthetic.sample import sample_to_extension
sample_to_extension(990, '2d', 0, 3, inference_steps=2, seed=11, batch_size=3, progress=False)
"""


def test_killed_write_leaves_no_partial_case_and_rerun_completes(in_env):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from tskd_nnunet.data.extension import extension_folder, list_extension_cases
    from tskd_nnunet.synthetic.sample import SyntheticGenerator, sample_to_extension

    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], env=in_env["env"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "synthetic")
    mine = lambda names: sorted(n for n in names if n.startswith("syn_s11_"))  # noqa: E731
    assert len(mine(os.listdir(folder))) == 4                      # an orphan side file is on disk ...
    assert mine(list_extension_cases(folder)) == ["syn_s11_00000"]  # ... but no partial case is visible,
    assert mine(nnUNetDatasetBlosc2.get_identifiers(folder)) == ["syn_s11_00000"]  # not even to nnU-Net
    assert [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".tmp_synthetic")]  # dead temp folder

    sample_to_extension(PHANTOM_ID, "2d", 0, 3, inference_steps=2, seed=11, batch_size=3, progress=False)
    assert mine(list_extension_cases(folder)) == [f"syn_s11_{i:05d}" for i in range(3)]
    assert len(mine(os.listdir(folder))) == 9
    assert not [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".tmp")]
    ds = nnUNetDatasetBlosc2(folder, ["syn_s11_00001"])
    np.testing.assert_allclose(np.asarray(ds.load_case("syn_s11_00001")[0][:, 0]),
                               SyntheticGenerator(in_env["final"], "ddim", 2).generate(11, [1])[0], atol=1e-5)


def test_sampling_refuses_a_seed_made_with_other_settings(in_env):
    from tskd_nnunet.data.extension import ExtensionError
    from tskd_nnunet.synthetic.sample import sample_to_extension
    sample_to_extension(PHANTOM_ID, "2d", 0, 1, inference_steps=2, seed=21, progress=False)
    with pytest.raises(ExtensionError, match="seed 21"):
        sample_to_extension(PHANTOM_ID, "2d", 0, 1, inference_steps=2, seed=21, sampler="dpm", progress=False)


def test_train_command_reports_bad_fold_in_one_line(in_env):
    proc = run_cmd([sys.executable, "-m", "tskd_nnunet.synthetic.train", str(PHANTOM_ID), "2d", "7", "--steps", "1"],
                   in_env["env"], expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "fold 7 does not exist" in proc.stderr


@pytest.fixture
def synthetic_cases(in_env):
    """At least 4 synthetic cases in fold 0's extension, whatever ran before (seed 61 of the tiny model)."""
    from tskd_nnunet.data.extension import extension_folder, list_extension_cases
    from tskd_nnunet.synthetic.sample import sample_to_extension
    sample_to_extension(PHANTOM_ID, "2d", 0, 4, inference_steps=2, seed=61, batch_size=4, progress=False)
    folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "synthetic")
    assert len([i for i in list_extension_cases(folder) if i.startswith("syn_s61_")]) == 4
    return list_extension_cases(folder)


def test_distill_trainer_trains_on_the_synthetic_mix_through_nnunet(in_env, synthetic_cases):
    """Teacher (plain nnU-Net) + DistillTrainer_syn_test via the real nnUNetv2_train on labeled + synthetic."""
    from conftest import BIN, train_env
    n_syn = len(synthetic_cases)
    assert n_syn >= 4
    env = train_env(in_env["env"], in_env["env"]["nnUNet_results"])
    train = [os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-device", "cpu", "-tr"]
    run_cmd(train + ["TSKDPlainTrainer_test"], env)
    proc = run_cmd(train + ["DistillTrainer_syn_test"],
                   dict(env, TSKD_TEACHER_TRAINER="TSKDPlainTrainer_test", TSKD_UNLABELED_FRACTION="0.9"))
    out = proc.stdout
    assert f"Transfer set: 6 labeled, 0 pool, {n_syn} synthetic, 0 real-unlabeled" in out
    seen = [l.split("cases seen so far: ")[1] for l in out.splitlines() if "cases seen so far" in l]
    assert len(seen) == 2  # one running count per epoch (schedule 2 epochs x 2 iterations, batch size 2)
    real = int(seen[-1].split()[1])
    synthetic = int(seen[-1].rsplit("synthetic ", 1)[1])
    assert real + synthetic == 2 * 2 * 2 and synthetic > 0   # P(no synthetic draw at 0.9) = 1e-8
    assert "kd " in out


# ----------------------------------------------------------------------------- provenance
def _write_split(base, splits, pool):
    with open(os.path.join(base, "splits_final.json"), "w") as f:
        json.dump(splits, f)
    with open(os.path.join(base, "tskd_unlabeled_pool.json"), "w") as f:
        json.dump(pool, f)


def test_generator_trained_on_a_now_validation_case_is_refused_at_sampling_and_distillation(in_env):
    """A label budget set after the generator was trained moves one of its training cases to validation:
    sampling refuses the checkpoint, and the transfer set refuses the extension sampled before."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from tskd_nnunet.data.extension import extension_folder
    from tskd_nnunet.data.transfer_set import TransferSetError, build_transfer_set
    from tskd_nnunet.synthetic.model import DiffusionCheckpointError
    from tskd_nnunet.synthetic.sample import sample_to_extension

    sample_to_extension(PHANTOM_ID, "2d", 0, 1, inference_steps=2, seed=41, progress=False)  # under the old split
    base = os.path.join(in_env["env"]["nnUNet_preprocessed"], DS)
    main = os.path.join(base, "nnUNetPlans_2d")
    saved = {n: open(os.path.join(base, n)).read() for n in ("splits_final.json", "tskd_unlabeled_pool.json")}
    splits = json.loads(saved["splits_final.json"])
    moved = in_env["pool"][0]                      # a generator training case ...
    pool = [c for c in in_env["pool"] if c != moved]
    splits[0]["val"] = splits[0]["val"] + [moved]  # ... is now a validation case
    try:
        _write_split(base, splits, [pool] + [[] for _ in splits[1:]])
        with pytest.raises(DiffusionCheckpointError) as e:
            sample_to_extension(PHANTOM_ID, "2d", 0, 2, inference_steps=2, seed=42, progress=False)
        msg = str(e.value)
        assert "\n" not in msg and in_env["final"] in msg and os.path.join(base, "splits_final.json") in msg
        assert moved in msg and "validation case(s) of fold 0" in msg and "Fix: retrain the generator" in msg
        assert not [c for c in os.listdir(extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "synthetic"))
                    if c.startswith("syn_s42_")]

        proc = run_cmd([sys.executable, "-m", "tskd_nnunet.synthetic.sample", str(PHANTOM_ID), "2d", "0", "-n", "1",
                        "--steps", "2", "--seed", "43", "--no-quality", "-device", "cpu"], in_env["env"],
                       expect_ok=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert err[-1].startswith("tskd_sample_diffusion: checkpoint ") and "splits_final.json" in err[-1]

        with pytest.raises(TransferSetError) as e:   # what DistillTrainer calls with the current split
            build_transfer_set(base, main, "nnUNetPlans", "2d", 0, splits[0]["train"], splits[0]["val"], set(),
                               nnUNetDatasetBlosc2.get_identifiers(main))
        msg = str(e.value)
        ext = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "synthetic")
        assert "\n" not in msg and os.path.join(ext, "manifest.json") in msg
        assert os.path.join(base, "splits_final.json") in msg and moved in msg and "Fix: delete" in msg
    finally:
        for n, text in saved.items():
            with open(os.path.join(base, n), "w") as f:
                f.write(text)
    # the original split: both pass again
    build_transfer_set(base, main, "nnUNetPlans", "2d", 0, in_env["labeled"], in_env["val"], set(),
                       nnUNetDatasetBlosc2.get_identifiers(main))


def test_generator_with_a_test_case_is_refused(in_env, monkeypatch):
    """A generator whose recorded ids include an imagesTs case is refused too (checked on the ids)."""
    from tskd_nnunet.synthetic.model import DiffusionCheckpointError
    from tskd_nnunet.synthetic.sample import check_generator_provenance
    test_case = sorted(os.listdir(os.path.join(in_env["env"]["nnUNet_raw"], DS, "imagesTs")))[0].rsplit("_", 1)[0]
    check_generator_provenance(PHANTOM_ID, 0, in_env["final"], in_env["labeled"])  # training ids: fine
    with pytest.raises(DiffusionCheckpointError, match=rf"test case\(s\) in imagesTs \({test_case}\)"):
        check_generator_provenance(PHANTOM_ID, 0, in_env["final"], in_env["labeled"] + [test_case])


def test_no_command_writes_a_split(nnunet_env, tmp_path, monkeypatch):
    """Without splits_final.json the generator commands say so in one line, and write none."""
    from tskd_nnunet.synthetic import sample, train
    env = isolated_copy(nnunet_env, str(tmp_path))   # the copy has no splits_final.json
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    splits_file = os.path.join(env["nnUNet_preprocessed"], DS, "splits_final.json")
    for prog, argv in ((train, [str(PHANTOM_ID), "2d", "0", "--steps", "1"]),
                       (sample, [str(PHANTOM_ID), "2d", "0", "-n", "1", "--checkpoint", str(tmp_path / "x.pth")])):
        if prog is sample:   # a checkpoint that names this dataset/fold, so only the split is missing
            _fake_checkpoint(str(tmp_path / "x.pth"))
        with pytest.raises(SystemExit) as e:
            prog.main(argv)
        msg = str(e.value.code)
        assert "\n" not in msg and f"{splits_file} does not exist" in msg
        assert "nnUNetv2_train once" in msg and "tskd_label_budget" in msg
        assert not os.path.exists(splits_file)


def _fake_checkpoint(path):
    """The tiny module checkpoint is not available here: build a minimal one of the same format."""
    from tskd_nnunet.synthetic.model import build_train_scheduler, build_unet, save_atomic
    unet = build_unet(1, (16, 16), (8, 16), attention=False)
    save_atomic({"unet_config": dict(unet.config), "unet": unet.state_dict(),
                 "ema": {"shadow_params": [p.detach().clone() for p in unet.parameters()]}, "step": 1,
                 "train_scheduler_config": dict(build_train_scheduler().config),
                 "intensity_map": {"lo": [-1.0], "hi": [1.0]}, "sample_shape": [16, 16], "patch_size": [64, 64],
                 "scale": 0.25, "dataset": DS, "plans": "nnUNetPlans", "configuration": "2d", "fold": 0,
                 "case_ids": ["phantom_tr000"]}, path)


# ----------------------------------------------------------------------------- working resolution
def test_scaled_shape_at_the_working_resolution_never_resamples():
    from tskd_nnunet.synthetic.cases import scaled_shape
    from tskd_nnunet.synthetic.sample import resize_mode
    assert scaled_shape((64, 64), 64, 2) == ((64, 64), 1.0)
    assert scaled_shape((60, 64), 64, 8) == ((64, 64), 1.0)      # a side rounded up, then centre-cropped
    assert resize_mode((64, 64), (60, 64), 1.0) == "crop" and resize_mode((64, 64), (64, 64), 1.0) == "none"
    assert scaled_shape((64, 64), 16, 2) == ((16, 16), 0.25) and resize_mode((16, 16), (64, 64), 0.25) == "bilinear"


def test_default_resolution_is_the_patch_size_and_cases_load_at_it(in_env, tmp_path, monkeypatch):
    """No --resolution: the generator learns 64x64 (the phantom's patch size); the written cases are its
    samples as they are (no upsampling), load through nnU-Net's dataloader at 64x64, and a seed gives
    identical arrays."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from tskd_nnunet.data.extension import extension_folder, read_manifest
    from tskd_nnunet.synthetic.model import load_checkpoint
    from tskd_nnunet.synthetic.sample import SyntheticGenerator, sample_to_extension
    from tskd_nnunet.synthetic.train import DiffusionTrainSettings, train_diffusion

    monkeypatch.setenv("nnUNet_results", str(tmp_path))   # keep the module's 16x16 generator
    settings = DiffusionTrainSettings(**dict(TINY, steps=2, resolution=None, attention=False))
    final = train_diffusion(PHANTOM_ID, "2d", 0, settings=settings, progress=False)
    ck = load_checkpoint(final)
    assert ck["sample_shape"] == ck["patch_size"] == [64, 64] and ck["settings"]["resolution"] == 64
    assert ck["scale"] == 1.0

    sample_to_extension(PHANTOM_ID, "2d", 0, 3, inference_steps=2, seed=51, batch_size=2, checkpoint=final,
                        progress=False)
    folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "synthetic")
    run = next(r for r in read_manifest(folder)["runs"] if r["seed"] == 51)
    assert (run["resolution"], run["working_resolution"], run["resize"], run["upsampled_to"]) == \
        ([64, 64], [64, 64], "none", None)

    gen = SyntheticGenerator(final, "ddim", 2)
    batches = ([0, 1], [2])   # as sample_to_extension batched them (batch size 2): bit-identical arrays
    raw = np.concatenate([gen.imap.to_normalised(gen._sample(51, b).float()).numpy() for b in batches])
    a = np.concatenate([gen.generate(51, b) for b in batches])
    np.testing.assert_array_equal(a, np.concatenate([gen.generate(51, b) for b in batches]))  # same seed
    np.testing.assert_array_equal(a, raw)                                     # the model's pixels, not resampled
    ids = [f"syn_s51_{i:05d}" for i in range(3)]
    ds = nnUNetDatasetBlosc2(folder, ids)
    for i, c in enumerate(ids):
        data = np.asarray(ds.load_case(c)[0][:])
        assert data.shape == (1, 1, 64, 64)
        np.testing.assert_array_equal(data[:, 0], a[i])
    dl = nnUNetDataLoader(ds, 2, (64, 64), (64, 64), LabelManager({"background": 0, "head": 1}, None),
                          oversample_foreground_percent=0.0)
    batch = dl.generate_train_batch()
    assert tuple(batch["data"].shape) == (2, 1, 64, 64) and set(batch["keys"]) <= set(ids)


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "unipc"])
def test_few_step_solvers_stay_bounded_on_the_cosine_schedule(sampler):
    """The cosine schedule's first timestep has alpha_bar ~ 2e-9: a trained model's eps error of ~0.04 makes the x0
    estimate ~800. DDIM clips x0 (clip_sample); the multistep solvers must too, or the first step throws the sample
    to |x| ~ 100 and every image ends as +-1 noise (what the benchmark's UniPC images were before)."""
    from tskd_nnunet.synthetic.model import build_sampling_scheduler, build_train_scheduler

    sched = build_sampling_scheduler(sampler, dict(build_train_scheduler().config))
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=g)
    eps = x + 0.04 * torch.randn(x.shape, generator=g)  # nearly right at the noisiest step, as a trained model is
    out = sched.step(eps, sched.timesteps[0], x).prev_sample
    assert out.abs().max() < 5, f"{sampler}: first step to |x| = {out.abs().max():.1f}"
