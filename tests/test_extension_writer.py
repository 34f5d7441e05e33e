"""The transfer-set extension: layout, atomic writes, nnU-Net formats, real unlabeled preprocessing."""
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest

from conftest import PHANTOM_ID, run_cmd
from test_synthetic_diffusion import DS, isolated_copy


@pytest.fixture(scope="module")
def ext_env(nnunet_env, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ext"))
    env = isolated_copy(nnunet_env, root)
    raw = os.path.join(root, "nnUNet_raw")
    shutil.copytree(os.path.join(nnunet_env["nnUNet_raw"], DS), os.path.join(raw, DS))
    env["nnUNet_raw"] = raw
    return env


@pytest.fixture
def in_ext(ext_env, monkeypatch):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, ext_env[k])
    return ext_env


def test_layout_and_bad_source(in_ext):
    from tskd_nnunet.data.extension import ExtensionError, extension_folder, list_extension_cases
    folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 3, "unlabeled")
    assert folder == os.path.join(in_ext["nnUNet_preprocessed"], DS, "tskd_extension", "nnUNetPlans_2d", "fold_3",
                                  "unlabeled")
    assert extension_folder(DS, "nnUNetPlans", "2d", "all", "synthetic").endswith(os.path.join("fold_all", "synthetic"))
    assert list_extension_cases(folder) == []
    with pytest.raises(ExtensionError, match="unknown extension source 'fake'"):
        extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "fake")


def _writer(fold=1):
    from tskd_nnunet.data.extension import ExtensionWriter
    return ExtensionWriter(PHANTOM_ID, "nnUNetPlans", "2d", fold, "synthetic")


def test_crash_inside_save_leaves_nothing_and_orphans_are_cleaned(in_ext, monkeypatch):
    from tskd_nnunet.data.extension import list_extension_cases
    w = _writer(1)
    real_save = w.dataset_class.save_case

    def save_then_die(data, seg, props, truncated, **kw):
        real_save(data, seg, props, truncated, **kw)
        raise OSError("disk full (simulated)")
    with monkeypatch.context() as mp:
        mp.setattr(w.dataset_class, "save_case", staticmethod(save_then_die))
        with pytest.raises(OSError, match="simulated"):
            w.write_case("syn_crash", np.ones((1, 1, 64, 64), np.float32))
    assert not [n for n in os.listdir(w.folder) if n.startswith("syn_crash")]
    assert not [n for n in os.listdir(os.path.dirname(w.folder)) if n.startswith(".tmp")]

    # orphans of a killed writer (side files without the data file) are invisible, then removed
    w.write_case("syn_ok", np.ones((1, 1, 64, 64), np.float32))
    os.remove(os.path.join(w.folder, "syn_ok.b2nd"))
    shutil.copy(os.path.join(w.folder, "syn_ok.pkl"), os.path.join(w.folder, "syn_half.pkl"))
    assert list_extension_cases(w.folder) == []
    removed = _writer(1).cleanup_partial() + sorted(set(os.listdir(w.folder)) - {"manifest.json"})
    assert not [n for n in os.listdir(w.folder) if n.startswith("syn_")], removed


