"""Transfer set: labeled + pool + extension cases as one nnU-Net dataset, and its leak guard."""
import json
import os
import shutil
from typing import Dict, Optional

import numpy as np
import pytest

from conftest import BIN, PHANTOM_ID, run_cmd, train_env

DATASET = f"Dataset{PHANTOM_ID}_Phantom"
TRAIN = [f"phantom_tr{i:03d}" for i in range(4)]
VAL = [f"phantom_tr{i:03d}" for i in range(4, 7)]
POOL = [f"phantom_tr{i:03d}" for i in range(7, 12)]


def make_distill_dataset(nnunet_env: Dict[str, str], root: str) -> Dict[str, str]:
    """A private copy of the session's preprocessed phantom with a label budget (4 labeled, 3 val,
    5 pool cases in fold 0) and an extension of one synthetic and one real-unlabeled case.
    Returns an env whose nnUNet_preprocessed points at the copy."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    pre = os.path.join(root, "nnUNet_preprocessed")
    base = os.path.join(pre, DATASET)
    # only nnU-Net's own files: targets or extensions another test left in the session folder are not this copy's
    shutil.copytree(os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET), base,
                    ignore=shutil.ignore_patterns("splits_final.json", "tskd_*"))
    with open(os.path.join(base, "splits_final.json"), "w") as f:
        json.dump([{"train": TRAIN, "val": VAL}], f)
    with open(os.path.join(base, "tskd_unlabeled_pool.json"), "w") as f:
        json.dump([POOL], f)
    main = nnUNetDatasetBlosc2(os.path.join(base, "nnUNetPlans_2d"))
    for source, case, src_case in (("synthetic", "syn_000", POOL[0]), ("unlabeled", "unl_000", POOL[1])):
        folder = os.path.join(base, "tskd_extension", "nnUNetPlans_2d", "fold_0", source)
        os.makedirs(folder)
        data, seg, _, props = main.load_case(src_case)
        data = np.asarray(data[:]) + 0.1  # not byte-identical to the pool case
        props = dict(props, class_locations={1: np.zeros((0, 4), dtype=np.int64)})
        blocks, chunks = comp_blosc2_params(data.shape, (64, 64))
        nnUNetDatasetBlosc2.save_case(data, np.zeros(seg.shape, dtype=np.int16), props, os.path.join(folder, case),
                                      chunks=chunks, blocks=blocks)
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"cases": [case]}, f)
    return dict(nnunet_env, nnUNet_preprocessed=pre)


def distill_env_with_teacher(nnunet_env: Dict[str, str], root: str, teacher: str,
                             extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``make_distill_dataset`` under ``root``, an nnUNet_results folder there, and ``teacher`` trained on fold 0
    (``extra``: more variables for the returned env)."""
    env = make_distill_dataset(nnunet_env, root)
    results = os.path.join(root, "nnUNet_results")
    os.makedirs(results)
    env = train_env(env, results, extra)
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", teacher, "-device", "cpu"], env)
    return env


@pytest.fixture(scope="module")
def distill_data(nnunet_env, tmp_path_factory):
    env = make_distill_dataset(nnunet_env, str(tmp_path_factory.mktemp("distill_data")))
    return os.path.join(env["nnUNet_preprocessed"], DATASET), env


def _build(base, test_ids=(), fold=0, train=TRAIN, val=VAL):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from tskd_nnunet.data.transfer_set import build_transfer_set
    main = os.path.join(base, "nnUNetPlans_2d")
    return build_transfer_set(base, main, "nnUNetPlans", "2d", fold, train, val, set(test_ids),
                              nnUNetDatasetBlosc2.get_identifiers(main))


