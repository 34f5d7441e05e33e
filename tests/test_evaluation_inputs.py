"""tskd_evaluate refuses bad inputs with one line naming the file or option and the fix (issue #14).

Each row of the "Bad inputs" table in documentation/evaluation.md has a test here.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from tskd_nnunet.evaluation.cli import main as cli_main
from tskd_nnunet.evaluation.evaluate import evaluate_folders_with_dataset_json


def write_png(arr, path):
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def write_nii(arr, path, spacing_zyx=(3.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.asarray(arr, np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path))


def square(value=1, shape=(12, 12)):
    m = np.zeros(shape, np.uint8)
    m[3:8, 3:8] = value
    return m


@pytest.fixture
def png_case(tmp_path):
    """A valid 2D PNG dataset (labels 0/1) with one case; tests break one input each."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    write_png(square(), ref / "c1.png")
    write_png(square(), pred / "c1.png")
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "head": 1}, "file_ending": ".png"}))
    return tmp_path, ref, pred, dj


def run_cli(capsys, ref, pred, dj, out, *extra):
    rc = cli_main([str(ref), str(pred), "-djfile", str(dj), "-o", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.err.strip()


def assert_one_line_error(rc, err, *must_contain):
    assert rc == 1
    assert err.startswith("tskd_evaluate: error: ") and "\n" not in err and "Traceback" not in err
    for text in must_contain:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def test_valid_png_case_scores(png_case, capsys):
    tmp, ref, pred, dj = png_case
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv")
    assert rc == 0 and err == ""


def test_prediction_saved_as_0_255_is_refused(png_case, capsys):
    # used to give Dice 0 on every case with exit code 0
    tmp, ref, pred, dj = png_case
    write_png(square(255), pred / "c1.png")
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv")
    assert_one_line_error(rc, err, str(pred / "c1.png"), "prediction", "{0, 255}", "allows {0, 1}",
                          "not allowed: {255}")
    assert not (tmp / "o.csv").exists()


def test_extra_label_in_prediction_and_in_reference_are_refused(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    vol = np.zeros((4, 6, 6), np.uint8)
    vol[1:3, 1:4, 1:4] = 1
    write_nii(vol, ref / "a.nii.gz")
    bad = vol.copy()
    bad[0, 0, 0] = 2  # used to be dropped without a word
    write_nii(bad, pred / "a.nii.gz")
    rc, err = run_cli(capsys, ref, pred, dj, tmp_path / "o.csv")
    assert_one_line_error(rc, err, str(pred / "a.nii.gz"), "prediction has label values {0, 1, 2}",
                          "not allowed: {2}")
    write_nii(vol, pred / "a.nii.gz")
    bad[0, 0, 0] = 3
    write_nii(bad, ref / "a.nii.gz")
    rc, err = run_cli(capsys, ref, pred, dj, tmp_path / "o.csv")
    assert_one_line_error(rc, err, str(ref / "a.nii.gz"), "reference has label values {0, 1, 3}",
                          "add its label to dataset.json")


def test_region_and_ignore_labels_are_allowed(tmp_path):
    from tskd_nnunet.evaluation.evaluate import EvaluationInputError, allowed_label_values

    labels = {"background": 0, "whole": [1, 2], "core": 2, "ignore": 4}
    assert allowed_label_values(labels) == [0, 1, 2, 4]
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": labels, "file_ending": ".png"}))
    r = square(1)
    r[5, 5], r[0, 0] = 2, 4
    write_png(r, ref / "c.png")
    write_png(square(2), pred / "c.png")
    df = evaluate_folders_with_dataset_json(ref, pred, dj)
    assert set(df["class"]) == {"whole", "core"}
    write_png(square(3), pred / "c.png")
    with pytest.raises(EvaluationInputError, match=r"not allowed: \{3\}"):
        evaluate_folders_with_dataset_json(ref, pred, dj)


def test_truncated_prediction_png(png_case, capsys):
    tmp, ref, pred, dj = png_case
    data = (pred / "c1.png").read_bytes()
    (pred / "c1.png").write_bytes(data[: len(data) // 2])
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv")
    assert_one_line_error(rc, err, str(pred / "c1.png"), "cannot read this prediction", "truncated",
                          "re-export or remove it")


def test_bad_djfile_messages_differ(png_case, capsys):
    tmp, ref, pred, _ = png_case
    missing = tmp / "nope.json"
    not_json = tmp / "not.json"
    not_json.write_text("{labels: 1,")
    no_labels = tmp / "nolabels.json"
    no_labels.write_text(json.dumps({"file_ending": ".png", "channel_names": {"0": "US"}}))
    bad_values = tmp / "badvalues.json"
    bad_values.write_text(json.dumps({"labels": {"background": 0, "head": "one"}, "file_ending": ".png"}))
    no_ending = tmp / "noending.json"
    no_ending.write_text(json.dumps({"labels": {"background": 0, "head": 1}}))
    errors = []
    for dj, text in ((missing, "dataset.json not found"), (not_json, "not valid JSON"),
                     (no_labels, "no 'labels'"), (bad_values, "must be integers"),
                     (no_ending, "no 'file_ending'")):
        rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv")
        errors.append(assert_one_line_error(rc, err, str(dj), text))
    assert len(set(errors)) == len(errors)


def test_negative_tolerance(png_case, capsys):
    tmp, ref, pred, dj = png_case
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv", "--tolerance-mm", "-1")
    assert_one_line_error(rc, err, "tolerance", "-1", "--tolerance-mm", ">= 0")
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv", "--tolerance-mm", "nan")
    assert_one_line_error(rc, err, "--tolerance-mm")


def test_missing_ref_and_pred_folders_differ(png_case, capsys):
    tmp, ref, pred, dj = png_case
    rc, err_ref = run_cli(capsys, tmp / "no_ref", pred, dj, tmp / "o.csv")
    assert_one_line_error(rc, err_ref, "reference folder (-ref) not found", str(tmp / "no_ref"))
    rc, err_pred = run_cli(capsys, ref, tmp / "no_pred", dj, tmp / "o.csv")
    assert_one_line_error(rc, err_pred, "prediction folder (-pred) not found", str(tmp / "no_pred"))
    assert err_ref != err_pred


def test_missing_prediction_and_unknown_prediction(png_case, capsys):
    tmp, ref, pred, dj = png_case
    (pred / "c1.png").unlink()
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv")
    assert_one_line_error(rc, err, "lack a prediction", "--missing empty")
    write_png(square(), pred / "c1.png")
    write_png(square(), pred / "zz.png")
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv")
    assert_one_line_error(rc, err, "without a reference", "zz")


def test_missing_hc18_csv(png_case, capsys):
    tmp, ref, pred, dj = png_case
    rc, err = run_cli(capsys, ref, pred, dj, tmp / "o.csv", "--hc18-csv", str(tmp / "none.csv"))
    assert_one_line_error(rc, err, "HC18 CSV not found", str(tmp / "none.csv"))


def test_console_exit_code_and_no_traceback(png_case):
    tmp, ref, pred, dj = png_case
    write_png(square(255), pred / "c1.png")
    proc = subprocess.run([sys.executable, "-m", "tskd_nnunet.evaluation.cli", str(ref), str(pred),
                           "-djfile", str(dj), "-o", str(tmp / "o.csv")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tskd_evaluate: error: ")