def test_cases_mirror_real_properties_and_load_in_both_formats(in_ext, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
    from tskd_nnunet.data.extension import ExtensionError, list_extension_cases
    w = _writer(2)
    data = np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32)
    w.write_case("syn_b", data)
    real = pickle.load(open(os.path.join(w.preprocessed_folder, sorted(
        f for f in os.listdir(w.preprocessed_folder) if f.endswith(".pkl"))[0]), "rb"))
    d, seg, _, props = nnUNetDatasetBlosc2(w.folder).load_case("syn_b")
    np.testing.assert_array_equal(np.asarray(d[:]), data)
    assert np.asarray(seg[:]).dtype == np.int16 and not np.asarray(seg[:]).any()
    assert set(real) <= set(props) and props["class_locations"].keys() == real["class_locations"].keys()
    assert all(len(v) == 0 for v in props["class_locations"].values())
    assert props["shape_after_cropping_and_before_resampling"] == (1, 64, 64)

    monkeypatch.setattr(w, "dataset_class", nnUNetDatasetNumpy)  # a plans whose data is .npz
    w.write_case("syn_n", data)
    assert {"syn_n.npz", "syn_n.pkl"} <= set(os.listdir(w.folder))
    assert list_extension_cases(w.folder) == ["syn_b", "syn_n"]
    np.testing.assert_array_equal(nnUNetDatasetNumpy(w.folder, ["syn_n"]).load_case("syn_n")[0], data)

    with pytest.raises(ExtensionError, match="must start with 'syn_'"):
        w.write_case("case1", data)
    with pytest.raises(ExtensionError, match="channels"):
        w.write_case("syn_c", np.zeros((2, 1, 64, 64), np.float32))


def test_unlabeled_images_are_preprocessed_exactly_as_nnunet_does(in_ext):
    """Two training images copied (renamed) into imagesUnlabeled come out identical to nnU-Net's own
    preprocessing of them, in every fold folder; a re-run resumes; test-case names are refused."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from tskd_nnunet.data.extension import extension_folder, list_extension_cases
    raw = os.path.join(in_ext["nnUNet_raw"], DS)
    unl = os.path.join(raw, "imagesUnlabeled")
    os.makedirs(unl)
    for i in (0, 1):
        shutil.copy(os.path.join(raw, "imagesTr", f"phantom_tr00{i}_0000.png"), os.path.join(unl, f"u{i}_0000.png"))
    cmd = [sys.executable, "-m", "tskd_nnunet.data.unlabeled", str(PHANTOM_ID), "-c", "2d", "--fold", "all"]
    out = run_cmd(cmd, in_ext).stdout
    assert "Preprocessing 2 of 2" in out
    for fold in (0, 4, "all"):
        folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", fold, "unlabeled")
        assert list_extension_cases(folder) == ["unl_u0", "unl_u1"]
        with open(os.path.join(folder, "manifest.json")) as f:
            assert json.load(f)["preprocessor"] == "DefaultPreprocessor"
    folder = extension_folder(PHANTOM_ID, "nnUNetPlans", "2d", 0, "unlabeled")
    mine = nnUNetDatasetBlosc2(folder).load_case("unl_u1")
    ref = nnUNetDatasetBlosc2(os.path.join(in_ext["nnUNet_preprocessed"], DS, "nnUNetPlans_2d")).load_case(
        "phantom_tr001")
    np.testing.assert_array_equal(np.asarray(mine[0][:]), np.asarray(ref[0][:]))
    assert not np.asarray(mine[1][:]).any() and mine[3]["spacing"] == ref[3]["spacing"]
    assert all(len(v) == 0 for v in mine[3]["class_locations"].values())
    assert "Preprocessing 0 of 2" in run_cmd(cmd, in_ext).stdout

    test_name = sorted(os.listdir(os.path.join(raw, "imagesTs")))[0]
    shutil.copy(os.path.join(raw, "imagesTs", test_name), os.path.join(unl, test_name))
    proc = run_cmd(cmd, in_ext, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "names of test cases" in proc.stderr and test_name.rsplit("_", 1)[0] in proc.stderr


def test_unlabeled_input_errors_are_one_line(in_ext, tmp_path):
    from tskd_nnunet.data.extension import ExtensionError
    from tskd_nnunet.data.unlabeled import find_unlabeled_cases
    with pytest.raises(ExtensionError, match="does not exist"):
        find_unlabeled_cases(str(tmp_path / "nope"), ".png", 1)
    (tmp_path / "a_0001.png").write_bytes(b"")
    with pytest.raises(ExtensionError, match="channel files"):
        find_unlabeled_cases(str(tmp_path), ".png", 1)
    (tmp_path / "a_0001.png").unlink()
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ExtensionError, match="no images named"):
        find_unlabeled_cases(str(tmp_path), ".png", 1)
