"""The transfer set for distillation: labeled training cases + unlabeled ones, as one nnU-Net dataset.

Sources (documentation/conventions.md, "Transfer set"):

* ``labeled``: the fold's ``train`` ids in ``splits_final.json``: the only cases with a supervised loss;
* ``pool``: ``tskd_unlabeled_pool.json[fold]``: real training cases in the same preprocessed folder
  whose labels are *not* used (their segmentation is replaced by zeros when loaded);
* extension: ``tskd_extension/<plans>_<configuration>/fold_<k>/<source>/`` folders in nnU-Net's
  preprocessed format, case ids prefixed ``syn_`` (synthetic) or ``unl_`` (real unlabeled).

``TransferDataset`` is an ``nnUNetBaseDataset`` over all of them, so nnU-Net's own
``nnUNetDataLoader`` and augmentation run unchanged. Unlabeled cases get all-zero segmentations and
empty ``class_locations``, so nnU-Net's foreground oversampling falls back to a random crop for them
(and never peeks at a pool case's real label). ``check_no_leak`` refuses any validation or imagesTs
case in the transfer set; ``check_extension_provenance`` refuses an extension whose manifest records
a generator trained on a validation or imagesTs case of the current split.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type

import numpy as np

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset
from tskd_nnunet.data.preprocessed_files import EXTENSION_DIR, POOL_FILE, dataset_class_for, read_unlabeled_pool  # noqa: F401
from tskd_nnunet.data.splits import splits_path

LABELED, POOL, SYNTHETIC, REAL_UNLABELED = "labeled", "pool", "synthetic", "real-unlabeled"
SOURCES = (LABELED, POOL, SYNTHETIC, REAL_UNLABELED)
EXTENSION_PREFIXES = {"syn_": SYNTHETIC, "unl_": REAL_UNLABELED}


_COUNTS_HEAD = "Transfer set: "
_COUNTS_LINE = re.compile(re.escape(_COUNTS_HEAD) + ", ".join(rf"(\d+) {re.escape(s)}" for s in SOURCES))


def format_counts(counts: Dict[str, int]) -> str:
    """The trainer's log line of what it draws from; ``parse_counts`` reads it back (the benchmark's record)."""
    return _COUNTS_HEAD + ", ".join(f"{counts[s]} {s}" for s in SOURCES)


def parse_counts(log_text: str) -> Optional[Dict[str, int]]:
    """Source -> count from the first ``format_counts`` line in a training log; None when there is none."""
    m = _COUNTS_LINE.search(log_text)
    return None if m is None else dict(zip(SOURCES, map(int, m.groups())))


class TransferSetError(ValueError):
    """The transfer set is inconsistent (leak, missing case, bad file). One line naming file and fix."""


@dataclass
class TransferSet:
    """Which case comes from which folder and source."""
    main_folder: str                                   # nnU-Net's preprocessed folder of the configuration
    labeled: List[str]
    pool: List[str] = field(default_factory=list)
    extension: Dict[str, Tuple[str, List[str]]] = field(default_factory=dict)  # name -> (folder, ids)

    def source_of(self) -> Dict[str, str]:
        src = {i: LABELED for i in self.labeled}
        src.update({i: POOL for i in self.pool})
        for _, ids in self.extension.values():
            src.update({i: extension_kind(i) for i in ids})
        return src

    @property
    def unlabeled(self) -> List[str]:
        return self.pool + [i for _, ids in self.extension.values() for i in ids]

    @property
    def all_ids(self) -> List[str]:
        return self.labeled + self.unlabeled

    def counts(self) -> Dict[str, int]:
        out = {s: 0 for s in SOURCES}
        for s in self.source_of().values():
            out[s] += 1
        return out

    def labeled_only(self) -> "TransferSet":
        return TransferSet(self.main_folder, list(self.labeled))


def extension_kind(identifier: str) -> str:
    for prefix, kind in EXTENSION_PREFIXES.items():
        if identifier.startswith(prefix):
            return kind
    raise TransferSetError(f"extension case {identifier!r} has no 'syn_' or 'unl_' prefix")


def extension_fold_folder(preprocessed_base: str, plans_name: str, configuration: str, fold) -> str:
    return os.path.join(preprocessed_base, EXTENSION_DIR, f"{plans_name}_{configuration}", f"fold_{fold}")


def read_extension(preprocessed_base: str, plans_name: str, configuration: str, fold) -> Dict[str, Tuple[str, List[str]]]:
    """Every non-empty source folder of the fold's extension: name -> (folder, sorted case ids)."""
    root = extension_fold_folder(preprocessed_base, plans_name, configuration, fold)
    if not os.path.isdir(root):
        return {}
    out: Dict[str, Tuple[str, List[str]]] = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue  # temp folders of an unfinished writer start with '.'
        if not any(n.endswith((".b2nd", ".npz")) for n in os.listdir(folder)):
            continue
        ids = sorted(dataset_class_for(folder, "rewrite it with the extension writer").get_identifiers(folder))
        for i in ids:
            try:
                extension_kind(i)
            except TransferSetError:
                raise TransferSetError(f"{folder} holds case {i!r} without a 'syn_'/'unl_' prefix: extension cases "
                                       f"must be written by the extension writer") from None
        out[name] = (folder, ids)
    return out


