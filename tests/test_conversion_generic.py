"""Generic folder converter and the shared writer: formats, label mapping, channels, spacing, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import assert_integrity  # noqa: E402
from dataset_conversion import convert_folder
from dataset_conversion.common import ConversionError, patient_level_test_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nnunet_env(empty_nnunet_env):
    return empty_nnunet_env




def make_pairs(root: Path, n: int, ext: str = ".png", rgb: bool = False, values=(0, 255), size=(32, 40),
               mask_ext: str = None, prefix: str = "img") -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = size + ((3,) if rgb else ())
        img = rng.integers(0, 255, shape).astype(np.uint8)
        m = np.zeros(size, np.uint8)
        for k, v in enumerate(values[1:]):
            m[2 + 4 * k: 6 + 4 * k, 3:9 + i] = v
        sitk.WriteImage(sitk.GetImageFromArray(img, isVector=rgb), str(root / "images" / f"{prefix}{i}{ext}"))
        sitk.WriteImage(sitk.GetImageFromArray(m), str(root / "masks" / f"{prefix}{i}{mask_ext or ext}"))


def test_png_auto_labels_grayscale_integrity(nnunet_env, capfd):
    make_pairs(nnunet_env / "src", 5, values=(0, 100, 255))
    rc = convert_folder.main(["--images", str(nnunet_env / "src/images"), "--masks", str(nnunet_env / "src/masks"),
                              "-d", "610", "--name", "Toy"])
    assert rc == 0
    printed = capfd.readouterr().out
    assert "0->0, 100->1, 255->2" in printed
    out = nnunet_env / "nnUNet_raw" / "Dataset610_Toy"
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "label_100": 1, "label_255": 2}
    assert ds["file_ending"] == ".png" and ds["channel_names"] == {"0": "image"}
    assert ds["numTraining"] == 4 and len(list((out / "imagesTs").iterdir())) == 1
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(next((out / "labelsTr").iterdir()))))
    assert set(np.unique(lab)) == {0, 1, 2}
    assert_integrity(out, capfd)


def test_rgb_channels_and_explicit_labels(nnunet_env, capfd):
    make_pairs(nnunet_env / "src", 4, ext=".png", rgb=True)
    rc = convert_folder.main(["--images", str(nnunet_env / "src/images"), "--masks", str(nnunet_env / "src/masks"),
                              "-d", "611", "--name", "RGB", "--channels", "rgb", "--labels", "0=background,255=lesion"])
    assert rc == 0
    out = nnunet_env / "nnUNet_raw" / "Dataset611_RGB"
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "R", "1": "G", "2": "B"} and ds["labels"] == {"background": 0, "lesion": 1}
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_env / "src/images/img0.png")))
    split = "Tr" if (out / "imagesTr" / "img0_0001.png").exists() else "Ts"
    g = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"images{split}" / "img0_0001.png")))
    assert np.array_equal(g, src[..., 1])
    assert_integrity(out, capfd)


def test_spacing_gives_nifti_and_patient_regex(nnunet_env, capfd):
    make_pairs(nnunet_env / "src", 6, ext=".bmp", mask_ext=".png", prefix="p")
    # p0,p1 → patient A; p2,p3 → B; p4,p5 → C (regex on the name)
    for i in range(6):
        for sub, ext in (("images", ".bmp"), ("masks", ".png")):
            src = nnunet_env / "src" / sub / f"p{i}{ext}"
            src.rename(src.with_name(f"pat{'ABC'[i // 2]}_sl{i}{ext}"))
    rc = convert_folder.main(["--images", str(nnunet_env / "src/images"), "--masks", str(nnunet_env / "src/masks"),
                              "-d", "612", "--name", "Spaced", "--spacing", "0.5", "0.25",
                              "--patient-regex", r"^(pat\w)_", "--test-fraction", "0.34"])
    assert rc == 0
    out = nnunet_env / "nnUNet_raw" / "Dataset612_Spaced"
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["file_ending"] == ".nii.gz"
    img = sitk.ReadImage(str(next((out / "imagesTr").iterdir())))
    assert img.GetSize() == (40, 32, 1) and np.allclose(img.GetSpacing(), (0.25, 0.5, 999))
    cmap = json.loads((out / "case_patient_map.json").read_text())
    test_cases = sorted(p.name[:-len(".nii.gz")] for p in (out / "labelsTs").iterdir())
    assert len(test_cases) == 2 and cmap[test_cases[0]] == cmap[test_cases[1]]  # one whole patient
    assert_integrity(out, capfd)


def test_nifti_3d_keeps_geometry(nnunet_env, capfd):
    src = nnunet_env / "src"
    (src / "im").mkdir(parents=True)
    (src / "ms").mkdir()
    for i in range(3):
        img = sitk.GetImageFromArray(np.random.default_rng(i).normal(size=(6, 16, 20)).astype(np.float32))
        img.SetSpacing((0.7, 0.8, 3.0))
        img.SetOrigin((1.0, 2.0, 3.0))
        m = np.zeros((6, 16, 20), np.uint8)
        m[2:4, 4:8, 5:10] = 1
        mi = sitk.GetImageFromArray(m)
        mi.CopyInformation(img)
        sitk.WriteImage(img, str(src / "im" / f"vol{i}.nii.gz"))
        sitk.WriteImage(mi, str(src / "ms" / f"vol{i}_seg.nrrd"))
    rc = convert_folder.main(["--images", str(src / "im"), "--masks", str(src / "ms"), "--mask-suffix", "_seg",
                              "-d", "613", "--name", "Vol", "--test-fraction", "0"])
    assert rc == 0
    out = nnunet_env / "nnUNet_raw" / "Dataset613_Vol"
    img = sitk.ReadImage(str(out / "imagesTr" / "vol1_0000.nii.gz"))
    assert img.GetSize() == (20, 16, 6) and np.allclose(img.GetSpacing(), (0.7, 0.8, 3.0))
    assert np.allclose(img.GetOrigin(), (1, 2, 3))
    assert_integrity(out, capfd)


def run_bad(nnunet_env, capsys, extra, dataset="Dataset620_Bad"):
    argv = ["--images", str(nnunet_env / "src/images"), "--masks", str(nnunet_env / "src/masks"),
            "-d", "620", "--name", "Bad"] + extra
    rc = convert_folder.main(argv)
    err = capsys.readouterr().err
    raw = nnunet_env / "nnUNet_raw"
    assert rc == 2
    assert list(raw.iterdir()) == [], "no output (not even a temp folder) may be left behind"
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_size_mismatch(nnunet_env, capsys):
    make_pairs(nnunet_env / "src", 3)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.uint8)), str(nnunet_env / "src/masks/img2.png"))
    err = run_bad(nnunet_env, capsys, ["--labels", "0=bg,255=fg"])
    assert "size mismatch" in err and "img2.png" in err


def test_bad_unknown_label(nnunet_env, capsys):
    make_pairs(nnunet_env / "src", 3)
    m = np.zeros((32, 40), np.uint8)
    m[0, 0] = 7
    sitk.WriteImage(sitk.GetImageFromArray(m), str(nnunet_env / "src/masks/img1.png"))
    err = run_bad(nnunet_env, capsys, ["--labels", "0=bg,255=fg"])
    assert "unknown label value(s) [7]" in err and "img1.png" in err


def test_bad_missing_mask_and_duplicate_id(nnunet_env, capsys):
    make_pairs(nnunet_env / "src", 3)
    (nnunet_env / "src/masks/img1.png").unlink()
    err = run_bad(nnunet_env, capsys, [])
    assert "missing mask" in err and "img1.png" in err
    make_pairs(nnunet_env / "src", 3)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 40), np.uint8)), str(nnunet_env / "src/images/img1.bmp"))
    err = run_bad(nnunet_env, capsys, [])
    assert "duplicate case id 'img1'" in err and "img1.bmp" in err


def test_bad_unreadable_image(nnunet_env, capsys):
    make_pairs(nnunet_env / "src", 3)
    (nnunet_env / "src/images/img2.png").write_bytes(b"not a png at all")
    err = run_bad(nnunet_env, capsys, ["--labels", "0=bg,255=fg"])
    assert "cannot read" in err and "img2.png" in err


def test_failure_midway_leaves_existing_dataset_untouched(nnunet_env, capsys):
    make_pairs(nnunet_env / "src", 3)
    args = ["--images", str(nnunet_env / "src/images"), "--masks", str(nnunet_env / "src/masks"),
            "-d", "621", "--name", "Keep", "--labels", "0=bg,255=fg"]
    assert convert_folder.main(args) == 0
    out = nnunet_env / "nnUNet_raw" / "Dataset621_Keep"
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert convert_folder.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    (nnunet_env / "src/images/img2.png").write_bytes(b"broken")  # fails on the last case
    assert convert_folder.main(args + ["--overwrite"]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in (nnunet_env / "nnUNet_raw").iterdir()] == ["Dataset621_Keep"]


def test_missing_env_var_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    make_pairs(tmp_path / "src", 2)
    r = subprocess.run([sys.executable, "-m", "dataset_conversion.convert_folder", "--images",
                        str(tmp_path / "src/images"), "--masks", str(tmp_path / "src/masks"), "-d", "630",
                        "--name", "X"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: nnUNet_raw is not set") and "export nnUNet_raw=" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_label_spec_errors():
    with pytest.raises(ConversionError, match="VALUE=NAME"):
        convert_folder.parse_label_spec("0,1")
    with pytest.raises(ConversionError, match="at least one class"):
        convert_folder.parse_label_spec("0=bg")
    assert convert_folder.parse_label_spec("0=bg,7=a,3=b") == ({0: 0, 7: 1, 3: 2}, {"bg": 0, "a": 1, "b": 2})


def test_test_split_patient_level_and_seeded():
    pats = [f"p{i}" for i in range(10)]
    a = patient_level_test_split(pats * 3, 0.2, seed=1)
    assert len(a) == 2 and a == patient_level_test_split(pats, 0.2, seed=1)
    assert any(patient_level_test_split(pats, 0.2, seed=s) != a for s in range(2, 6))
    assert patient_level_test_split(pats, 0.0, seed=1) == set()
