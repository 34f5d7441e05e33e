"""tskd_nnunet.data.splits: the one reader of splits_final.json, with nnU-Net's semantics."""
import json

import pytest

from tskd_nnunet.data.splits import (SplitsError, fold_cases, nnunet_default_splits, num_folds, read_splits,
                                     splits_path, write_splits)

IDS = [f"case_{i:03d}" for i in range(12)]


def test_without_a_file_nnunet_makes_its_own_five_folds(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    assert read_splits(str(tmp_path)) is None and num_folds(str(tmp_path)) == 5
    train, val = fold_cases(str(tmp_path), 2, IDS)
    nnunet = generate_crossval_split(sorted(IDS), seed=12345, n_splits=5)[2]  # nnUNetTrainer.do_split's split
    assert (train, val) == (list(nnunet["train"]), list(nnunet["val"]))
    assert nnunet_default_splits(IDS)[2] == nnunet
    with pytest.raises(SplitsError, match="does not exist.*Fix: label it"):
        fold_cases(str(tmp_path), 0, None, fix="label it")


def test_the_file_wins_and_fold_all_trains_on_every_case(tmp_path):
    splits = [{"train": IDS[:4], "val": IDS[4:6]}, {"train": IDS[6:8], "val": IDS[:2]}]
    assert write_splits(str(tmp_path), splits) and not write_splits(str(tmp_path), splits)  # unchanged: not rewritten
    assert json.loads(open(splits_path(str(tmp_path))).read()) == splits
    assert fold_cases(str(tmp_path), 1) == (IDS[6:8], IDS[:2]) and num_folds(str(tmp_path)) == 2
    assert fold_cases(str(tmp_path), "all", IDS) == (IDS, IDS)  # nnU-Net: fold 'all' validates on its training cases
    with pytest.raises(KeyError, match="fold 2 does not exist.*2 folds"):  # nnU-Net would draw a random split
        fold_cases(str(tmp_path), 2, IDS, error=KeyError)


def test_malformed_file_is_one_line_with_the_fix(tmp_path):
    open(splits_path(str(tmp_path)), "w").write('{"train": []}')
    with pytest.raises(SplitsError, match="not nnU-Net's format.*Fix"):
        read_splits(str(tmp_path))
    open(splits_path(str(tmp_path)), "w").write("[{")
    with pytest.raises(SplitsError, match="not valid JSON"):
        num_folds(str(tmp_path))