def raw_test_ids(raw_dataset_folder: Optional[str], file_ending: str) -> Set[str]:
    """Case ids in ``imagesTs`` of the raw dataset (channel suffix _XXXX removed); empty if absent."""
    if not raw_dataset_folder:
        return set()
    folder = os.path.join(raw_dataset_folder, "imagesTs")
    if not os.path.isdir(folder):
        return set()
    pattern = re.compile(r"^(.*)_\d{4}" + re.escape(file_ending) + "$")
    return {m.group(1) for m in (pattern.match(n) for n in os.listdir(folder)) if m}


def check_no_leak(ts: TransferSet, val_ids: Iterable[str], test_ids: Iterable[str], splits_file: str,
                  pool_file: str) -> None:
    """Raise if a validation or test case could be drawn for training, or a pool case is also labeled."""
    val, test = set(val_ids), set(test_ids)
    src = ts.source_of()
    overlap = sorted(set(ts.labeled) & set(ts.pool))
    if overlap:
        raise TransferSetError(f"{pool_file} lists cases that are labeled in {splits_file} ({', '.join(overlap[:5])}); "
                               f"rewrite both with dataset_conversion/label_budget.py")
    for bad, what, where in ((val, "validation", splits_file), (test, "test (imagesTs)", "imagesTs")):
        leaked = sorted(i for i in src if i in bad)
        if leaked:
            origin = {POOL: pool_file, LABELED: splits_file}.get(src[leaked[0]], "the tskd_extension folder")
            raise TransferSetError(f"{len(leaked)} {what} case(s) would be used for distillation ({', '.join(leaked[:5])}"
                                   f", from {origin}; {what} cases are listed in {where}); remove them from {origin}")


def generator_ids_of(folder: str) -> Dict[str, List[str]]:
    """The generator training ids an extension folder's ``manifest.json`` records, per sampling run
    (``"seed <s>" -> ids``); ``{}`` for a folder without sampling runs (e.g. real unlabeled images)."""
    import json
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TransferSetError(f"{path} is unreadable ({e}); delete {folder} and write it again "
                               f"(tskd_sample_diffusion / tskd_preprocess_unlabeled)") from None
    out = {}
    for run in manifest.get("runs", []) if isinstance(manifest, dict) else []:
        if "training_case_ids" not in run:
            raise TransferSetError(f"{path}: sampling run seed {run.get('seed')} records no generator training ids, so "
                                   f"its provenance cannot be checked; delete {folder} and sample again with "
                                   f"tskd_sample_diffusion")
        out[f"seed {run.get('seed')}"] = list(run["training_case_ids"])
    return out


def check_extension_provenance(extension: Dict[str, Tuple[str, List[str]]], val_ids: Iterable[str],
                               test_ids: Iterable[str], splits_file: str, fold) -> None:
    """Refuse a (synthetic) extension whose recorded generator training ids include a validation case
    of this fold or a test (imagesTs) case of the current split: images learned from held-out cases
    must not reach distillation, even when the split changed after the generator was trained."""
    val, test = set(val_ids), set(test_ids)
    for _, (folder, _) in sorted(extension.items()):
        for run, ids in generator_ids_of(folder).items():
            v, t = sorted(set(ids) & val), sorted(set(ids) & test)
            if not (v or t):
                continue
            what = " and ".join(([f"{len(v)} validation case(s) of fold {fold} in {splits_file} ({', '.join(v[:5])})"]
                                 if v else []) +
                                ([f"{len(t)} test (imagesTs) case(s) ({', '.join(t[:5])})"] if t else []))
            raise TransferSetError(f"{os.path.join(folder, 'manifest.json')} ({run}) records a generator trained on "
                                   f"{what}: its synthetic images would leak held-out cases into distillation; "
                                   f"Fix: delete {folder} and sample again from a generator retrained on the current "
                                   f"split (tskd_train_diffusion, then tskd_sample_diffusion)")


def build_transfer_set(preprocessed_base: str, main_folder: str, plans_name: str, configuration: str, fold,
                       train_ids: Sequence[str], val_ids: Sequence[str], test_ids: Iterable[str],
                       main_identifiers: Iterable[str]) -> TransferSet:
    """Collect labeled, pool and extension cases of a fold and check that nothing leaks."""
    pool = read_unlabeled_pool(preprocessed_base, fold)
    pool_file = os.path.join(preprocessed_base, POOL_FILE)
    present = set(main_identifiers)
    missing = [i for i in pool if i not in present]
    if missing:
        raise TransferSetError(f"{pool_file} lists {len(missing)} case(s) not in {main_folder} ({', '.join(missing[:5])});"
                               f" preprocess them or rewrite the pool file")
    ts = TransferSet(main_folder, list(train_ids), pool,
                     read_extension(preprocessed_base, plans_name, configuration, fold))
    clash = sorted(set(ts.labeled + ts.pool) & {i for _, ids in ts.extension.values() for i in ids})
    if clash:
        raise TransferSetError(f"extension case ids clash with preprocessed case ids ({', '.join(clash[:5])}) under "
                               f"{extension_fold_folder(preprocessed_base, plans_name, configuration, fold)}")
    test_ids = set(test_ids)
    splits_file = splits_path(preprocessed_base)
    check_no_leak(ts, val_ids if fold != "all" else [], test_ids, splits_file, pool_file)
    check_extension_provenance(ts.extension, val_ids if fold != "all" else [], test_ids, splits_file, fold)
    return ts


