"""HC18, CHAOS (slice PNGs, official MR/CT DICOM) and KidneyUS converters on tiny trees in the published layouts."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import assert_integrity  # noqa: E402
from dataset_conversion import (Dataset501_HC18, Dataset502_CHAOS_MR_T2SPIR_slices, Dataset503_CHAOS_MR,
                                Dataset504_CHAOS_CT, Dataset505_KidneyUS)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def env(empty_nnunet_env):
    return empty_nnunet_env




def png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def raw(env: Path, name: str) -> Path:
    return env / "nnUNet_raw" / name


def case_files(folder: Path, sub: str):
    return sorted(p.name for p in (folder / sub).iterdir())


# ------------------------------------------------------------------------------------------------ HC18
def test_hc18_staged_layout(env, capfd):
    src = env / "hc18"
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    for i in range(5):
        img = np.random.default_rng(i).integers(0, 255, (36, 48), dtype=np.uint8)
        m = np.zeros((36, 48), np.uint8)
        m[10:20, 12:30] = 255
        png(img, src / "images" / f"{i:03d}_HC.png")
        png(m, src / "masks" / f"{i:03d}_HC.png")
        rows.append(f"{i:03d}_HC.png,{0.1 + i / 100},50.0")
    (src / "pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")
    assert Dataset501_HC18.main(["--input", str(src)]) == 0
    out = raw(env, "Dataset501_HC18")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "fetal_head": 1} and ds["file_ending"] == ".nii.gz"
    sub = "Tr" if (out / "imagesTr" / "hc18_003_0000.nii.gz").exists() else "Ts"
    img = sitk.ReadImage(str(out / f"images{sub}" / "hc18_003_0000.nii.gz"))
    assert img.GetSize() == (48, 36, 1) and np.allclose(img.GetSpacing(), (0.13, 0.13, 999))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"labels{sub}" / "hc18_003.nii.gz")))
    assert lab.sum() == 10 * 18 and lab.max() == 1
    assert_integrity(out, capfd)


def test_hc18_official_layout_fills_outlines_and_groups_repeats(env, capsys):
    src = env / "hc18off"
    ts = src / "training_set"
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    yy, xx = np.mgrid[:40, :40]
    ring = np.abs(np.hypot(yy - 20, xx - 20) - 10) < 0.8
    for name in ("000_HC", "000_2HC", "001_HC", "002_HC"):
        png(np.full((40, 40), 90, np.uint8), ts / f"{name}.png")
        png((ring * 255).astype(np.uint8), ts / f"{name}_Annotation.png")
        rows.append(f"{name}.png,0.2,60")
    (src / "training_set_pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")
    assert Dataset501_HC18.main(["--input", str(src), "--test-fraction", "0.34"]) == 0
    out = raw(env, "Dataset501_HC18")
    cmap = json.loads((out / "case_patient_map.json").read_text())
    assert cmap["hc18_000_2"] == cmap["hc18_000"] == "hc18_000"
    sub = "Tr" if (out / "labelsTr" / "hc18_001.nii.gz").exists() else "Ts"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"labels{sub}" / "hc18_001.nii.gz")))[0]
    assert lab[20, 20] == 1 and lab[0, 0] == 0 and lab.sum() > ring.sum() * 3  # filled, not an outline
    # missing CSV row → error naming the image, nothing written
    (src / "training_set_pixel_size_and_HC.csv").write_text(rows[0] + "\n" + rows[1] + "\n")
    assert Dataset501_HC18.main(["--input", str(src), "-d", "511"]) == 2
    err = capsys.readouterr().err
    assert "000_2HC.png has no row" in err and not any(p.name.startswith("Dataset511") for p in (env / "nnUNet_raw").iterdir())


def test_hc18_real_shared_subset(env, capfd):
    if not (SHARED / "hc18_fetal_head_us").is_dir():
        pytest.skip(f"shared HC18 data not present at {SHARED / 'hc18_fetal_head_us'}")
    src = env / "hc18real"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
        for n in ("000_HC.png", "001_HC.png", "002_HC.png"):
            (src / sub / n).symlink_to(SHARED / "hc18_fetal_head_us" / sub / n)
    (src / "pixel_size_and_HC.csv").symlink_to(SHARED / "hc18_fetal_head_us" / "pixel_size_and_HC.csv")
    assert Dataset501_HC18.main(["--input", str(src), "--test-fraction", "0"]) == 0
    img = sitk.ReadImage(str(raw(env, "Dataset501_HC18") / "imagesTr" / "hc18_000_0000.nii.gz"))
    assert img.GetSize() == (800, 540, 1) and abs(img.GetSpacing()[0] - 0.069135804) < 1e-6


# ------------------------------------------------------------------------------------ CHAOS slice PNGs
def make_chaos_slices(root: Path, patients=(1, 2, 3, 5), n_slices=3, grey=False):
    for p in patients:
        for s in range(n_slices):
            img = (np.arange(32 * 32).reshape(32, 32) * (p + s)).astype(np.uint16)
            m = np.zeros((32, 32), np.uint8)
            m[4:10, 4:10], m[12:16, 4:8], m[20:24, 4:8], m[4:8, 20:30] = 1, 2, 3, 4
            if grey:
                m = (m.astype(np.uint16) * 63).astype(np.uint8)
            png(img, root / "images" / f"chaos_t2_p{p:02d}_s{s:02d}.png")
            png(m, root / "masks" / f"chaos_t2_p{p:02d}_s{s:02d}.png")


def test_chaos_slices_patient_level_split(env, capfd):
    make_chaos_slices(env / "cs", grey=True)
    assert Dataset502_CHAOS_MR_T2SPIR_slices.main(["--input", str(env / "cs"), "--test-fraction", "0.25"]) == 0
    out = raw(env, "Dataset502_CHAOS_MR_T2SPIR")
    test_ids = {n.split("_s")[0] for n in case_files(out, "labelsTs")}
    train_ids = {n.split("_s")[0] for n in case_files(out, "labelsTr")}
    assert len(test_ids) == 1 and not test_ids & train_ids and len(case_files(out, "labelsTs")) == 3
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / case_files(out, "labelsTr")[0])))
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    img = sitk.ReadImage(str(out / "imagesTr" / case_files(out, "imagesTr")[0]))
    assert np.allclose(img.GetSpacing(), (1.25, 1.25, 999)) and img.GetPixelID() == sitk.sitkUInt16
    assert_integrity(out, capfd)


def test_chaos_slices_real_shared_subset(env):
    real = SHARED / "chaos_mr_t2spir"
    if not real.is_dir():
        pytest.skip(f"shared CHAOS data not present at {real}")
    src = env / "csreal"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
        for n in ("chaos_t2_p01_s15.png", "chaos_t2_p02_s15.png"):
            (src / sub / n).symlink_to(real / sub / n)
    assert Dataset502_CHAOS_MR_T2SPIR_slices.main(["--input", str(src), "--test-fraction", "0"]) == 0
    out = raw(env, "Dataset502_CHAOS_MR_T2SPIR")
    assert case_files(out, "labelsTr") == ["chaos_p01_s15.nii.gz", "chaos_p02_s15.nii.gz"]
    orig = sitk.GetArrayFromImage(sitk.ReadImage(str(real / "images" / "chaos_t2_p01_s15.png")))
    conv = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "chaos_p01_s15_0000.nii.gz")))[0]
    assert np.array_equal(orig, conv)


# ---------------------------------------------------------------------------------- CHAOS official DICOM
def write_series(folder: Path, vol: np.ndarray, names, spacing=(1.5, 1.4, 6.0), modality="MR", z0=10.0):
    """One DICOM file per slice; slice k (array order = increasing z) is written under names[k]."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        img = sitk.GetImageFromArray(vol[k:k + 1])
        img.SetSpacing(spacing)
        img.SetOrigin((-5.0, 7.0, z0 + spacing[2] * k))
        for tag, val in {"0008|0060": modality, "0010|0020": "anon", "0020|0013": str(k + 1),
                         "0020|000e": f"1.2.826.0.1.{k}", "0008|0018": f"1.2.826.0.2.{k}"}.items():
            img.SetMetaData(tag, val)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / name))
        w.Execute(img)