def test_sources_and_unlabeled_cases_load_without_labels(distill_data):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from tskd_nnunet.data.transfer_set import TransferDataset, format_counts, parse_counts

    base, _ = distill_data
    ts = _build(base)
    assert ts.counts() == {"labeled": 4, "pool": 5, "synthetic": 1, "real-unlabeled": 1}
    # the log line of the counts reads back as written (the benchmark records it per run)
    assert parse_counts("...: " + format_counts(ts.counts()) + "; validation: 4 cases") == ts.counts()
    assert parse_counts("no such line") is None
    ds = TransferDataset(ts, nnUNetDatasetBlosc2)
    assert sorted(ds.identifiers) == sorted(TRAIN + POOL + ["syn_000", "unl_000"])
    data, seg, _, props = ds.load_case(TRAIN[0])
    assert np.asarray(seg[:]).max() == 1 and len(props["class_locations"][1]) > 0
    data, seg, _, props = ds.load_case(POOL[0])   # a pool case has a real label on disk, never shown
    assert np.asarray(seg).max() == 0 and all(len(v) == 0 for v in props["class_locations"].values())
    data, seg, _, props = ds.load_case("syn_000")
    assert data.shape[0] == 1 and np.asarray(seg).max() == 0


def test_loader_draws_only_transfer_cases_with_requested_fraction(distill_data):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from tskd_nnunet.data.transfer_set import TransferDataset, sampling_probabilities

    base, _ = distill_data
    ds = TransferDataset(_build(base), nnUNetDatasetBlosc2)
    assert sampling_probabilities(ds.identifiers, ds.unlabeled, None) is None  # nnU-Net's uniform draw
    probs = sampling_probabilities(ds.identifiers, ds.unlabeled, 0.25)
    assert probs.sum() == pytest.approx(1.0)
    assert sum(p for i, p in zip(ds.identifiers, probs) if i in ds.unlabeled) == pytest.approx(0.25)
    np.random.seed(0)
    dl = nnUNetDataLoader(ds, 8, (64, 64), (64, 64), LabelManager({"background": 0, "head": 1}, None),
                          oversample_foreground_percent=1.0, sampling_probabilities=probs)
    keys = [str(k) for _ in range(40) for k in next(dl)["keys"]]
    assert not set(keys) & set(VAL)
    frac = np.mean([k in ds.unlabeled for k in keys])
    assert 0.17 < frac < 0.33   # 320 draws at p = 0.25


def test_synthetic_share_is_capped_without_changing_the_real_cases_draw(monkeypatch):
    """TSKD_SYNTHETIC_FRACTION: many synthetic images take a fixed share of the batch, not one per case."""
    from tskd_nnunet import config
    from tskd_nnunet.data.transfer_set import sampling_probabilities

    labeled, pool, syn = ["a", "b"], ["p1", "p2"], [f"syn_{k}" for k in range(96)]
    ids, unlabeled, synthetic = labeled + pool + syn, set(pool + syn), set(syn)

    def share(p, group):
        return sum(x for i, x in zip(ids, p) if i in group)
    assert sampling_probabilities(ids, unlabeled, None, synthetic, None) is None  # uniform: 96% synthetic
    p = sampling_probabilities(ids, unlabeled, None, synthetic, 0.2)
    assert share(p, synthetic) == pytest.approx(0.2)
    assert p[0] == pytest.approx(p[2]) == pytest.approx(0.8 / 4)  # real cases: in proportion to their counts
    p = sampling_probabilities(ids, unlabeled, 0.5, synthetic, 0.2)
    assert share(p, synthetic) == pytest.approx(0.2) and share(p, pool) == pytest.approx(0.3)
    assert share(p, labeled) == pytest.approx(0.5)
    # no synthetic case: the cap changes nothing
    assert sampling_probabilities(labeled + pool, set(pool), None, set(), 0.2) is None
    assert sampling_probabilities(labeled + pool, set(pool), 0.5, set(), 0.2) == pytest.approx([0.25] * 4)

    monkeypatch.setenv("TSKD_SYNTHETIC_FRACTION", "0.2")
    assert config.synthetic_fraction_from_env() == 0.2
    monkeypatch.setenv("TSKD_UNLABELED_FRACTION", "0.1")  # synthetic cases are unlabeled: 0.2 of 0.1 cannot be
    with pytest.raises(config.TSKDConfigError, match="at most TSKD_UNLABELED_FRACTION"):
        config.synthetic_fraction_from_env()


