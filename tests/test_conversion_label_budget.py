"""Label-budget splits: patient-level, seeded, N labeled cases, unlabeled pool, nnU-Net's split format."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import label_budget
from dataset_conversion.common import ConversionError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(empty_nnunet_env):
    return empty_nnunet_env


def fake_raw(env: Path, slices_per_patient, dataset="Dataset540_Budget", with_map=True, test_cases=("t_0",)):
    """Minimal raw folder: dataset.json + imagesTr files (content irrelevant for splitting)."""
    d = env / "nnUNet_raw" / dataset
    (d / "imagesTr").mkdir(parents=True)
    (d / "imagesTs").mkdir()
    cmap = {}
    for p, n in enumerate(slices_per_patient):
        for s in range(n):
            cid = f"pat{p:02d}_s{s:02d}"
            (d / "imagesTr" / f"{cid}_0000.png").write_bytes(b"")
            cmap[cid] = f"pat{p:02d}"
    for t in test_cases:
        (d / "imagesTs" / f"{t}_0000.png").write_bytes(b"")
        cmap[t] = "test_patient"
    (d / "dataset.json").write_text(json.dumps({"file_ending": ".png", "numTraining": len(cmap)}))
    if with_map:
        (d / "case_patient_map.json").write_text(json.dumps(cmap))
    return d, cmap


def test_splits_patient_level_reproducible(env, capsys):
    sizes = [5, 3, 8, 4, 6, 2, 7, 5, 3, 6, 4, 5]
    _, cmap = fake_raw(env, sizes)
    splits = label_budget.write_label_budget(540, 20, num_folds=4, seed=3)
    pre = env / "nnUNet_preprocessed" / "Dataset540_Budget"
    assert json.loads((pre / "splits_final.json").read_text()) == splits
    pools = json.loads((pre / "tskd_unlabeled_pool.json").read_text())
    assert len(splits) == len(pools) == 4
    all_train = {c for c in cmap if c != "t_0"}
    vals = []
    for s, pool in zip(splits, pools):
        tr, va, po = set(s["train"]), set(s["val"]), set(pool)
        assert not (tr & va) and not (tr & po) and not (va & po) and tr | va | po == all_train
        assert "t_0" not in tr | va | po
        for a, b in ((tr, va), (tr, po), (va, po)):  # no patient straddles two sets
            assert not ({cmap[c] for c in a} & {cmap[c] for c in b})
        assert abs(len(tr) - 20) <= 2
        vals.append(va)
    assert set().union(*vals) == all_train and sum(len(v) for v in vals) == len(all_train)  # K-fold on val
    out = capsys.readouterr().out
    assert "fold 0:" in out and "labeled cases" in out
    again = label_budget.write_label_budget(540, 20, num_folds=4, seed=3, verbose=False)
    assert again == splits
    assert label_budget.write_label_budget(540, 20, num_folds=4, seed=4, verbose=False) != splits


def test_exact_n_with_single_case_patients_and_no_map(env):
    fake_raw(env, [1] * 30, with_map=False, test_cases=())
    for n in (5, 10, 20):
        splits = label_budget.write_label_budget(540, n, num_folds=3, seed=0, verbose=False)
        assert all(len(s["train"]) == n and len(s["val"]) == 10 for s in splits)
    pools = json.loads((env / "nnUNet_preprocessed/Dataset540_Budget/tskd_unlabeled_pool.json").read_text())
    assert [len(p) for p in pools] == [0, 0, 0]


def test_val_fraction_and_single_fold(env):
    fake_raw(env, [2] * 20, test_cases=())
    splits = label_budget.write_label_budget(540, 8, num_folds=2, seed=1, val_fraction=0.2, verbose=False)
    assert [len(s["val"]) for s in splits] == [8, 8] and all(len(s["train"]) == 8 for s in splits)
    one = label_budget.write_label_budget(540, 6, num_folds=1, seed=1, verbose=False)
    assert len(one) == 1 and len(one[0]["val"]) == 8 and len(one[0]["train"]) == 6


def test_closest_count_without_splitting_patients():
    cases = [f"p{p}_s{s}" for p, n in enumerate([10, 10, 10, 10, 10, 10]) for s in range(n)]
    patient_of = {c: c.split("_")[0] for c in cases}
    splits, _ = label_budget.make_label_budget_splits(cases, patient_of, 16, num_folds=3, seed=0)
    # 10-slice patients: 16 is closer to 20 than to 10
    assert all(len(s["train"]) == 20 for s in splits)
    splits, _ = label_budget.make_label_budget_splits(cases, patient_of, 14, num_folds=3, seed=0)
    assert all(len(s["train"]) == 10 for s in splits)


def test_budget_errors(env):
    fake_raw(env, [1] * 10, test_cases=())
    with pytest.raises(ConversionError, match="exceeds the 8 training cases"):
        label_budget.write_label_budget(540, 9, num_folds=5, seed=0)
    with pytest.raises(ConversionError, match="no Dataset541_"):
        label_budget.write_label_budget(541, 3)
    assert not (env / "nnUNet_preprocessed" / "Dataset540_Budget" / "splits_final.json").exists()


def test_cli_writes_split_and_reports_errors(env):
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    d = env / "nnUNet_raw" / "Dataset542_Tiny"
    for sub in ("imagesTr", "labelsTr"):
        (d / sub).mkdir(parents=True)
    for i in range(8):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((16, 16), i, np.uint8)), str(d / "imagesTr" / f"c{i}_0000.png"))
        sitk.WriteImage(sitk.GetImageFromArray((np.arange(256).reshape(16, 16) % 2).astype(np.uint8)),
                        str(d / "labelsTr" / f"c{i}.png"))
    generate_dataset_json(str(d), {0: "x"}, {"background": 0, "fg": 1}, 8, ".png")
    r = subprocess.run([sys.executable, "-m", "dataset_conversion.label_budget", "-d", "542", "--n-labeled", "3",
                        "--folds", "2", "--seed", "0"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fold 1: 3 labeled cases" in r.stdout
    splits = json.loads((env / "nnUNet_preprocessed" / "Dataset542_Tiny" / "splits_final.json").read_text())
    assert [len(s["train"]) for s in splits] == [3, 3] and all(set(s) == {"train", "val"} for s in splits)
    r = subprocess.run([sys.executable, "-m", "dataset_conversion.label_budget", "-d", "542", "--n-labeled", "30"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: label budget 30 exceeds") and "Traceback" not in r.stderr


def test_spread_draws_slices_from_distinct_patients(env, capsys):
    """Slice datasets: --spread takes one slice per patient per round; the rest of those patients go to the pool."""
    sizes = [35] * 10
    _, cmap = fake_raw(env, sizes)
    r = subprocess.run([sys.executable, "-m", "dataset_conversion.label_budget", "-d", "540", "--n-labeled", "12",
                        "--folds", "5", "--seed", "0", "--spread"], cwd=REPO, capture_output=True, text=True,
                       env={**__import__("os").environ})
    assert r.returncode == 0, r.stderr
    pre = env / "nnUNet_preprocessed" / "Dataset540_Budget"
    splits = json.loads((pre / "splits_final.json").read_text())
    pools = json.loads((pre / "tskd_unlabeled_pool.json").read_text())
    for s, pool in zip(splits, pools):
        tr, va, po = set(s["train"]), set(s["val"]), set(pool)
        assert len(tr) == 12 and not (tr & po) and not (tr & va) and not (va & po)
        assert len({cmap[c] for c in tr}) == 8  # 8 training patients (2 in validation): all used, 4 twice
        assert not ({cmap[c] for c in va} & {cmap[c] for c in tr | po})  # validation stays patient-level
        assert len(tr | po) == 8 * 35
    whole = label_budget.make_label_budget_splits(list(cmap)[:-1], cmap, 12, num_folds=5, seed=0)[0]
    assert all(len(s["train"]) == 35 for s in whole)  # without --spread: one whole patient (never zero)
