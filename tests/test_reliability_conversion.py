"""Nothing silent, round two (issue #32): conversion, evaluation, label budgets.

Every test here pins one row of "Round two: conversion, evaluation, label budgets" in
documentation/reliability.md; each one failed on main before the change (a silent exit 0, a misleading
message or a traceback). All names contain "reliability" (``pytest -k reliability``).
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dataset_conversion import convert_folder, label_budget
from dataset_conversion.convert_folder import MAX_AUTO_LABELS
from tskd_nnunet.evaluation.cli import main as evaluate_main
from tskd_nnunet.evaluation.evaluate import EvaluationInputError, evaluate_folders


@pytest.fixture
def env(empty_nnunet_env):
    return empty_nnunet_env


SIZE = (24, 28)


def square_mask(i: int, value: int = 255) -> np.ndarray:
    m = np.zeros(SIZE, np.uint8)
    m[3:9, 4:10 + i] = value
    return m


def make_pngs(root: Path, n: int, mask_values=None, names=None) -> None:
    """n random grey PNG images and square masks (value per case from ``mask_values``, default 255)."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = names or [f"img{i}" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, SIZE).astype(np.uint8)).save(root / "images" / f"{name}.png")
        value = mask_values[i] if mask_values else 255
        Image.fromarray(square_mask(i, value)).save(root / "masks" / f"{name}.png")


def write_nii(arr: np.ndarray, path: Path, spacing=None, origin=None, direction=None) -> None:
    img = sitk.GetImageFromArray(arr)
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def convert(env, *extra, images=None, masks=None, d="640", n="Two"):
    return convert_folder.main(["--images", str(images or env / "src/images"), "--masks",
                                str(masks or env / "src/masks"), "-d", d, "--name", n, *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def nothing_written(env) -> bool:
    return not list((env / "nnUNet_raw").iterdir())


# ---- masks that cannot be label maps --------------------------------------------------------------------
def test_reliability_intensity_images_as_masks_are_refused(env, capsys):
    # before: every grey value became a label (200 labels from a copy of the images), exit 0
    make_pngs(env / "src", 3)
    shutil.copytree(env / "src/images", env / "src/copies")
    assert convert(env, masks=env / "src/copies") == 2
    err = one_line_error(capsys)
    assert "distinct values" in err and f"more than {MAX_AUTO_LABELS}" in err and "--labels" in err
    assert "copies" in err
    assert convert(env, masks=env / "src/images") == 2  # the same folder twice
    err = one_line_error(capsys)
    assert "--masks" in err and "same folder as --images" in err
    assert nothing_written(env)


def test_reliability_jpeg_masks_are_refused_unless_labels_map_every_value(env, capsys):
    # before: JPEG artefacts around the edges became extra labels, exit 0
    make_pngs(env / "src", 3)
    for f in sorted((env / "src/masks").iterdir()):
        Image.open(f).save(f.with_suffix(".jpg"), quality=75)
        f.unlink()
    assert convert(env) == 2
    err = one_line_error(capsys)
    assert "img0.jpg" in err and "lossy" in err and "PNG" in err and "--labels" in err
    assert convert(env, "--labels", "0=background,255=lesion") == 2
    err = one_line_error(capsys)
    assert "unknown label value(s)" in err and "lossy" in err
    assert nothing_written(env)
    values = sorted(set().union(*(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))).tolist()
                                  for f in (env / "src/masks").iterdir())))
    assert len(values) > 2  # the artefacts this test is about
    spec = "0=background," + ",".join(f"{v}=v{v}" for v in values if v != 0)
    assert convert(env, "--labels", spec, "--test-fraction", "0") == 0  # every value mapped: accepted


def test_reliability_negative_mask_values_are_refused(env, capsys):
    # before: -1 sorted first and became the background (label 0), the real background label 1, exit 0
    src = env / "src"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
    for i in range(3):
        write_nii(np.random.default_rng(i).random(SIZE).astype(np.float32), src / f"images/c{i}.nii.gz")
        m = square_mask(i, 1).astype(np.int8)
        m[m == 1] = -1  # a 0/255 mask written as signed int8 reads as 0/-1
        write_nii(m, src / f"masks/c{i}.nii.gz")
    assert convert(env) == 2
    err = one_line_error(capsys)
    assert "c0.nii.gz" in err and "negative" in err and "[-1]" in err and "--labels=" in err
    assert nothing_written(env)
    assert convert(env, "--labels=0=background,-1=lesion", "--test-fraction", "0") == 0
    out = env / "nnUNet_raw/Dataset640_Two"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr/c0.nii.gz")))
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == square_mask(0, 1).sum()