def test_leaks_are_refused_with_the_file_named(distill_data):
    from tskd_nnunet.data.transfer_set import TransferSetError

    base, _ = distill_data
    with pytest.raises(TransferSetError, match=r"validation case\(s\).*phantom_tr004.*splits_final.json"):
        _build(base, train=TRAIN + [VAL[0]])
    with pytest.raises(TransferSetError, match=r"test \(imagesTs\) case\(s\).*phantom_tr008.*tskd_unlabeled_pool.json"):
        _build(base, test_ids=["phantom_tr008"])
    pool_file = os.path.join(base, "tskd_unlabeled_pool.json")
    original = open(pool_file).read()
    try:
        with open(pool_file, "w") as f:
            json.dump([POOL + [VAL[1]]], f)
        with pytest.raises(TransferSetError, match=r"phantom_tr005.*from .*tskd_unlabeled_pool.json"):
            _build(base)
        with open(pool_file, "w") as f:
            json.dump([POOL + ["phantom_ts000"]], f)
        with pytest.raises(TransferSetError, match=r"not in .*nnUNetPlans_2d \(phantom_ts000\)"):
            _build(base)
    finally:
        with open(pool_file, "w") as f:
            f.write(original)


def test_extension_cases_need_a_prefix(distill_data):
    from tskd_nnunet.data.transfer_set import TransferSetError

    base, _ = distill_data
    folder = os.path.join(base, "tskd_extension", "nnUNetPlans_2d", "fold_0", "synthetic")
    bad = [os.path.join(folder, n) for n in ("case.b2nd", "case_seg.b2nd", "case.pkl")]
    for src, dst in zip(("syn_000.b2nd", "syn_000_seg.b2nd", "syn_000.pkl"), bad):
        shutil.copy(os.path.join(folder, src), dst)
    try:
        with pytest.raises(TransferSetError, match=r"synthetic holds case 'case' without a 'syn_'/'unl_' prefix"):
            _build(base)
    finally:
        for p in bad:
            os.remove(p)


def test_synthetic_extension_from_a_generator_trained_on_held_out_cases_is_refused(distill_data):
    """The manifest records the generator's training ids; a validation case of the fold (the split changed
    after the generator was trained) or an imagesTs case among them refuses the extension."""
    from tskd_nnunet.data.transfer_set import TransferSetError

    base, _ = distill_data
    folder = os.path.join(base, "tskd_extension", "nnUNetPlans_2d", "fold_0", "synthetic")
    manifest = os.path.join(folder, "manifest.json")
    original = open(manifest).read()

    def record(ids):
        with open(manifest, "w") as f:
            json.dump({"cases": ["syn_000"], "runs": [{"seed": 3, "training_case_ids": ids}]}, f)
    try:
        record(TRAIN + POOL)                        # trained on the fold's training cases: fine
        assert _build(base).counts()["synthetic"] == 1
        record(TRAIN + POOL + [VAL[0]])
        with pytest.raises(TransferSetError) as e:
            _build(base)
        msg = str(e.value)
        assert "\n" not in msg and manifest in msg and os.path.join(base, "splits_final.json") in msg
        assert "seed 3" in msg and "phantom_tr004" in msg and "validation case(s) of fold 0" in msg
        assert "Fix: delete" in msg and "tskd_train_diffusion" in msg
        record(TRAIN + ["phantom_ts000"])
        with pytest.raises(TransferSetError, match=r"manifest.json \(seed 3\).*test \(imagesTs\) case\(s\) "
                                                   r"\(phantom_ts000\)"):
            _build(base, test_ids=["phantom_ts000"])
        with open(manifest, "w") as f:               # a sampling run without ids cannot be checked
            json.dump({"runs": [{"seed": 4}]}, f)
        with pytest.raises(TransferSetError, match=r"seed 4 records no generator training ids"):
            _build(base)
    finally:
        with open(manifest, "w") as f:
            f.write(original)
