"""The transfer-set extension: unlabeled cases stored beside nnU-Net's preprocessed data.

Layout (documentation/conventions.md)::

    $nnUNet_preprocessed/DatasetXXX/tskd_extension/<plans>_<configuration>/fold_<k>/<source>/

with ``source`` = ``synthetic`` (diffusion samples, ids ``syn_*``) or ``unlabeled`` (real raw images
without labels, ids ``unl_*``). Each folder holds cases in exactly the format of the configuration's
preprocessed folder, written by nnU-Net's own dataset class (``nnUNetDatasetBlosc2`` /
``nnUNetDatasetNumpy``), so nnU-Net's dataloader and augmentation read them unchanged, plus a
``manifest.json``. Segmentations are all zeros and carry no information.

Atomicity: a case is first written completely into a hidden sibling folder, then its files are
moved in with ``os.replace``, the data file (the one nnU-Net derives identifiers from) last. A
process killed at any point therefore leaves either no case or orphan side files that neither
nnU-Net nor :func:`list_extension_cases` sees, and which the next writer removes.

Readers: :func:`extension_folder`, :func:`list_extension_cases` and :func:`extension_dataset_class`
are the stable API used by ``tskd_nnunet.data.transfer_set``. Note that nnU-Net's
``infer_dataset_class`` must be applied to the *preprocessed configuration folder*, not to an
extension folder (``manifest.json`` there would confuse it); :func:`extension_dataset_class` does that.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from typing import Dict, List, Optional, Sequence, Type, Union

import numpy as np

# the package's one atomic JSON writer, under the name synthetic/cases.py imports
from tskd_nnunet.atomic_io import atomic_write_json as write_json_atomic  # noqa: F401
from tskd_nnunet.data.preprocessed_files import EXTENSION_DIR

SOURCES = ("synthetic", "unlabeled")
PREFIXES = {"synthetic": "syn_", "unlabeled": "unl_"}
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp_"


class ExtensionError(ValueError):
    """Bad input for the extension; the message names the file or setting and the fix."""


# ----------------------------------------------------------------------------- locations
def _preprocessed_root() -> str:
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ExtensionError("nnUNet_preprocessed is not set. Fix: export nnUNet_preprocessed=/path/to/nnUNet_preprocessed")
    return root


def dataset_name(dataset_name_or_id: Union[int, str]) -> str:
    """``990`` / ``"990"`` / ``"Dataset990_Phantom"`` -> ``"Dataset990_Phantom"`` (nnU-Net's own lookup)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise ExtensionError(f"dataset {dataset_name_or_id!r} not found under nnUNet_raw/nnUNet_preprocessed. "
                             f"Fix: run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} first ({e.args[0].splitlines()[0]})") from None


def _fold_name(fold: Union[int, str]) -> str:
    if str(fold) == "all":
        return "fold_all"
    try:
        return f"fold_{int(fold)}"
    except ValueError:
        raise ExtensionError(f"fold {fold!r} is neither an integer nor 'all'. Fix: pass e.g. 0 or all") from None


def extension_root(dataset_name_or_id: Union[int, str], plans: str, configuration: str) -> str:
    """``$nnUNet_preprocessed/DatasetXXX/tskd_extension/<plans>_<configuration>``."""
    return os.path.join(_preprocessed_root(), dataset_name(dataset_name_or_id), EXTENSION_DIR,
                        f"{plans}_{configuration}")


def extension_folder(dataset_name_or_id: Union[int, str], plans: str, configuration: str,
                     fold: Union[int, str], source: str) -> str:
    """Folder of one extension source for one fold (it need not exist yet)."""
    if source not in SOURCES:
        raise ExtensionError(f"unknown extension source {source!r}. Fix: use one of {', '.join(SOURCES)}")
    return os.path.join(extension_root(dataset_name_or_id, plans, configuration), _fold_name(fold), source)


# data-file ending -> the other files a complete case needs, for nnU-Net's two formats
_CASE_FILES: Dict[str, List[str]] = {".b2nd": ["_seg.b2nd", ".pkl"], ".npz": [".pkl"]}


def list_extension_cases(folder: str) -> List[str]:
    """Sorted identifiers of the *complete* cases in an extension folder ([] if it does not exist).

    A case is complete when its data file and all side files of its format exist; orphans left by
    an interrupted write are not listed."""
    if not os.path.isdir(folder):
        return []
    names = set(os.listdir(folder))
    cases = []
    for name in names:
        for ending, others in _CASE_FILES.items():
            if name.endswith(ending) and not name.endswith("_seg" + ending):
                ident = name[: -len(ending)]
                if all(ident + o in names for o in others):
                    cases.append(ident)
    return sorted(cases)