def test_reliability_mixed_mask_encodings_are_refused(env, capsys):
    # before: 0/1 and 0/255 masks gave labels 1 and 2 for one structure, exit 0
    make_pngs(env / "src", 4, mask_values=[1, 1, 255, 255])
    assert convert(env) == 2
    err = one_line_error(capsys)
    assert "mix" in err and "img0.png" in err and "img2.png" in err
    assert "--labels 0=background,1=label_1,255=label_1" in err
    assert nothing_written(env)
    # --labels says how: one name for both values gives one label
    assert convert(env, "--labels", "0=background,1=lesion,255=lesion", "--test-fraction", "0") == 0
    out = env / "nnUNet_raw/Dataset640_Two"
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1}
    for f in (out / "labelsTr").iterdir():
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(f))))) == {0, 1}


def test_reliability_one_class_per_case_is_not_mixed_encoding(env, capsys):
    # the guard against a false alarm: a multi-class set where each case shows one class
    make_pngs(env / "src", 4, mask_values=[1, 2, 1, 2])
    assert convert(env, "--test-fraction", "0") == 0
    assert "0->0, 1->1, 2->2" in capsys.readouterr().out


# ---- spacing and dimensionality -----------------------------------------------------------------------
def _nifti_pairs(src: Path, n: int, spacing=(0.7, 0.5)) -> None:
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_nii(np.random.default_rng(i).random(SIZE).astype(np.float32), src / f"images/c{i}.nii.gz", spacing)
        write_nii(square_mask(i, 1), src / f"masks/c{i}.nii.gz", spacing)


def test_reliability_2d_nifti_keeps_its_pixel_spacing(env, capsys):
    # before: 0.5 x 0.7 mm became 1 x 1 mm
    _nifti_pairs(env / "src", 3, spacing=(0.7, 0.5))  # SimpleITK order x, y
    assert convert(env, "--test-fraction", "0") == 0
    out = env / "nnUNet_raw/Dataset640_Two"
    for sub, name in (("imagesTr", "c1_0000.nii.gz"), ("labelsTr", "c1.nii.gz")):
        img = sitk.ReadImage(str(out / sub / name))
        assert np.allclose(img.GetSpacing(), (0.7, 0.5, 999)), img.GetSpacing()
    # a mask whose 2D header spacing differs from its image's is refused, as for 3D
    write_nii(square_mask(0, 1), env / "src/masks/c0.nii.gz", (1.0, 1.0))
    assert convert(env, "--overwrite") == 2
    assert "spacing mismatch: mask" in one_line_error(capsys)


def test_reliability_3d_volume_among_2d_images_is_refused(env, capsys):
    # before: converted, exit 0 (one 3D case in a 2D dataset)
    _nifti_pairs(env / "src", 3)
    write_nii(np.random.default_rng(9).random((5,) + SIZE).astype(np.float32), env / "src/images/c2.nii.gz")
    write_nii(np.stack([square_mask(2, 1)] * 5), env / "src/masks/c2.nii.gz")
    assert convert(env, "--test-fraction", "0") == 2
    err = one_line_error(capsys)
    assert "c2.nii.gz is a 3D volume (5 slices)" in err and "c0.nii.gz is a 2D image" in err
    assert "separate datasets" in err
    assert nothing_written(env)


# ---- evaluation: spacing, geometry, file format -------------------------------------------------------
def _eval_case(tmp_path: Path, file_ending=".nii.gz"):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "organ": 1}, "file_ending": file_ending}))
    vol = np.zeros((4, 10, 12), np.uint8)
    vol[1:3, 2:6, 1:5] = 1  # off-centre: a mirrored copy does not overlap
    return ref, pred, dj, vol


