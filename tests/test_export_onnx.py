"""ONNX export of a trained model folder and nnU-Net prediction through onnxruntime (issue #16).

One tiny plain nnU-Net (TSKDPlainTrainer_test) is trained once for the module through nnU-Net's own
command; export and prediction run as the console commands do (``python -m tskd_nnunet.export``,
the same functions as ``tskd_export`` / ``tskd_predict_onnx``).
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import BIN, PHANTOM_ID, run_cmd, train_env

DATASET = "Dataset990_Phantom"
TRAINER = "TSKDPlainTrainer_test"


def _export_cmd(*args):
    return [sys.executable, "-m", "tskd_nnunet.export", "export", *args]


def _predict_cmd(*args):
    return [sys.executable, "-m", "tskd_nnunet.export", "predict", *args]


@pytest.fixture(scope="module")
def trained(nnunet_env, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("export_results"))
    env = train_env(nnunet_env, results)
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    return env


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported") / "model")
    proc = run_cmd(_export_cmd("-d", str(PHANTOM_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-o", out, "--int8"),
                   trained)
    assert "max |ONNX - PyTorch|" in proc.stdout and "calibrated on 8 training patches" in proc.stdout
    return out


def _read_png(path):
    from PIL import Image
    return np.array(Image.open(path))


def test_export_folder_is_self_describing(trained, exported):
    model = os.path.join(trained["nnUNet_results"], DATASET, f"{TRAINER}__nnUNetPlans__2d")
    assert sorted(os.listdir(exported)) == ["dataset.json", "model.onnx", "model_int8.onnx", "plans.json",
                                            "tskd_export.json"]  # no temporary files left
    for name in ("plans.json", "dataset.json"):
        with open(os.path.join(model, name)) as a, open(os.path.join(exported, name)) as b:
            assert a.read() == b.read()
    with open(os.path.join(exported, "tskd_export.json")) as f:
        meta = json.load(f)
    assert meta["trainer_name"] == TRAINER and meta["configuration"] == "2d" and meta["fold"] == 0
    assert meta["num_input_channels"] == 1 and meta["num_output_channels"] == 2 and meta["patch_size"] == [64, 64]
    assert meta["max_abs_diff_fp32_vs_torch"] <= 1e-3 and meta["int8"]["method"] == "static"

    import onnxruntime as ort
    sess = ort.InferenceSession(os.path.join(exported, "model.onnx"), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert not isinstance(shape[0], int) and shape[1:] == [1, 64, 64]  # dynamic batch, deep supervision off
    out = sess.run(None, {"input": np.zeros((3, 1, 64, 64), np.float32)})
    assert len(out) == 1 and out[0].shape == (3, 2, 64, 64)
    assert os.path.getsize(os.path.join(exported, "model_int8.onnx")) < 0.4 * os.path.getsize(
        os.path.join(exported, "model.onnx"))


def test_onnx_prediction_equals_nnunet_predict(trained, exported, tmp_path):
    images = os.path.join(trained["nnUNet_raw"], DATASET, "imagesTs")
    ref, onnx_out, int8_out = (str(tmp_path / n) for n in ("torch", "onnx", "int8"))
    common = ["-npp", "1", "-nps", "1", "--save_probabilities"]
    run_cmd([os.path.join(BIN, "nnUNetv2_predict"), "-i", images, "-o", ref, "-d", str(PHANTOM_ID), "-c", "2d",
             "-tr", TRAINER, "-f", "0", "-device", "cpu", *common], trained)
    run_cmd(_predict_cmd("-i", images, "-o", onnx_out, "-m", exported, *common, "--disable_progress_bar"), trained)
    run_cmd(_predict_cmd("-i", images, "-o", int8_out, "-m", exported, "--int8", "--disable_tta", "-npp", "1",
                         "-nps", "1", "--disable_progress_bar"), trained)
    cases = sorted(f for f in os.listdir(images))
    assert len(cases) == 3
    for f in cases:
        case = f.replace("_0000.png", "")
        seg_t, seg_o = _read_png(os.path.join(ref, case + ".png")), _read_png(os.path.join(onnx_out, case + ".png"))
        p_t = np.load(os.path.join(ref, case + ".npz"))["probabilities"]
        p_o = np.load(os.path.join(onnx_out, case + ".npz"))["probabilities"]
        assert np.abs(p_t - p_o).max() <= 1e-3
        # identical segmentation; nnU-Net accumulates tiles in fp16, so only an exact tie of the two
        # classes (possible for this barely trained model) may go either way
        margin = np.abs(p_t[1] - p_t[0])[0]
        assert (seg_t == seg_o)[margin > 2e-3].all() and (seg_t != seg_o).sum() <= 2
        seg_q = _read_png(os.path.join(int8_out, case + ".png"))
        assert seg_q.shape == seg_t.shape and set(np.unique(seg_q)) <= {0, 1}


def test_corrupted_or_mismatched_onnx_gives_one_line_error(exported, trained, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(exported, bad)
    images = os.path.join(trained["nnUNet_raw"], DATASET, "imagesTs")
    with open(os.path.join(bad, "model.onnx"), "r+b") as f:  # truncate: a half-copied file
        f.truncate(1000)
    proc = run_cmd(_predict_cmd("-i", images, "-o", str(tmp_path / "p"), "-m", bad), trained, expect_ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert os.path.join(bad, "model.onnx") in lines[0] and "not a valid ONNX model" in lines[0]
    assert "re-export it: tskd_export" in lines[0] and f"-tr {TRAINER}" in lines[0]
    assert not os.path.exists(tmp_path / "p")

    # a network with 3 output classes where dataset.json has 2 labels
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    from tskd_nnunet.export.onnx_export import export_network
    export_network(net, 1, [64, 64], os.path.join(bad, "model.onnx"))
    proc = run_cmd(_predict_cmd("-i", images, "-o", str(tmp_path / "p"), "-m", bad), trained, expect_ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "outputs 3 class channel(s)" in lines[0] and "dataset.json needs 2" in lines[0]

    # wrong number of input channels
    export_network(torch.nn.Conv2d(2, 2, 3, padding=1), 2, [64, 64], os.path.join(bad, "model.onnx"))
    proc = run_cmd(_predict_cmd("-i", images, "-o", str(tmp_path / "p"), "-m", bad), trained, expect_ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "expects 2 input channel(s)" in lines[0] and os.path.join(bad, "dataset.json") in lines[0]

    # no int8 model in a folder exported without --int8
    os.remove(os.path.join(bad, "model_int8.onnx"))
    meta_path = os.path.join(bad, "tskd_export.json")
    meta = json.load(open(meta_path))
    del meta["models"]["int8"]
    json.dump(meta, open(meta_path, "w"))
    proc = run_cmd(_predict_cmd("-i", images, "-o", str(tmp_path / "p"), "-m", bad, "--int8"), trained,
                   expect_ok=False)
    assert proc.returncode == 1 and "holds no int8 model" in proc.stderr and "--int8" in proc.stderr


def test_export_of_missing_checkpoint_names_the_file(trained, tmp_path):
    proc = run_cmd(_export_cmd("-d", str(PHANTOM_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-chk",
                               "checkpoint_missing.pth", "-o", str(tmp_path / "x")), trained, expect_ok=False)
    lines = proc.stderr.strip().splitlines()
    ckpt = os.path.join(trained["nnUNet_results"], DATASET, f"{TRAINER}__nnUNetPlans__2d", "fold_0",
                        "checkpoint_missing.pth")
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert ckpt in lines[0] and "checkpoint_final.pth" in lines[0] and "-chk" in lines[0]
    assert not os.path.exists(tmp_path / "x")

    proc = run_cmd(_export_cmd("-d", str(PHANTOM_ID), "-c", "2d", "-f", "3", "-tr", TRAINER, "-o",
                               str(tmp_path / "x")), trained, expect_ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "fold_3" in lines[0] and "nnUNetv2_train" in lines[0]


@pytest.mark.parametrize("trainer", ["DistillTrainer_vittiny", "DistillTrainer_tiny"])
def test_students_export_and_predict_like_pytorch(trainer, use_nnunet_env, tmp_path, monkeypatch):
    """The ViT student (shrunken) and a slim U-Net student through the same export and OnnxPredictor, from a
    model folder written by hand (training would need a teacher; nnU-Net's rebuild only needs plans.json)."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tskd_nnunet.export.onnx_export import export_model_folder
    from tskd_nnunet.export.onnx_predictor import OnnxPredictor
    from tskd_nnunet.trainers import distill

    cls = getattr(distill, trainer)
    pre = os.path.join(use_nnunet_env["nnUNet_preprocessed"], DATASET)
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    cm = PlansManager(plans).get_configuration("2d")
    if trainer == "DistillTrainer_vittiny":
        monkeypatch.setenv("TSKD_STUDENT_ARCH_OVERRIDES", '{"depth": 2, "embed_dim": 64, "num_heads": 2}')
        plans[distill.STUDENT_PLANS_KEY] = cls.student_spec_from_env(cm.patch_size).to_dict()
        monkeypatch.delenv("TSKD_STUDENT_ARCH_OVERRIDES")  # the rebuild reads plans.json only
    folder = tmp_path / DATASET / f"{trainer}__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    json.dump(plans, open(folder / "plans.json", "w"))
    shutil.copyfile(os.path.join(pre, "dataset.json"), folder / "dataset.json")
    torch.manual_seed(0)
    net = cls.build_network_architecture(PlansManager(plans), cm, 1, 2, enable_deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer, "init_args": {"configuration": "2d"},
                "inference_allowed_mirroring_axes": (0, 1)}, folder / "fold_0" / "checkpoint_final.pth")

    out = str(tmp_path / "exported")
    meta = export_model_folder(str(folder), out, 0, int8=True, preprocessed_dataset_folder=pre, verbose=False)
    assert meta["trainer_name"] == trainer and meta["max_abs_diff_fp32_vs_torch"] <= 1e-3
    assert meta["parameters"] == sum(p.numel() for p in net.parameters())

    img_file = os.path.join(use_nnunet_env["nnUNet_raw"], DATASET, "imagesTs", "phantom_ts000_0000.png")
    img, props = NaturalImage2DIO().read_images([img_file])
    tp = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    tp.initialize_from_trained_model_folder(str(folder), (0,))
    _, prob_t = tp.predict_single_npy_array(img, props, None, None, True)
    for int8 in (False, True):
        p = OnnxPredictor(use_mirroring=True, allow_tqdm=False, threads=1)
        p.initialize_from_exported_folder(out, int8=int8)
        seg, prob = p.predict_single_npy_array(img, props, None, None, True)
        assert seg.shape == img.shape[1:] and prob.shape == prob_t.shape
        if not int8:
            assert np.abs(prob_t - prob).max() <= 1e-3