def mr_labels(nz=4, shape=(24, 28)):
    lab = np.zeros((nz,) + shape, np.uint8)
    for k in range(nz):
        lab[k, 2 + k:8 + k, 2:8] = 1
        lab[k, 12:16, 3:7], lab[k, 12:16, 15:19], lab[k, 18:22, 20:26] = 2, 3, 4
    return lab


def test_chaos_mr_t2spir_dicom(env, capfd):
    lab = mr_labels()
    grey = np.array([0, 63, 126, 189, 252], np.uint8)
    for p in ("1", "2", "5"):
        vol = (np.arange(lab.size).reshape(lab.shape) % 400 + int(p)).astype(np.int16)
        d = env / "CHAOS_Train_Sets" / "Train_Sets" / "MR" / p / "T2SPIR"
        # file 00001 is the TOP slice: the converter must sort by position, and masks must follow their DICOM
        names = [f"IMG-0002-{4 - k:05d}" for k in range(4)]
        write_series(d / "DICOM_anon", vol, [n + ".dcm" for n in names])
        for k, n in enumerate(names):
            g = grey[lab[k]]
            g[g == 63] = 60  # inside the CHAOS liver range 55-70
            png(g, d / "Ground" / f"{n}.png")
    assert Dataset503_CHAOS_MR.main(["--input", str(env / "CHAOS_Train_Sets"), "--test-fraction", "0.34"]) == 0
    out = raw(env, "Dataset503_CHAOS_MR_T2SPIR")
    assert len(case_files(out, "labelsTr")) == 2 and len(case_files(out, "labelsTs")) == 1
    sub = "Tr" if (out / "labelsTr" / "chaos_mr_05.nii.gz").exists() else "Ts"
    li = sitk.ReadImage(str(out / f"labels{sub}" / "chaos_mr_05.nii.gz"))
    im = sitk.ReadImage(str(out / f"images{sub}" / "chaos_mr_05_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(li), lab)
    assert np.array_equal(sitk.GetArrayFromImage(im), (np.arange(lab.size).reshape(lab.shape) % 400 + 5))
    assert np.allclose(im.GetSpacing(), (1.5, 1.4, 6.0)) and np.allclose(im.GetOrigin(), (-5, 7, 10))
    assert_integrity(out, capfd)


def test_chaos_mr_t1dual_two_channels(env, capfd):
    lab = mr_labels(nz=3)
    grey = np.array([0, 63, 126, 189, 252], np.uint8)
    for p in ("1", "2"):
        d = env / "C" / "Train_Sets" / "MR" / p / "T1DUAL"
        inp = np.full(lab.shape, 100, np.int16)
        outp = np.full(lab.shape, 200, np.int16)
        write_series(d / "DICOM_anon" / "InPhase", inp, [f"IMG-0004-{2 * k + 2:05d}.dcm" for k in range(3)])
        write_series(d / "DICOM_anon" / "OutPhase", outp, [f"IMG-0004-{2 * k + 1:05d}.dcm" for k in range(3)])
        for k in range(3):
            png(grey[lab[k]], d / "Ground" / f"IMG-0004-{2 * k + 2:05d}.png")
    assert Dataset503_CHAOS_MR.main(["--input", str(env / "C"), "--sequence", "T1DUAL", "--test-fraction", "0"]) == 0
    out = raw(env, "Dataset503_CHAOS_MR_T1DUAL")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1_InPhase", "1": "T1_OutPhase"}
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "chaos_mr_02_0001.nii.gz"))).max() == 200
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "chaos_mr_02.nii.gz"))), lab)
    assert_integrity(out, capfd)