def sampling_probabilities(identifiers: Sequence[str], unlabeled: Set[str], unlabeled_fraction: Optional[float],
                           synthetic: Set[str] = frozenset(),
                           synthetic_fraction: Optional[float] = None) -> Optional[np.ndarray]:
    """Per-identifier probabilities for nnU-Net's DataLoader.

    ``None`` (nnU-Net's uniform draw) when both fractions are None, i.e. each source is drawn in proportion to
    its case count. ``unlabeled_fraction``: the share of samples from unlabeled cases (synthetic included);
    ``synthetic_fraction``: the share from ``synthetic`` cases (a cap, so many synthetic images do not crowd out
    the real ones). Uniform within each group; an empty group's share goes to the others in proportion.
    """
    if not any(i in synthetic for i in identifiers):
        synthetic_fraction = None  # a cap on nothing: the draw is unlabeled_fraction's alone
    if unlabeled_fraction is None and synthetic_fraction is None:
        return None
    UNLABELED, REAL = "unlabeled", "real"  # pool + real-unlabeled (+ synthetic without a share of its own); all real
    if synthetic_fraction is None:
        shares = {LABELED: 1 - unlabeled_fraction, UNLABELED: unlabeled_fraction}
    elif unlabeled_fraction is None:
        shares = {REAL: 1 - synthetic_fraction, SYNTHETIC: synthetic_fraction}
    else:
        shares = {LABELED: 1 - unlabeled_fraction, UNLABELED: unlabeled_fraction - synthetic_fraction,
                  SYNTHETIC: synthetic_fraction}

    def group(i: str) -> str:
        if SYNTHETIC in shares and i in synthetic:
            return SYNTHETIC
        if REAL in shares:
            return REAL
        return UNLABELED if i in unlabeled else LABELED  # every branch without REAL has an UNLABELED share

    groups = [group(i) for i in identifiers]
    size = Counter(groups)
    if len(size) < 2:
        return None
    p = np.array([shares[g] / size[g] for g in groups], dtype=np.float64)
    return p / p.sum()


class TransferDataset(nnUNetBaseDataset):
    """One nnU-Net dataset over the transfer set's folders. Unlabeled cases load with zero segs."""

    def __init__(self, ts: TransferSet, dataset_class: Type[nnUNetBaseDataset],
                 folder_with_segs_from_previous_stage: Optional[str] = None, has_ignore_label: bool = False,
                 annotated_classes_key: Optional[tuple] = None):
        main_ids = ts.labeled + ts.pool
        members: List[Tuple[nnUNetBaseDataset, List[str]]] = []
        if main_ids:
            members.append((dataset_class(ts.main_folder, list(main_ids), folder_with_segs_from_previous_stage),
                            main_ids))
        for name, (folder, ids) in ts.extension.items():
            if folder_with_segs_from_previous_stage is not None:
                raise TransferSetError(f"{folder}: extension cases cannot be used by a cascade stage (no previous-stage "
                                       f"segmentation for them); remove the folder or train a non-cascaded configuration")
            members.append((dataset_class_for(folder, "rewrite it with the extension writer")(folder, list(ids)), ids))
        self._owner = {i: ds for ds, ids in members for i in ids}
        self.identifiers = list(ts.all_ids)   # fixed order: sampling probabilities refer to it
        self.unlabeled = set(ts.unlabeled)
        self.source_folder = ts.main_folder
        self.folder_with_segs_from_previous_stage = folder_with_segs_from_previous_stage
        self._extra_keys = (annotated_classes_key,) if has_ignore_label and annotated_classes_key else ()

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self._owner[identifier].load_case(identifier)
        if identifier in self.unlabeled:
            # np.zeros is calloc'ed: untouched pages cost no memory even for big volumes; the labels of
            # pool cases never leave the disk
            seg = np.zeros(tuple(seg.shape), dtype=np.int16)
            properties = dict(properties)
            keys = list((properties.get("class_locations") or {}).keys()) + list(self._extra_keys)
            properties["class_locations"] = {k: np.zeros((0, len(seg.shape)), dtype=np.int64) for k in keys}
        return data, seg, seg_prev, properties

    def case_file(self, identifier: str) -> str:
        """The case's properties file, written with every (re)write of the case in any nnU-Net format."""
        return os.path.join(self._owner[identifier].source_folder, f"{identifier}.pkl")

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("TransferDataset is read-only; write cases with nnU-Net's dataset classes")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        raise NotImplementedError("TransferDataset is built from a TransferSet, not from one folder")
