"""Folder evaluation through nnU-Net's readers, and the tskd_evaluate console entry."""
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from tskd_nnunet.evaluation.cli import main as cli_main
from tskd_nnunet.evaluation.clinical import evaluate_hc18_folder, ramanujan_perimeter
from tskd_nnunet.evaluation.evaluate import evaluate_folders, evaluate_folders_with_dataset_json


def write_nii(arr, path, spacing_zyx):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK wants (x, y, z)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders3d(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(), pred_dir.mkdir()
    ref = np.zeros((7, 7, 7), np.uint8)
    ref[1:4, 2:5, 2:5] = 1
    ref[5, 5, 5] = 2
    write_nii(ref, ref_dir / "case_000.nii.gz", (3.0, 1.0, 1.0))
    write_nii(np.roll(ref == 1, 1, axis=0), pred_dir / "case_000.nii.gz", (3.0, 1.0, 1.0))  # class 2 missed
    write_nii(ref, ref_dir / "case_001.nii.gz", (3.0, 1.0, 1.0))
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}, "file_ending": ".nii.gz",
                              "channel_names": {"0": "MR"}, "numTraining": 2}))
    return ref_dir, pred_dir, dj


def test_folder_3d_anisotropic_and_missing(folders3d, tmp_path):
    ref_dir, pred_dir, dj = folders3d
    with pytest.raises(FileNotFoundError):
        evaluate_folders_with_dataset_json(ref_dir, pred_dir, dj)
    out = tmp_path / "out.csv"
    df = evaluate_folders_with_dataset_json(ref_dir, pred_dir, dj, tolerance_mm=2.0, output_csv=out, missing="empty")
    assert list(df.columns[:5]) == ["case", "class", "dice", "nsd", "hd95"]
    r = df.set_index(["case", "class"])
    # same numbers as the hand-computed cube shift in test_evaluation_metrics
    assert r.loc[("case_000", "organ"), "nsd"] == pytest.approx(34 / 52)
    assert r.loc[("case_000", "organ"), "hd95"] == pytest.approx(3.0)
    assert r.loc[("case_000", "organ"), "ref_volume_ml"] == pytest.approx(27 * 3 / 1000)
    assert r.loc[("case_000", "lesion"), "dice"] == 0.0
    assert r.loc[("case_000", "lesion"), "hd95"] == pytest.approx(np.sqrt(21 ** 2 + 7 ** 2 + 7 ** 2))
    assert (r.loc["case_001", "dice"] == 0.0).all()  # missing prediction scored as empty
    pd.testing.assert_frame_equal(pd.read_csv(out), df, check_dtype=False)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_folder_2d_png_via_nnunet_reader(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(), pred_dir.mkdir()
    ref = np.zeros((1, 1, 10, 10), np.uint8)
    ref[0, 0, 2:6, 2:6] = 1
    pred = np.roll(ref, 1, axis=3)
    io = NaturalImage2DIO()
    io.write_seg(ref[0], str(ref_dir / "c1.png"), {"spacing": (999, 1, 1)})
    io.write_seg(pred[0], str(pred_dir / "c1.png"), {"spacing": (999, 1, 1)})
    df = evaluate_folders(ref_dir, pred_dir, ".png", {"head": 1}, tolerance_mm=0.5)
    # 2D surfaces (not a one-slice 3D volume): the hand-computed one-pixel offset
    assert df.loc[0, "dice"] == pytest.approx(0.75)
    assert df.loc[0, "nsd"] == pytest.approx(0.5)
    assert df.loc[0, "hd95"] == pytest.approx(1.0)
    assert np.isnan(df.loc[0, "ref_volume_ml"])
    # PNG has no spacing: a per-case override puts distances in mm (e.g. HC18 pixel size)
    df = evaluate_folders(ref_dir, pred_dir, ".png", {"head": 1}, tolerance_mm=0.5,
                          spacing_override={"c1": (0.5, 0.5)})
    assert df.loc[0, "hd95"] == pytest.approx(0.5) and df.loc[0, "nsd"] == pytest.approx(1.0)


def test_hc18_folder(tmp_path):
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    r, c = np.indices((300, 300))
    a_px, b_px = 100.0, 70.0
    mask = ((r - 150) / a_px) ** 2 + ((c - 150) / b_px) ** 2 <= 1
    write_nii(mask[None], pred_dir / "HC18_004.nii.gz", (1.0, 0.2, 0.2))
    csv = tmp_path / "hc.csv"
    px = 0.15
    expected = ramanujan_perimeter(a_px * px, b_px * px)
    csv.write_text(f"filename,pixel size(mm),head circumference (mm)\n004_HC.png,{px},{expected + 1.0}\n")
    df = evaluate_hc18_folder(pred_dir, csv, ".nii.gz")
    assert df.loc[0, "hc_pred_mm"] == pytest.approx(expected, rel=5e-3)
    assert df.loc[0, "hc_abs_diff_mm"] == pytest.approx(1.0, abs=0.3)
    df2 = evaluate_hc18_folder(pred_dir, csv, ".nii.gz", use_file_spacing=True)
    assert df2.loc[0, "hc_pred_mm"] == pytest.approx(expected / px * 0.2, rel=5e-3)


def test_cli(folders3d, tmp_path, capsys):
    ref_dir, pred_dir, dj = folders3d
    write_nii(np.zeros((7, 7, 7)), pred_dir / "case_001.nii.gz", (3.0, 1.0, 1.0))
    out = tmp_path / "cli.csv"
    assert cli_main([str(ref_dir), str(pred_dir), "-djfile", str(dj), "--tolerance-mm", "1",
                     "-o", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 4 and set(df["class"]) == {"organ", "lesion"}
    assert "wrote" in capsys.readouterr().out


def test_cli_hc18_repeat_exam_uses_its_own_reference(tmp_path, capsys):
    # issue #13: tskd_evaluate --hc18-csv scored hc18_010_2 against 002_HC.png's expert HC
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(), pred_dir.mkdir()
    r, c = np.indices((300, 300))
    mask = (((r - 150) / 100.0) ** 2 + ((c - 150) / 70.0) ** 2 <= 1).astype(np.uint8)
    for d in (ref_dir, pred_dir):
        write_nii(mask[None], d / "hc18_010_2.nii.gz", (1.0, 0.15, 0.15))
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "head": 1}, "file_ending": ".nii.gz"}))
    px = 0.15
    hc = ramanujan_perimeter(100 * px, 70 * px)
    csv = tmp_path / "hc.csv"
    csv.write_text("filename,pixel size(mm),head circumference (mm)\n"
                   f"002_HC.png,0.3,{hc + 50}\n010_2HC.png,{px},{hc}\n")
    out = tmp_path / "o.csv"
    assert cli_main([str(ref_dir), str(pred_dir), "-djfile", str(dj), "-o", str(out),
                     "--hc18-csv", str(csv)]) == 0
    df = pd.read_csv(out)
    assert df.loc[0, "hc_ref_mm"] == pytest.approx(hc)
    assert df.loc[0, "hc_abs_diff_mm"] < 1.0