def preprocessed_config_folder(dataset_name_or_id: Union[int, str], plans: str, configuration: str) -> str:
    """nnU-Net's preprocessed folder of a configuration (``data_identifier`` from the plans)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    base = os.path.join(_preprocessed_root(), dataset_name(dataset_name_or_id))
    plans_file = os.path.join(base, plans + ".json")
    if not os.path.isfile(plans_file):
        raise ExtensionError(f"plans file {plans_file} not found. Fix: run nnUNetv2_plan_and_preprocess or pass the "
                             f"right plans identifier (-p)")
    pm = PlansManager(plans_file)
    if configuration not in pm.available_configurations:
        raise ExtensionError(f"configuration {configuration!r} is not in {plans_file}. Fix: use one of "
                             f"{', '.join(pm.available_configurations)}")
    return os.path.join(base, pm.get_configuration(configuration).data_identifier)


def extension_dataset_class(dataset_name_or_id: Union[int, str], plans: str, configuration: str) -> Type:
    """The nnU-Net dataset class (Blosc2 or Numpy) for this configuration's format."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = preprocessed_config_folder(dataset_name_or_id, plans, configuration)
    if not os.path.isdir(folder) or not any(f.endswith(".pkl") for f in os.listdir(folder)):
        raise ExtensionError(f"preprocessed folder {folder} is missing or empty. Fix: run nnUNetv2_plan_and_preprocess "
                             f"-d {dataset_name_or_id} -c {configuration}")
    return infer_dataset_class(folder)


