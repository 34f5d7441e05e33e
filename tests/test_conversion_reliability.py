"""Converters: nothing silent, nothing lost (issue #14, items 2, 4 and 5).

Interrupted conversions clean up (SIGTERM) or are cleaned up by the next run (SIGKILL); every input that
used to give a silently wrong dataset or a misleading/raw error is a one-line error naming the flag or
file and the fix, or an explicit printed decision.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import BIN, REPO, run_cmd, subprocess_env
from dataset_conversion import convert_folder
from dataset_conversion.common import remove_stale_temp_folders


@pytest.fixture
def env(empty_nnunet_env):
    return empty_nnunet_env


def make_pairs(root: Path, n: int, ext=".png", mask_ext=None, mask_suffix="", names=None, size=(24, 28)):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    names = names or [f"img{i}" for i in range(n)]
    for i, name in enumerate(names):
        img = rng.integers(0, 255, size).astype(np.uint8)
        m = np.zeros(size, np.uint8)
        m[3:9, 4:10 + i] = 255
        for arr, sub, e, sfx in ((img, "images", ext, ""), (m, "masks", mask_ext or ext, mask_suffix)):
            path = root / sub / f"{name}{sfx}{e}"
            if e == ".gif":
                Image.fromarray(arr).save(path)  # PIL writes palette ('P') GIFs
            else:
                sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def convert(env, *extra, d="620", n="Rel"):
    return convert_folder.main(["--images", str(env / "src/images"), "--masks", str(env / "src/masks"),
                                "-d", d, "--name", n, *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- item 4: silent wrong results ------------------------------------------------------------------
def test_background_not_first_is_refused(env, capsys):
    make_pairs(env / "src", 3)
    assert convert(env, "--labels", "255=lesion,0=background") == 2
    err = one_line_error(capsys)
    assert "would invert the masks" in err and "--labels 0=background,255=lesion" in err
    assert convert(env, "--labels", "1=disk,0=bg") == 2
    assert "--labels 0=bg,1=disk" in one_line_error(capsys)
    assert not (env / "nnUNet_raw" / "Dataset620_Rel").exists()
    # background first: accepted, mapping printed
    assert convert(env, "--labels", "0=background,255=lesion", "--test-fraction", "0") == 0
    assert "0->0 (background), 255->1 (lesion)" in capsys.readouterr().out


def test_spacing_values_checked(env, capsys):
    make_pairs(env / "src", 3)
    assert convert(env, "--spacing", "1", "1", "1") == 2
    err = one_line_error(capsys)
    assert "is 2D: --spacing needs two values SY SX, got 3" in err and "--spacing 1 1" in err
    for bad in (["0", "-1"], ["nan", "1"]):
        assert convert(env, "--spacing", *bad) == 2
        assert "every value must be a positive pixel size" in one_line_error(capsys)
    assert not list((env / "nnUNet_raw").iterdir())


def test_patient_regex_without_distinct_patients_and_invalid(env, capsys):
    make_pairs(env / "src", 4, names=["patA_1", "patA_2", "patB_1", "patB_2"])
    assert convert(env, "--patient-regex", "pat") == 2  # no group, same match for every case
    err = one_line_error(capsys)
    assert "gives the same patient id 'pat' for all 4 cases" in err
    assert convert(env, "--patient-regex", "(pat") == 2
    assert "is not a valid regular expression" in one_line_error(capsys)
    assert convert(env, "--patient-regex", r"^(pat\w)_", "--test-fraction", "0.5") == 0
    out = capsys.readouterr().out
    assert "2 patients for 4 cases" in out and "patA_1 -> patA" in out


def test_test_fraction_too_high_and_small_training_set(env, capsys):
    make_pairs(env / "src", 6)
    assert convert(env, "--test-fraction", "0.99") == 2
    assert "would put more patients in imagesTs than in training" in one_line_error(capsys)
    assert convert(env, "--test-fraction", "0.4") == 0
    assert "WARNING: --test-fraction 0.4 leaves 4 training case(s)" in capsys.readouterr().out


# ---- item 5: GIF input, matching failures ----------------------------------------------------------
def test_gif_masks_and_images_are_read(env, capsys):
    make_pairs(env / "src", 3, ext=".gif")
    assert Image.open(env / "src/masks/img0.gif").mode == "P"  # palette indices 0/1, colours 0/255
    assert convert(env, "--test-fraction", "0") == 0
    assert "0->0, 255->1" in capsys.readouterr().out
    out = env / "nnUNet_raw" / "Dataset620_Rel"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "img0.png")))
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == 6 * 6
    src = np.array(Image.open(env / "src/images/img0.gif").convert("L"))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "img0_0000.png"))), src)


def test_mask_matching_failures_say_what_was_found(env, capsys):
    make_pairs(env / "src", 3, mask_suffix="_seg")
    assert convert(env, "--mask-suffix", "_mask") == 2
    err = one_line_error(capsys)
    assert "no usable masks" in err and "3 name does not end with --mask-suffix '_mask'" in err
    assert "img0_seg.png" in err
    assert convert(env) == 2  # no suffix given: names do not line up
    err = one_line_error(capsys)
    assert "no image has a mask" in err and "Fix: pass --mask-suffix _seg" in err
    assert convert(env, "--mask-suffix", "_seg", "--test-fraction", "0") == 0


def test_unsupported_files_and_empty_folder(env, capsys):
    make_pairs(env / "src", 2)
    for f in (env / "src/masks").iterdir():
        f.rename(f.with_suffix(".xyz"))
    assert convert(env) == 2
    err = one_line_error(capsys)
    assert "no usable masks" in err and "unsupported format" in err and "img0.xyz" in err
    for f in (env / "src/masks").iterdir():
        f.unlink()
    assert convert(env) == 2
    assert "is empty" in one_line_error(capsys)


def test_corrupt_gif_is_one_line(env, capsys):
    make_pairs(env / "src", 2, ext=".gif")
    (env / "src/masks/img1.gif").write_bytes(b"GIF89a broken")
    assert convert(env, "--labels", "0=background,255=x") == 2
    assert "cannot read" in (err := one_line_error(capsys)) and "img1.gif" in err


# ---- item 2: interrupted conversions ---------------------------------------------------------------
def _start(env_dir: Path, dataset_id: str, sleep: str = "1") -> subprocess.Popen:
    env = subprocess_env({"nnUNet_raw": str(env_dir / "nnUNet_raw"), "TSKD_CONVERT_TEST_SLEEP": sleep})
    return subprocess.Popen([sys.executable, "-m", "dataset_conversion.convert_folder", "--images",
                             str(env_dir / "src/images"), "--masks", str(env_dir / "src/masks"), "-d", dataset_id,
                             "--name", "Sig", "--test-fraction", "0"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (nohup, `&`) inherits SIGINT ignored; Ctrl-C is
                            # what this child must handle, so give it the default disposition Python expects
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_tmp(raw: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        tmp = [p for p in raw.iterdir() if ".tmp-" in p.name] if raw.is_dir() else []
        if tmp and any((tmp[0] / "imagesTr").glob("*")):
            return tmp[0]
        time.sleep(0.05)
    raise AssertionError(f"conversion never started writing: {proc.communicate()}")


def test_sigterm_cleans_up_and_sigkill_leftover_is_removed_next_run(env, capfd):
    make_pairs(env / "src", 5)
    raw = env / "nnUNet_raw"
    proc = _start(env, "621")
    _wait_for_tmp(raw, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "SIGTERM received: removing the unfinished dataset folder" in err and "Traceback" not in err
    assert not list(raw.iterdir()), "SIGTERM left a folder in nnUNet_raw"

    proc = _start(env, "621")  # Ctrl-C
    _wait_for_tmp(raw, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not list(raw.iterdir()), "SIGINT left a folder in nnUNet_raw"

    proc = _start(env, "621")
    tmp = _wait_for_tmp(raw, proc)
    proc.send_signal(signal.SIGKILL)  # cannot be handled: the next run must clean up
    proc.communicate(timeout=60)
    assert tmp.is_dir()
    capfd.readouterr()
    assert convert(env, "--test-fraction", "0", d="621", n="Sig") == 0
    assert f"removed stale {tmp.name} left by an interrupted conversion" in capfd.readouterr().out
    assert [p.name for p in raw.iterdir()] == ["Dataset621_Sig"]
    run_cmd([os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", "621", "-c", "2d", "-np", "1"],
            subprocess_env({k: str(env / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}),
            timeout=300)
    assert (env / "nnUNet_preprocessed" / "Dataset621_Sig" / "nnUNetPlans.json").is_file()


def test_interrupted_overwrite_is_restored(env, capsys):
    make_pairs(env / "src", 2)
    raw = env / "nnUNet_raw"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (raw / f"Dataset622_X.old-{dead.pid}").mkdir()
    (raw / f"Dataset622_X.old-{dead.pid}" / "dataset.json").write_text("{}")
    (raw / f"Dataset623_Y.tmp-{os.getpid()}").mkdir()  # a live conversion (this process): left alone
    remove_stale_temp_folders(raw)
    assert "restored" in capsys.readouterr().out
    assert (raw / "Dataset622_X" / "dataset.json").is_file()
    assert (raw / f"Dataset623_Y.tmp-{os.getpid()}").is_dir()


def test_colour_reduced_to_grey_is_said_once(env, capsys):
    make_pairs(env / "src", 3)
    for i in range(3):
        a = np.zeros((24, 28, 3), np.uint8)
        a[..., 0] = 200
        sitk.WriteImage(sitk.GetImageFromArray(a, isVector=True), str(env / f"src/images/img{i}.png"))
    assert convert(env, "--test-fraction", "0") == 0
    out = capsys.readouterr().out
    assert out.count("are reduced to luminance (--channels gray); pass --channels rgb") == 1


def test_empty_masks_say_the_fix(env, capsys):
    make_pairs(env / "src", 2)
    for f in (env / "src/masks").iterdir():
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((24, 28), np.uint8)), str(f))
    assert convert(env) == 2
    assert "hold only the value(s) [0]: nothing to segment. Fix: point --masks" in one_line_error(capsys)


def test_chaos_slices_spacing_checked(env, capsys):
    from dataset_conversion import Dataset502_CHAOS_MR_T2SPIR_slices
    assert Dataset502_CHAOS_MR_T2SPIR_slices.main(["--input", str(env), "--spacing", "0", "-1"]) == 2
    assert "--spacing 0 -1: every value must be a positive pixel size" in one_line_error(capsys)


# ---- the table in documentation/reliability.md: one row per bad input, message pinned -------------------
def _vol(root: Path, n=3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        img = np.random.rand(4, 8, 8).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(root / f"images/v{i}.nii.gz"))
        m = np.zeros((4, 8, 8), np.uint8)
        m[1, 2:4, 2:4] = 1
        sitk.WriteImage(sitk.GetImageFromArray(m), str(root / f"masks/v{i}.nii.gz"))


def _edit(fn):
    def setup(env):
        make_pairs(env / "src", 4)
        fn(env)
    return setup


def _write(path, arr, vector=False):
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path))


def _anim(env):
    make_pairs(env / "src", 2, ext=".gif")
    frames = [Image.fromarray(np.full((24, 28), v, np.uint8)) for v in (0, 255)]
    frames[0].save(env / "src/images/img0.gif", save_all=True, append_images=frames[1:])


def _mask_spacing(env):
    _vol(env / "src")
    m = sitk.ReadImage(str(env / "src/masks/v0.nii.gz"))
    m.SetSpacing((2, 2, 2))
    sitk.WriteImage(m, str(env / "src/masks/v0.nii.gz"))


def _truncate(env):
    make_pairs(env / "src", 2, size=(120, 120))
    data = (env / "src/images/img0.png").read_bytes()
    (env / "src/images/img0.png").write_bytes(data[: len(data) // 2])


def _float_mask(env):
    make_pairs(env / "src", 2, ext=".nii.gz")
    _write(env / "src/masks/img0.nii.gz", np.full((24, 28), 0.5, np.float32))


def _colour_mask(env):
    a = np.zeros((24, 28, 3), np.uint8)
    a[..., 0] = 255
    _write(env / "src/masks/img0.png", a, vector=True)


TABLE = [  # (row id, setup(env), extra args, expected text of the one-line error)
    ("images-folder-missing", lambda e: make_pairs(e / "t", 2) or (e / "src").mkdir() or
     (e / "t/masks").rename(e / "src/masks"), [], "images folder"),
    ("image-without-mask", _edit(lambda e: (e / "src/masks/img1.png").unlink()), [], "missing mask for image"),
    ("mask-without-image", _edit(lambda e: (e / "src/images/img1.png").unlink()), [], "missing image for mask"),
    ("duplicate-case-id", _edit(lambda e: (e / "src/images/img0.bmp").write_bytes((e / "src/images/img0.png")
                                                                                  .read_bytes())), [],
     "duplicate case id 'img0'"),
    ("mask-size-mismatch", _edit(lambda e: _write(e / "src/masks/img0.png", np.zeros((10, 10), np.uint8))),
     ["--labels", "0=bg,255=x"], "size mismatch: mask"),
    ("value-not-in-labels", _edit(lambda e: None), ["--labels", "0=bg,128=x"], "unknown label value(s) [255]"),
    ("labels-malformed", _edit(lambda e: None), ["--labels", "0,1"], "is not VALUE=NAME"),
    ("labels-one-class", _edit(lambda e: None), ["--labels", "0=bg"], "needs the background and at least one"),
    ("labels-not-integer", _edit(lambda e: None), ["--labels", "x=bg,1=a"], "value 'x' is not an integer"),
    ("labels-repeated", _edit(lambda e: None), ["--labels", "0=bg,0=a"], "repeats '0=a'"),
    ("mask-non-integer", _float_mask, [], "has non-integer values"),
    ("mask-colour", _edit(_colour_mask), [], "colour channels that differ"),
    ("image-not-an-image", _edit(lambda e: (e / "src/images/img0.png").write_bytes(b"not a png")),
     ["--labels", "0=bg,255=x"], "cannot read"),
    ("image-truncated-png", _truncate, ["--labels", "0=bg,255=x"], "cannot read"),
    ("gif-animated", _anim, ["--labels", "0=bg,255=x"], "has 2 frames (animated image)"),
    ("spacing-one-value", _edit(lambda e: None), ["--spacing", "1"], "--spacing takes SY SX (2D) or SZ SY SX"),
    ("spacing-2-on-3d", lambda e: _vol(e / "src"), ["--spacing", "1", "1"], "is 3D: --spacing needs three values"),
    ("mask-header-spacing", _mask_spacing, [], "spacing mismatch: mask"),
    ("png-ending-for-nifti", lambda e: _vol(e / "src"), ["--file-ending", ".png"], "--file-ending .png cannot hold"),
    ("regex-no-match", lambda e: make_pairs(e / "src", 2, names=["patA_1", "x_2"]), ["--patient-regex", r"^(pat\w)_"],
     "does not match x_2.png"),
    ("test-fraction-negative", _edit(lambda e: None), ["--test-fraction", "-0.1"], "must be in [0, 1)"),
    ("test-fraction-one", _edit(lambda e: None), ["--test-fraction", "1"], "must be in [0, 1)"),
    ("output-exists", _edit(lambda e: (e / "nnUNet_raw/Dataset620_Rel").mkdir()), [], "pass --overwrite"),
    ("id-used-by-other-name", _edit(lambda e: (e / "nnUNet_raw/Dataset620_Other").mkdir()), [],
     "dataset id 620 is already used by"),
]


@pytest.mark.parametrize("row,setup,args,expected", TABLE, ids=[r[0] for r in TABLE])
def test_bad_input_table(env, capsys, row, setup, args, expected):
    setup(env)
    before = sorted(p.name for p in (env / "nnUNet_raw").iterdir())
    assert convert(env, *args) == 2
    assert expected in one_line_error(capsys)
    assert sorted(p.name for p in (env / "nnUNet_raw").iterdir()) == before  # nothing written


@pytest.mark.parametrize("argv,expected", [
    (["-d", "0", "--name", "T"], "dataset id 0 is out of range"),
    (["-d", "1000", "--name", "T"], "dataset id 1000 is out of range"),
    (["-d", "600", "--name", "bad name"], "may only contain letters, digits"),
], ids=["id-0", "id-1000", "bad-name"])
def test_bad_id_and_name(env, capsys, argv, expected):
    make_pairs(env / "src", 2)
    assert convert_folder.main(["--images", str(env / "src/images"), "--masks", str(env / "src/masks"), *argv]) == 2
    assert expected in one_line_error(capsys)


def test_dataset_converters_bad_input(env, capsys):
    from dataset_conversion import (Dataset501_HC18, Dataset503_CHAOS_MR, Dataset504_CHAOS_CT, Dataset505_KidneyUS,
                                    label_budget)
    cases = [
        (Dataset501_HC18, ["--input", str(env / "nope")], "input folder"),
        (Dataset503_CHAOS_MR, ["--input", str(env)], "no Train_Sets/MR under"),
        (Dataset504_CHAOS_CT, ["--input", str(env)], "no Train_Sets/CT under"),
        (Dataset505_KidneyUS, ["--images", str(env), "--labels", str(env / "nope")], "missing folder"),
        (label_budget, ["-d", "600", "--n-labeled", "2"], "no Dataset600_* folder"),
    ]
    for mod, argv, expected in cases:
        assert mod.main(argv) == 2, mod
        assert expected in one_line_error(capsys), mod


def test_hc18_csv_problems(env, capsys):
    from dataset_conversion import Dataset501_HC18
    src = env / "h"
    make_pairs(src, 2, names=["000_HC", "001_HC"])
    csv = src / "pixel_size_and_HC.csv"
    assert Dataset501_HC18.main(["--input", str(src)]) == 2
    assert "missing file" in (err := one_line_error(capsys)) and "pixel_size_and_HC.csv" in err
    csv.write_text("000_HC.png,0.1,5\n")
    assert Dataset501_HC18.main(["--input", str(src)]) == 2
    assert "does not start with the HC18 header" in one_line_error(capsys)
    csv.write_text("filename,pixel size(mm),head circumference (mm)\n000_HC.png,abc,5\n")
    assert Dataset501_HC18.main(["--input", str(src)]) == 2
    assert "bad row ['000_HC.png', 'abc', '5']" in one_line_error(capsys)
    assert list((env / "nnUNet_raw").iterdir()) == []


def test_single_patient_dataset_says_there_is_no_test_set(env, capsys):
    from dataset_conversion.common import write_dataset
    make_pairs(env / "src", 3)
    cases = convert_folder.build_cases(env / "src/images", env / "src/masks", {0: 0, 255: 1}, "gray", None, ".png",
                                       None)
    for c in cases:
        c.patient_id = "only_patient"
    write_dataset(cases, raw_root=env / "nnUNet_raw", dataset_id=624, dataset_name="One", channel_names={0: "x"},
                  labels={"background": 0, "fg": 1}, file_ending=".png", test_fraction=0.2)
    out = capsys.readouterr().out
    assert "note: all 3 cases belong to one patient, so there is no test set (--test-fraction 0.2 is ignored)" in out