def run_eval(capsys, ref, pred, dj, out, *extra):
    rc = evaluate_main([str(ref), str(pred), "-djfile", str(dj), "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_eval_error(rc, err, *texts):
    assert rc == 1 and err.startswith("tskd_evaluate: error: ") and "\n" not in err and "Traceback" not in err, err
    for t in texts:
        assert t in err, (t, err)


def test_reliability_evaluate_refuses_zero_or_nan_spacing(tmp_path, capsys):
    import nibabel as nib
    ref, pred, dj, vol = _eval_case(tmp_path)
    for bad in (0.0, float("nan")):
        img = nib.Nifti1Image(vol.transpose(2, 1, 0), None)  # no qform/sform: pixdim is the spacing
        img.header["pixdim"][1:4] = [1.0, bad, 2.0]
        img.header.set_qform(None, code=0)
        img.header.set_sform(None, code=0)
        nib.save(img, ref / "a.nii.gz")
        shutil.copy(ref / "a.nii.gz", pred / "a.nii.gz")
        # before: SimpleITK reads pixdim 0 / NaN as 1 mm, so HD95/NSD were scored in made-up millimetres
        rc, err = run_eval(capsys, ref, pred, dj, tmp_path / "o.csv")
        assert_eval_error(rc, err, str(ref / "a.nii.gz"), "spacing", "header")
        assert not (tmp_path / "o.csv").exists()
    write_nii(vol, ref / "a.nii.gz")
    write_nii(vol, pred / "a.nii.gz")
    for bad in (0.0, float("nan")):  # e.g. a pixel size missing from a CSV
        with pytest.raises(EvaluationInputError, match="spacing override"):
            evaluate_folders(ref, pred, ".nii.gz", {"organ": 1}, spacing_override={"a": (1.0, bad, 1.0)})
    # MetaImage with ElementSpacing 0: ITK refuses to read it; the message says why instead of "truncated"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(ref / "a.mha"), False)
    text = (ref / "a.mha").read_bytes()
    (ref / "a.mha").write_bytes(text.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 0 1"))
    shutil.copy(ref / "a.mha", pred / "a.mha")
    dj.write_text(json.dumps({"labels": {"background": 0, "organ": 1}, "file_ending": ".mha"}))
    rc, err = run_eval(capsys, ref, pred, dj, tmp_path / "o.csv")
    assert_eval_error(rc, err, str(ref / "a.mha"), "spacing of 0 or NaN", "fix the header")


def test_reliability_evaluate_refuses_flipped_or_shifted_prediction(tmp_path, capsys):
    ref, pred, dj, vol = _eval_case(tmp_path)
    write_nii(vol, ref / "a.nii.gz", spacing=(0.8, 0.8, 2.0), origin=(10.0, 20.0, 30.0))
    # before: the same voxels under a mirrored header scored Dice 1 (exit 0)
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    write_nii(vol, pred / "a.nii.gz", spacing=(0.8, 0.8, 2.0), origin=(10.0, 20.0, 30.0), direction=flipped)
    rc, err = run_eval(capsys, ref, pred, dj, tmp_path / "o.csv")
    assert_eval_error(rc, err, str(pred / "a.nii.gz"), "direction", str(ref / "a.nii.gz"), "tolerance")
    write_nii(vol, pred / "a.nii.gz", spacing=(0.8, 0.8, 2.0), origin=(11.6, 20.0, 30.0))  # 2 voxels off
    rc, err = run_eval(capsys, ref, pred, dj, tmp_path / "o.csv")
    assert_eval_error(rc, err, str(pred / "a.nii.gz"), "origin")
    # header rounding (far below the tolerance) is accepted
    write_nii(vol, pred / "a.nii.gz", spacing=(0.8, 0.8, 2.0), origin=(10.0001, 20.0, 30.0))
    rc, err = run_eval(capsys, ref, pred, dj, tmp_path / "o.csv")
    assert rc == 0, err


def test_reliability_evaluate_names_predictions_in_another_format(tmp_path, capsys):
    ref, pred, dj, vol = _eval_case(tmp_path)
    write_nii(vol, ref / "a.nii.gz")
    Image.fromarray(vol[1]).save(pred / "a.png")
    # before: `--missing empty` scored the case as an empty prediction (Dice 0, exit 0)
    for extra in ((), ("--missing", "empty")):
        rc, err = run_eval(capsys, ref, pred, dj, tmp_path / "o.csv", *extra)
        assert_eval_error(rc, err, str(pred / "a.png"), "'.nii.gz'", "file_ending")
    assert not (tmp_path / "o.csv").exists()


# ---- tracebacks -> one line --------------------------------------------------------------------------
def test_reliability_output_root_that_is_a_file(env, capsys, monkeypatch):
    # before: FileExistsError / NotADirectoryError traceback
    make_pngs(env / "src", 3)
    a_file = env / "a_file"
    a_file.write_text("x")
    assert convert(env, "--output-root", str(a_file)) == 2
    err = one_line_error(capsys)
    assert f"--output-root {a_file} is a file, not a folder" in err
    assert convert(env, "--output-root", str(a_file / "sub")) == 2
    assert f"--output-root {a_file / 'sub'}: {a_file} is a file, not a folder" in one_line_error(capsys)
    monkeypatch.setenv("nnUNet_raw", str(a_file))
    assert convert(env) == 2
    assert f"nnUNet_raw={a_file} is a file, not a folder" in one_line_error(capsys)
    assert a_file.read_text() == "x"
    monkeypatch.setenv("nnUNet_raw", str(env / "nnUNet_raw"))
    _fake_raw(env, 6)
    assert label_budget.main(["-d", "641", "--n-labeled", "2", "--preprocessed-root", str(a_file)]) == 2
    assert f"--preprocessed-root {a_file} is a file, not a folder" in one_line_error(capsys)
    assert label_budget.main(["-d", "641", "--n-labeled", "2", "--raw-root", str(a_file)]) == 2
    assert f"--raw-root {a_file} is a file, not a folder" in one_line_error(capsys)


# ---- label budgets -----------------------------------------------------------------------------------
def _fake_raw(env: Path, n_cases: int) -> Path:
    d = env / "nnUNet_raw" / "Dataset641_Budget"
    (d / "imagesTr").mkdir(parents=True)
    for i in range(n_cases):
        (d / "imagesTr" / f"c{i:02d}_0000.png").write_bytes(b"")
    (d / "dataset.json").write_text(json.dumps({"file_ending": ".png", "numTraining": n_cases}))
    return d


def test_reliability_label_budget_says_what_it_replaced(env, capsys):
    # before: the old splits were overwritten without a word
    _fake_raw(env, 12)
    pre = env / "nnUNet_preprocessed" / "Dataset641_Budget"
    assert label_budget.main(["-d", "641", "--n-labeled", "4", "--folds", "3"]) == 0
    old = json.loads((pre / "splits_final.json").read_text())
    assert "replaced" not in capsys.readouterr().out
    (env / "nnUNet_results/Dataset641_Budget/DistillTrainer__nnUNetPlans__2d/fold_0").mkdir(parents=True)
    assert label_budget.main(["-d", "641", "--n-labeled", "2", "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert f"replaced {pre / 'splits_final.json'}: 4 -> 2 labeled cases per fold (3 -> 3 folds)" in out
    assert f"previous splits kept in {pre / 'splits_final.previous.json'}" in out
    assert "1 fold folder(s) under" in out and "retrain" in out
    assert json.loads((pre / "splits_final.previous.json").read_text()) == old
    assert (pre / "tskd_unlabeled_pool.previous.json").is_file()
    assert label_budget.main(["-d", "641", "--n-labeled", "2", "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "unchanged" in out and "replaced" not in out


def test_reliability_n_labeled_zero_uses_the_current_spelling(env, capsys):
    # before: "-n 0: the label budget must be at least 1 case" (-n is the deprecated spelling)
    _fake_raw(env, 6)
    assert label_budget.main(["-d", "641", "--n-labeled", "0"]) == 2
    err = one_line_error(capsys)
    assert "--n-labeled 0" in err and "-n 0" not in err.replace("--n-labeled 0", "")


# ---- smaller ----------------------------------------------------------------------------------------
def test_reliability_rgba_alpha_dropped_is_said(env, capsys):
    make_pngs(env / "src", 3)
    for f in (env / "src/images").iterdir():
        rgba = np.random.default_rng(1).integers(0, 255, SIZE + (4,)).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(f)
    assert convert(env, "--channels", "rgb", "--test-fraction", "0") == 0
    out = capsys.readouterr().out
    assert out.count("alpha channel") == 1 and "img0.png" in out and "dropped" in out
    assert sorted(p.name for p in (env / "nnUNet_raw/Dataset640_Two/imagesTr").glob("img0_*")) == [
        "img0_0000.png", "img0_0001.png", "img0_0002.png"]  # R, G, B: the alpha channel is not a fourth


def test_reliability_broken_symlink_is_reported_as_such(env, capsys):
    make_pngs(env / "src", 3)
    link = env / "src/masks/img1.png"
    link.unlink()
    os.symlink(env / "gone/img1.png", link)
    assert convert(env) == 2
    err = one_line_error(capsys)
    assert f"{link} is a broken symbolic link" in err and str(env / "gone/img1.png") in err
    assert nothing_written(env)


def test_reliability_images_pointing_at_a_file(env, capsys):
    make_pngs(env / "src", 3)
    assert convert(env, images=env / "src/images/img0.png") == 2
    err = one_line_error(capsys)
    assert f"--images {env / 'src/images/img0.png'} is a file, not a folder" in err
    assert f"--images {env / 'src/images'}" in err


def test_reliability_test_fraction_taking_half_the_patients_warns(env, capsys):
    make_pngs(env / "src", 4, names=["pA_1", "pA_2", "pB_1", "pB_2"])
    assert convert(env, "--patient-regex", r"^(p\w)_") == 0
    out = capsys.readouterr().out
    assert "WARNING: --test-fraction 0.2 puts 1 of 2 patients (50%) in imagesTs" in out
    assert "--test-fraction 0" in out