def test_evaluate_test_folder_merges_hc18_columns_on_every_class_row(tmp_path):
    # the one scoring of a test folder (tskd_evaluate, the benchmark runner, fed_hc18): metrics per case and
    # class, and the head circumference of each case on each of its rows when an HC18 CSV is given
    from tskd_nnunet.evaluation.clinical import evaluate_test_folder

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(), pred_dir.mkdir()
    r, c = np.indices((300, 300))
    head = ((r - 150) / 100.0) ** 2 + ((c - 150) / 70.0) ** 2 <= 1
    seg = head.astype(np.uint8)
    seg[140:160, 140:160] = 2  # a second class inside the head
    for d in (ref_dir, pred_dir):
        write_nii(seg[None], d / "hc18_004.nii.gz", (1.0, 0.15, 0.15))
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "head": 1, "core": 2}, "file_ending": ".nii.gz"}))
    hc = ramanujan_perimeter(100 * 0.15, 70 * 0.15)
    csv = tmp_path / "hc.csv"
    csv.write_text(f"filename,pixel size(mm),head circumference (mm)\n004_HC.png,0.15,{hc + 2.0}\n")
    plain = evaluate_test_folder(ref_dir, pred_dir, dj)
    assert "hc_abs_diff_mm" not in plain and list(plain["class"]) == ["head", "core"]
    df = evaluate_test_folder(ref_dir, pred_dir, dj, hc18_csv=csv)
    assert len(df) == 2 and (df["dice"] == 1.0).all()
    assert df["hc_abs_diff_mm"].to_numpy() == pytest.approx([2.0, 2.0], abs=0.3)
    pd.testing.assert_frame_equal(df[plain.columns], plain)