def make_ct(root: Path, patients=("1", "2")):
    lab = np.zeros((3, 20, 24), np.uint8)
    lab[:, 5:12, 6:14] = 1
    for p in patients:
        d = root / "Train_Sets" / "CT" / p
        write_series(d / "DICOM_anon", np.full(lab.shape, -100, np.int16),
                     [f"i{k:04d},0000b.dcm" for k in range(3)], spacing=(0.7, 0.7, 2.5), modality="CT")
        for k in range(3):
            png(lab[k] * 255, d / "Ground" / f"liver_GT_{k:03d}.png")
    return lab


def test_chaos_ct_dicom(env, capfd):
    lab = make_ct(env / "CT_src")
    assert Dataset504_CHAOS_CT.main(["--input", str(env / "CT_src"), "--test-fraction", "0"]) == 0
    out = raw(env, "Dataset504_CHAOS_CT")
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "chaos_ct_01.nii.gz"))), lab)
    assert_integrity(out, capfd)


def test_chaos_bad_inputs_name_the_file(env, capsys):
    root = env / "CT_bad"
    make_ct(root)
    bad = root / "Train_Sets" / "CT" / "2" / "DICOM_anon" / "i0001,0000b.dcm"
    good = bad.read_bytes()
    bad.write_bytes(b"\0" * 64)
    assert Dataset504_CHAOS_CT.main(["--input", str(root)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and str(bad) in err
    bad.write_bytes(good)
    g = root / "Train_Sets" / "CT" / "1" / "Ground" / "liver_GT_001.png"
    png(np.full((20, 24), 128, np.uint8), g)
    assert Dataset504_CHAOS_CT.main(["--input", str(root)]) == 2
    err = capsys.readouterr().err
    assert "unknown label value(s) [128]" in err and str(g) in err
    png(np.zeros((21, 24), np.uint8), g)
    assert Dataset504_CHAOS_CT.main(["--input", str(root)]) == 2
    err = capsys.readouterr().err
    assert "size mismatch" in err and str(g) in err
    g.unlink()
    assert Dataset504_CHAOS_CT.main(["--input", str(root)]) == 2
    assert "2 masks in" in capsys.readouterr().err
    assert list((env / "nnUNet_raw").iterdir()) == []


def test_chaos_unreadable_dicom_message_names_file(env, capsys):
    root = env / "CT_bad2"
    make_ct(root, patients=("1",))
    bad = root / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "i0002,0000b.dcm"
    bad.write_bytes(b"garbage" * 20)
    assert Dataset504_CHAOS_CT.main(["--input", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {bad}" in err and err.count("\n") == 1
    assert list((env / "nnUNet_raw").iterdir()) == []


# ------------------------------------------------------------------------------------------- KidneyUS
KUS_SUBSET = ["110_IM-0026-0001_anon.png", "402_IM-0026-0001_anon.png", "414_IM-0026-0001_anon.png",
              "110_IM-0026-0005_anon.png", "1_IM-0001-0059_anon.png", "100_IM-0246-0030_anon.png"]


def kidneyus_tree(env: Path, real: Path) -> Path:
    """Real label files (symlinked subset, real names/values/sizes) + fabricated images of the same size."""
    labels, images = env / "labels", env / "kus_images"
    for r in (1, 2):
        (labels / f"reviewed_labels_{r}.csv").parent.mkdir(parents=True, exist_ok=True)
        (labels / f"reviewed_labels_{r}.csv").symlink_to(real / f"reviewed_labels_{r}.csv")
        for task in ("capsule", "regions"):
            d = labels / f"reviewed_masks_{r}" / task
            d.mkdir(parents=True)
            for n in KUS_SUBSET:
                (d / n).symlink_to(real / f"reviewed_masks_{r}" / task / n)
    images.mkdir()
    for n in KUS_SUBSET:
        w, h = sitk.ReadImage(str(real / "reviewed_masks_1" / "capsule" / n)).GetSize()
        g = np.random.default_rng(len(n)).integers(0, 255, (h, w), dtype=np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([g, g, g], -1), isVector=True), str(images / n))
    return images


def test_kidneyus_real_labels(env, capfd):
    real = SHARED / "kidneyus_labels_only"
    if not real.is_dir():
        pytest.skip(f"KidneyUS label files not present at {real} (needed for this test)")
    images = kidneyus_tree(env, real)
    assert Dataset505_KidneyUS.main(["--images", str(images), "--labels", str(env / "labels"), "--task", "regions",
                                     "--rater", "2", "--test-fraction", "0.3"]) == 0
    out = raw(env, "Dataset505_KidneyUS_regions_r2")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "central_echo_complex": 1, "medulla": 2, "cortex": 3}
    assert ds["file_ending"] == ".png" and ds["numTraining"] + ds["numTest"] == len(KUS_SUBSET)
    cmap = json.loads((out / "case_patient_map.json").read_text())
    # the three copies of IM-0026-0001 and the second frame under leading number 110 are one patient
    assert len({cmap[n[:-4]] for n in KUS_SUBSET[:4]}) == 1 and len(set(cmap.values())) == 3
    sub = "Tr" if (out / "labelsTr" / "1_IM-0001-0059_anon.png").exists() else "Ts"
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"labels{sub}" / "1_IM-0001-0059_anon.png")))
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(real / "reviewed_masks_2/regions/1_IM-0001-0059_anon.png")))
    assert np.array_equal(got, want) and set(np.unique(got)) <= {0, 1, 2, 3}
    assert_integrity(out, capfd)
    # capsule task, rater 1, into another id
    assert Dataset505_KidneyUS.main(["--images", str(images), "--labels", str(env / "labels"), "-d", "506"]) == 0
    assert json.loads((raw(env, "Dataset506_KidneyUS_capsule_r1") / "dataset.json").read_text())["labels"] == \
        {"background": 0, "capsule": 1}