# ----------------------------------------------------------------------------- manifest
def read_manifest(folder: str) -> dict:
    """The folder's manifest, or ``{}`` when there is none yet."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ExtensionError(f"{path} is not valid JSON ({e}). Fix: delete it and re-run the command that wrote "
                             f"the folder") from None


def write_manifest(folder: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(folder, MANIFEST), manifest)


# ----------------------------------------------------------------------------- writing
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExtensionWriter:
    """Writes cases of one extension folder in the configuration's own preprocessed format.

    Properties mirror a real preprocessed case's ``.pkl`` (same keys), with shapes set to the new
    case, no cropping, and ``class_locations`` empty for every label/region key, so nnU-Net's
    foreground oversampling falls back to a random crop for these cases.
    """

    def __init__(self, dataset_name_or_id: Union[int, str], plans: str, configuration: str,
                 fold: Union[int, str], source: str):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        self.dataset = dataset_name(dataset_name_or_id)
        self.plans_identifier, self.configuration, self.fold, self.source = plans, configuration, fold, source
        self.folder = extension_folder(self.dataset, plans, configuration, fold, source)
        self.prefix = PREFIXES[source]
        base = os.path.join(_preprocessed_root(), self.dataset)
        self.plans_manager = PlansManager(os.path.join(base, plans + ".json"))
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.preprocessed_folder = preprocessed_config_folder(self.dataset, plans, configuration)
        self.dataset_class = extension_dataset_class(self.dataset, plans, configuration)
        self.patch_size = tuple(int(p) for p in self.configuration_manager.patch_size)
        self._template = self._template_properties()
        os.makedirs(self.folder, exist_ok=True)
        self.cleanup_partial()

    def _template_properties(self) -> dict:
        from batchgenerators.utilities.file_and_folder_operations import load_pickle
        pkls = sorted(f for f in os.listdir(self.preprocessed_folder) if f.endswith(".pkl"))
        return load_pickle(os.path.join(self.preprocessed_folder, pkls[0]))

    # -- properties
    def case_properties(self, spatial_shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> dict:
        """Properties for a new case of ``spatial_shape`` (the data's shape without channels)."""
        props = copy.deepcopy(self._template)
        shape = tuple(int(s) for s in spatial_shape)
        props["shape_before_cropping"] = shape
        props["shape_after_cropping_and_before_resampling"] = shape
        props["bbox_used_for_cropping"] = [[0, s] for s in shape]
        if spacing is not None:
            props["spacing"] = tuple(spacing)
        return self.complete_properties(props)

    def complete_properties(self, props: dict) -> dict:
        """Add what nnU-Net's loader needs for an unlabeled case: ``class_locations`` empty for every
        label/region key of the dataset (foreground oversampling then falls back to a random crop)."""
        ndim = len(props["shape_after_cropping_and_before_resampling"])
        props["class_locations"] = {k: np.zeros((0, ndim + 1), dtype=np.int64)
                                    for k in self._template.get("class_locations", {})}
        props["tskd_source"] = self.source
        return props

    def synthetic_spacing(self) -> tuple:
        """Spacing of a case that is already at the configuration's target spacing.

        nnU-Net's properties hold the spacing in the original axis order; the configuration's spacing
        is in transposed order (and lacks the slice axis for 2d, which keeps the template's value)."""
        target = list(self.configuration_manager.spacing)
        transposed = [self._template["spacing"][i] for i in self.plans_manager.transpose_forward]
        transposed[len(transposed) - len(target):] = target
        return tuple(float(transposed[i]) for i in self.plans_manager.transpose_backward)

    # -- cleanup
    def cleanup_partial(self) -> List[str]:
        """Remove temp folders of dead writers and orphan files of incomplete cases; returns what was removed."""
        removed = []
        parent = os.path.dirname(self.folder)
        tag = f"{_TMP_PREFIX}{self.source}_"
        for name in os.listdir(parent):
            if name.startswith(tag):
                try:
                    pid = int(name[len(tag):].split("_")[0])
                except ValueError:
                    pid = -1
                if pid == os.getpid() or not _pid_alive(pid):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                    removed.append(name)
        complete = set(list_extension_cases(self.folder))
        for name in os.listdir(self.folder):
            if name == MANIFEST or name.endswith(".png"):
                continue
            if name.startswith(_TMP_PREFIX):
                os.remove(os.path.join(self.folder, name))
                removed.append(name)
                continue
            ident = _case_of_file(name)
            if ident is not None and ident not in complete:
                os.remove(os.path.join(self.folder, name))
                removed.append(name)
        return removed

    # -- writing
    def has_case(self, identifier: str) -> bool:
        return identifier in set(list_extension_cases(self.folder))

    def write_case(self, identifier: str, data: np.ndarray, properties: Optional[dict] = None) -> None:
        """Write one case (``data``: float32 ``(c, *spatial)``) atomically; segmentation = zeros."""
        if not identifier.startswith(self.prefix):
            raise ExtensionError(f"case id {identifier!r} must start with {self.prefix!r} in the {self.source} extension")
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim != 4:
            raise ExtensionError(f"case {identifier}: data must be (channels, z, y, x) like nnU-Net's preprocessed "
                                 f"arrays (z=1 for 2D), got shape {data.shape}")
        n_channels = len(self.plans_manager.foreground_intensity_properties_per_channel)
        if data.shape[0] != n_channels:
            raise ExtensionError(f"case {identifier}: {data.shape[0]} channels, but the plans have {n_channels}")
        seg = np.zeros((1, *data.shape[1:]), dtype=np.int16)  # nnU-Net's run_case_save stores int16
        if properties is None:
            properties = self.case_properties(data.shape[1:], self.synthetic_spacing())
        tmp = os.path.join(os.path.dirname(self.folder),
                           f"{_TMP_PREFIX}{self.source}_{os.getpid()}_{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            self._save(data, seg, properties, os.path.join(tmp, identifier))
            files = sorted(os.listdir(tmp))
            data_files = [f for f in files if _is_data_file(f, identifier)]
            if len(data_files) != 1:
                raise RuntimeError(f"unexpected files from {self.dataset_class.__name__}.save_case: {files}")
            # side files first, the data file (what defines a case for nnU-Net) last
            for f in [f for f in files if f not in data_files] + data_files:
                os.replace(os.path.join(tmp, f), os.path.join(self.folder, f))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _save(self, data: np.ndarray, seg: np.ndarray, properties: dict, truncated: str) -> None:
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
        if issubclass(self.dataset_class, nnUNetDatasetBlosc2):
            # same chunking as nnU-Net's DefaultPreprocessor.run_case_save
            blocks, chunks = comp_blosc2_params(data.shape, self.patch_size, data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, self.patch_size, seg.itemsize)
            self.dataset_class.save_case(data, seg, properties, truncated, chunks=chunks, blocks=blocks,
                                         chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        else:
            self.dataset_class.save_case(data, seg, properties, truncated)


def _is_data_file(name: str, identifier: str) -> bool:
    return name in (identifier + ".b2nd", identifier + ".npz")


def _case_of_file(name: str) -> Optional[str]:
    for ending in ("_seg.b2nd", ".b2nd", ".npz", ".pkl", "_seg.npy", ".npy"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return None