def test_kidneyus_grouping_on_all_real_names():
    real = SHARED / "kidneyus_labels_only" / "reviewed_masks_1" / "capsule"
    if not real.is_dir():
        pytest.skip(f"KidneyUS label files not present at {real}")
    names = sorted(p.name for p in real.glob("*.png"))
    groups = Dataset505_KidneyUS.patient_groups(names)
    assert len(names) == 534
    by_image = {}
    for n in names:
        by_image.setdefault(n.split("_", 1)[1], set()).add(groups[n])
    assert all(len(g) == 1 for g in by_image.values())  # repeated images never in two groups
    assert 480 <= len(set(groups.values())) <= 514


def test_kidneyus_missing_image_and_bad_mask_value(env, capsys):
    real = SHARED / "kidneyus_labels_only"
    if not real.is_dir():
        pytest.skip(f"KidneyUS label files not present at {real}")
    images = kidneyus_tree(env, real)
    (images / KUS_SUBSET[4]).unlink()
    args = ["--images", str(images), "--labels", str(env / "labels")]
    assert Dataset505_KidneyUS.main(args) == 2
    assert f"missing image {images / KUS_SUBSET[4]}" in capsys.readouterr().err
    shutil.copy(real / "reviewed_masks_1" / "regions" / KUS_SUBSET[4], images / KUS_SUBSET[4])  # right size
    m = env / "labels" / "reviewed_masks_1" / "capsule" / KUS_SUBSET[5]
    m.unlink()
    w, h = sitk.ReadImage(str(images / KUS_SUBSET[5])).GetSize()
    png(np.full((h, w), 2, np.uint8), m)  # 2 is not a capsule label
    assert Dataset505_KidneyUS.main(args) == 2
    err = capsys.readouterr().err
    assert "unknown label value(s) [2]" in err and str(m) in err
    assert list((env / "nnUNet_raw").iterdir()) == []


@pytest.mark.slow  # about 60 s on 2 cores: the real console command plans and preprocesses
def test_console_plan_and_preprocess_after_label_budget(env):
    """The real nnU-Net command on a tiny converted dataset; a label budget written before it survives."""
    import subprocess
    import sys

    from dataset_conversion import label_budget
    make_chaos_slices(env / "cs", patients=(1, 2, 3, 4, 5), n_slices=2)
    assert Dataset502_CHAOS_MR_T2SPIR_slices.main(["--input", str(env / "cs"), "-d", "590"]) == 0
    splits = label_budget.write_label_budget(590, 2, num_folds=2, seed=0, verbose=False)
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    r = subprocess.run([str(exe), "-d", "590", "--verify_dataset_integrity", "-c", "2d", "-np", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "verify_dataset_integrity Done" in r.stdout and "WARNING" not in r.stdout
    pre = env / "nnUNet_preprocessed" / "Dataset590_CHAOS_MR_T2SPIR"
    assert json.loads((pre / "splits_final.json").read_text()) == splits
    data = [p for p in (pre / "nnUNetPlans_2d").glob("*.b2nd") if not p.name.endswith("_seg.b2nd")]
    assert len(data) == 8  # the 8 training slices (test patient excluded)
