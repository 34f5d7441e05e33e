"""Shared pieces of the dataset converters.

- ``ConversionError``: bad input; the message names the offending file and the fix. Converter ``main()``s
  print it as one line on stderr and exit with code 2 (see ``run_cli``).
- ``write_dataset``: validates and writes cases into ``<out>.tmp-<pid>`` and moves the folder into place only
  when everything (images, labels, dataset.json, case_patient_map.json) is written, so a failed conversion
  never leaves a half dataset that nnU-Net would pick up.
- Patient-level test split: whole patients go to imagesTs/labelsTs, never single slices of a patient.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import SimpleITK as sitk

from tskd_nnunet.cli_args import NNUNetStyleParser
from tskd_nnunet.data.label_budget import CASE_PATIENT_MAP

# nnU-Net's recommended spacing of the dummy axis when a 2D image is stored as a 1 x H x W volume.
DUMMY_SLICE_SPACING = 999.0
# formats SimpleITK cannot read (GIF: DRIVE, many ultrasound sets) are read with PIL
PIL_ONLY_ENDINGS = (".gif", ".webp", ".ppm", ".pgm", ".pbm")
NATURAL_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + PIL_ONLY_ENDINGS
MEDICAL_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
SUPPORTED_ENDINGS = MEDICAL_IMAGE_ENDINGS + NATURAL_IMAGE_ENDINGS


class ConversionError(Exception):
    """Bad or inconsistent input. The message names the file and what to do about it."""


# ----------------------------------------------------------------------------------------------- paths
def _root(given: Optional[str], env_var: str, flag: str, alternative: str = "") -> Path:
    """``given`` (the value of ``flag``) if set, else ``$env_var``; neither → ConversionError naming the fix.
    A root that is a file, or lies under one, is refused before anything is read (it used to end in a
    FileExistsError traceback when the output was created)."""
    root = given or os.environ.get(env_var)
    if not root:
        raise ConversionError(f"{env_var} is not set: export {env_var}=/path/to/{env_var} "
                              f"(see nnU-Net's documentation/setting_up_paths.md){alternative}")
    where = f"{flag} {root}" if given else f"{env_var}={root}"
    check_folder_path(Path(root), where, "pass a folder (it is created if missing)" if given else
                      f"export {env_var}=<a folder>")
    return Path(root)


def check_folder_path(path: Path, where: str, fix: str) -> None:
    """``path`` must be a folder or creatable as one: neither it nor an existing parent may be a file."""
    p = Path(path)
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    if p.is_symlink() and not p.exists():
        raise ConversionError(f"{where}: {p} is a broken symbolic link (-> {os.readlink(p)}): {fix}")
    if p.exists() and not p.is_dir():
        at = "" if p == Path(path) else f": {p}"
        raise ConversionError(f"{where}{at} is a file, not a folder: {fix}")


def resolve_raw_root(output_root: Optional[str], flag: str = "--output-root") -> Path:
    """``--output-root`` (``flag``) if given, else ``$nnUNet_raw``."""
    return _root(output_root, "nnUNet_raw", flag, f" or pass {flag} DIR")


def resolve_preprocessed_root(preprocessed_root: Optional[str], flag: str = "--preprocessed-root") -> Path:
    return _root(preprocessed_root, "nnUNet_preprocessed", flag)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 0 < dataset_id <= 999:
        raise ConversionError(f"dataset id {dataset_id} is out of range: nnU-Net ids are 1..999")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConversionError(f"dataset name {name!r} may only contain letters, digits, '_' and '-'")
    return f"Dataset{dataset_id:03d}_{name}"


def find_dataset_folder(root: Path, dataset_id: int) -> Path:
    """The one ``DatasetXXX_*`` folder in ``root`` (temp folders of running conversions are ignored)."""
    prefix = f"Dataset{dataset_id:03d}_"
    found = sorted(p for p in root.glob(prefix + "*") if p.is_dir() and ".tmp-" not in p.name
                   and ".old-" not in p.name) if root.is_dir() else []
    if not found:
        raise ConversionError(f"no {prefix}* folder in {root}: convert the dataset first "
                              f"(python -m dataset_conversion.<converter>) or check the dataset id")
    if len(found) > 1:
        raise ConversionError(f"several folders for dataset id {dataset_id} in {root}: "
                              f"{', '.join(p.name for p in found)}; remove all but one")
    return found[0]


def sanitize_case_id(stem: str) -> str:
    """Case ids end up in file names and JSON; keep them to a safe character set."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem)


def strip_ending(name: str, endings: Sequence[str] = SUPPORTED_ENDINGS) -> Tuple[str, str]:
    low = name.lower()
    for e in sorted(endings, key=len, reverse=True):
        if low.endswith(e):
            return name[: -len(e)], e
    return name, ""


# ---------------------------------------------------------------------------------------------- images
def read_image(path: Path) -> sitk.Image:
    """SimpleITK read (PIL for GIF and other formats SimpleITK lacks) with an error naming the file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConversionError(f"{path} is a broken symbolic link (-> {os.readlink(path)}): restore its target "
                              f"or remove the link")
    if not path.is_file():
        raise ConversionError(f"missing file {path}: restore it or remove the case that refers to it")
    if strip_ending(path.name)[1] in PIL_ONLY_ENDINGS:
        return _read_with_pil(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK raises RuntimeError for every read failure
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
        if "Unable to determine ImageIO reader" in reason:
            try:  # a natural-image format SimpleITK has no reader for, or a misnamed file
                return _read_with_pil(path)
            except ConversionError:
                pass
        raise ConversionError(f"cannot read {path} ({reason[:160]}): replace the file with a valid "
                              f"image or remove it") from None


def _read_with_pil(path: Path) -> sitk.Image:
    """PIL read → SimpleITK image. Palette (GIF) images are expanded to their colours, never to the
    palette indices (a 0/255 GIF mask must stay 0/255)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - PIL is a dependency of matplotlib
        raise ConversionError(f"cannot read {path}: install Pillow (pip install pillow) or convert the file "
                              f"to .png") from None
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ConversionError(f"{path} has {im.n_frames} frames (animated image): save the one frame "
                                      f"to use as a single-frame image")
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode == "CMYK":
                im = im.convert("RGB")
            arr = np.array(im)
    except ConversionError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ConversionError(f"cannot read {path} ({' '.join(str(e).split())[:160]}): replace the file with a "
                              f"valid image or remove it") from None
    # an alpha channel is kept here: channels_from_array drops it and says so, as for SimpleITK reads
    return sitk.GetImageFromArray(arr, isVector=arr.ndim == 3)


_NOTED: Set[str] = set()


def note_once(key: str, message: str) -> None:
    """Print an explicit decision once per process (not once per case)."""
    if key not in _NOTED:
        _NOTED.add(key)
        print(message)


def channels_from_array(arr: np.ndarray, mode: str, path: Path) -> List[np.ndarray]:
    """2D array (H, W) or (H, W, C) → list of 2D channel arrays. ``mode``: 'gray' or 'rgb'.

    gray: R=G=B images give one channel losslessly; true colour images are reduced to luminance.
    rgb: three channels; grey images are repeated so that every case has the same channel count.
    """
    if arr.ndim == 2:
        return [arr] if mode == "gray" else [arr, arr, arr]
    if arr.ndim != 3 or arr.shape[-1] not in (2, 3, 4):
        raise ConversionError(f"{path} has shape {arr.shape}; expected a 2D grey or RGB(A) image")
    if arr.shape[-1] in (2, 4):  # grey + alpha, RGBA: nnU-Net gets the grey/colour values only
        note_alpha_dropped(path, arr[..., -1])
        arr = arr[..., :-1]
    rgb = arr[..., :3]
    if mode == "rgb":
        if rgb.shape[-1] == 1:
            return [rgb[..., 0]] * 3
        return [rgb[..., i] for i in range(3)]
    if rgb.shape[-1] == 1 or (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        return [rgb[..., 0]]
    note_once("gray", f"note: colour images (first: {path}) are reduced to luminance (--channels gray); "
                      f"pass --channels rgb to keep the three colour channels")
    lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return [np.round(lum).astype(rgb.dtype)]


def note_alpha_dropped(path: Path, alpha: Optional[np.ndarray] = None) -> None:
    """Say once per conversion that alpha channels are not converted: transparency is not an image channel
    nnU-Net could normalise, and dropping it silently would hide e.g. a mask stored in the alpha channel."""
    if alpha is None:
        detail = ""
    elif np.issubdtype(alpha.dtype, np.integer) and alpha.size and alpha.min() == np.iinfo(alpha.dtype).max:
        detail = ", fully opaque: nothing is lost"
    else:
        detail = ", not fully opaque: transparent pixels keep their colour values"
    note_once("alpha", f"note: the alpha channel of images that have one is dropped (first: {path}{detail}); "
                       f"only the grey/colour channels are converted")


def read_2d_array(path: Path, mode: str = "gray") -> List[np.ndarray]:
    """Read a 2D natural image (png/jpg/bmp/tif) into a list of 2D channel arrays."""
    img = read_image(path)
    arr = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if img.GetNumberOfComponentsPerPixel() == 1 and arr.ndim != 2:
        raise ConversionError(f"{path} is not a 2D image (array shape {arr.shape}): use a 2D file")
    return channels_from_array(arr, mode, path)


def read_2d_mask(path: Path) -> np.ndarray:
    """Masks must be single-valued per pixel; R=G=B masks are accepted, colour masks are not."""
    img = read_image(path)
    arr = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        ch = arr[..., : min(3, arr.shape[-1])]
        if not all(np.array_equal(ch[..., 0], ch[..., i]) for i in range(ch.shape[-1])):
            raise ConversionError(f"mask {path} has colour channels that differ: save masks as single-channel "
                                  f"label images (one integer value per class)")
        arr = ch[..., 0]
    if arr.ndim != 2:
        raise ConversionError(f"mask {path} is not a 2D image (array shape {arr.shape})")
    return arr


def check_spacing(values: Optional[Sequence[float]], flag: str = "--spacing") -> None:
    """Every pixel size positive and finite, else ConversionError naming the flag."""
    import math
    if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
        raise ConversionError(f"{flag} {' '.join(f'{v:g}' for v in values)}: every value must be a positive "
                              f"pixel size in mm, e.g. {flag} 0.5 0.5")


def slice_as_volume(arr: np.ndarray, spacing_yx: Optional[Tuple[float, float]]) -> sitk.Image:
    """2D array → 1 x H x W SimpleITK volume with spacing (x, y, 999): nnU-Net's way to keep 2D spacing."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr)[None])
    sy, sx = spacing_yx if spacing_yx is not None else (1.0, 1.0)
    img.SetSpacing((float(sx), float(sy), DUMMY_SLICE_SPACING))
    return img


def remap_labels(arr: np.ndarray, mapping: Mapping[int, int], path: Path, fix: str) -> np.ndarray:
    """Map source mask values to nnU-Net labels; any value not in ``mapping`` → ConversionError naming ``path``."""
    values = np.unique(arr)
    unknown = [v.item() for v in values if int(v) != v or int(v) not in mapping]
    if unknown:
        raise ConversionError(f"mask {path} has unknown label value(s) {unknown[:10]} (expected "
                              f"{sorted(mapping)}): {fix}")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for src in values:
        out[arr == src] = mapping[int(src)]
    return out


# ---------------------------------------------------------------------------------------------- writer
@dataclass
class CaseSource:
    """One case to convert. ``load`` returns (channel images, label image); nothing is read before writing."""
    case_id: str
    patient_id: str
    image_files: List[str]
    label_file: str
    load: Callable[[], Tuple[List[sitk.Image], sitk.Image]]


def check_unique_case_ids(cases: Iterable[CaseSource]) -> None:
    seen: Dict[str, CaseSource] = {}
    for c in cases:
        if c.case_id in seen:
            raise ConversionError(f"duplicate case id {c.case_id!r}: {seen[c.case_id].image_files[0]} and "
                                  f"{c.image_files[0]}; rename or remove one of them")
        seen[c.case_id] = c


def patient_level_test_split(patients: Iterable[str], test_fraction: float, seed: int) -> Set[str]:
    """Draw round(test_fraction * #patients) whole patients as test set (seeded; >= 1 train patient kept)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConversionError(f"--test-fraction {test_fraction} must be in [0, 1)")
    unique = sorted(set(patients))
    if test_fraction > 0.5:
        raise ConversionError(f"--test-fraction {test_fraction} would put more patients in imagesTs than in "
                              f"training: use a value <= 0.5 (default 0.2; 0 = no test set)")
    if test_fraction == 0 or len(unique) < 2:
        return set()
    n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
    rng = random.Random(seed)
    return set(rng.sample(unique, n_test))


_TEMP_RE = re.compile(r"^(Dataset\d{3}_[A-Za-z0-9_\-]+)\.(tmp|old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def remove_stale_temp_folders(raw_root: Path, verbose: bool = True) -> List[Path]:
    """Remove ``DatasetXXX_Name.tmp-<pid>`` / ``.old-<pid>`` folders of conversions whose process is gone
    (killed with SIGKILL, or a machine crash): nnU-Net would see two folders for one dataset id. An
    ``.old-<pid>`` whose dataset folder is missing (killed between the two renames of an --overwrite) is
    moved back instead. Returns the folders removed or restored."""
    done: List[Path] = []
    if not Path(raw_root).is_dir():
        return done
    for p in sorted(Path(raw_root).iterdir()):
        m = _TEMP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(3))
        if _pid_alive(pid):
            if pid != os.getpid() and verbose:
                print(f"note: {p} belongs to a conversion that is still running (pid {pid}); left alone")
            continue
        final = p.parent / m.group(1)
        if m.group(2) == "old" and not final.exists():
            os.replace(p, final)
            print(f"restored {final} from {p.name}, left by an interrupted --overwrite (pid {pid} is gone)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            print(f"removed stale {p.name} left by an interrupted conversion (pid {pid} is gone)")
        done.append(p)
    return done


class _CleanupOnSignal:
    """While active, SIGTERM (timeout, SLURM, docker stop) and SIGHUP end the conversion through an
    exception, so ``write_dataset``'s cleanup removes the temp folder (SIGINT already raises
    KeyboardInterrupt). Only the main thread can install handlers; elsewhere this does nothing."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    @staticmethod
    def _handler(signum, frame):
        for sig in _CleanupOnSignal.SIGNALS:  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        name = signal.Signals(signum).name
        print(f"{name} received: removing the unfinished dataset folder and exiting", file=sys.stderr)
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


def _test_slowdown() -> None:
    """Test hook: ``TSKD_CONVERT_TEST_SLEEP=SECONDS`` sleeps per case, so that a test can interrupt a
    conversion midway. Not for users."""
    value = os.environ.get("TSKD_CONVERT_TEST_SLEEP")
    if value:
        time.sleep(float(value))


def _write(img: sitk.Image, path: Path, file_ending: str) -> None:
    if file_ending == ".png":
        arr = sitk.GetArrayFromImage(img)
        arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if arr.ndim != 2:
            raise ConversionError(f"cannot store {path.name} as .png (array shape {arr.shape}); use .nii.gz")
        if arr.dtype not in (np.uint8, np.uint16):
            if arr.min() < 0 or arr.max() > 65535 or not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ConversionError(f"cannot store {path.name} as .png (values outside 0..65535 or not "
                                      f"integer); use --file-ending .nii.gz")
            arr = arr.astype(np.uint8 if arr.max() < 256 else np.uint16)
        img = sitk.GetImageFromArray(arr)
    sitk.WriteImage(img, str(path), True)


def _check_case(case: CaseSource, channels: List[sitk.Image], label: sitk.Image, n_channels: int,
                allowed_labels: Set[int]) -> sitk.Image:
    if len(channels) != n_channels:
        raise ConversionError(f"{case.image_files[0]} gives {len(channels)} channel(s), the dataset has "
                              f"{n_channels}; convert all images of the dataset the same way")
    ref = channels[0]
    for f, ch in zip(case.image_files * len(channels), channels):
        if ch.GetSize() != ref.GetSize():
            raise ConversionError(f"channel size mismatch in case {case.case_id}: {f} is {ch.GetSize()}, "
                                  f"first channel is {ref.GetSize()}; all channels need the same grid")
    if label.GetSize() != ref.GetSize():
        raise ConversionError(f"size mismatch: mask {case.label_file} is {label.GetSize()} but image "
                              f"{case.image_files[0]} is {ref.GetSize()} (x, y[, z]); use the mask made for "
                              f"this image")
    if not np.allclose(label.GetSpacing(), ref.GetSpacing(), rtol=1e-3):
        raise ConversionError(f"spacing mismatch: mask {case.label_file} has {label.GetSpacing()}, image "
                              f"{case.image_files[0]} has {ref.GetSpacing()}; fix the mask header")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
    if not values <= allowed_labels:
        raise ConversionError(f"mask {case.label_file} has unknown label value(s) "
                              f"{sorted(values - allowed_labels)[:10]} (dataset labels "
                              f"{sorted(allowed_labels)}); fix the mask or the label mapping")
    label = sitk.Cast(label, sitk.sitkUInt8)
    label.CopyInformation(ref)  # same grid checked above; identical headers avoid nnU-Net origin warnings
    for ch in channels[1:]:
        ch.CopyInformation(ref)
    return label


def write_dataset(cases: Sequence[CaseSource], *, raw_root: Path, dataset_id: int, dataset_name: str,
                  channel_names: Mapping[int, str], labels: Mapping[str, int], file_ending: str,
                  test_fraction: float = 0.2, seed: int = 0, overwrite: bool = False,
                  extra_json: Optional[Mapping] = None, verbose: bool = True) -> Path:
    """Convert ``cases`` into ``raw_root/DatasetXXX_Name`` atomically; return the final folder.

    Test patients (patient-level) go to imagesTs/labelsTs. ``case_patient_map.json`` ({case: patient}, all
    cases) is written beside dataset.json for ``label_budget``.
    """
    if not cases:
        raise ConversionError("no cases found in the input: check the input folder and its layout "
                              "(see --help)")
    check_unique_case_ids(cases)
    _NOTED.clear()  # notes are printed once per conversion
    raw_root = Path(raw_root)
    remove_stale_temp_folders(raw_root, verbose)
    final = raw_root / dataset_folder_name(dataset_id, dataset_name)
    others = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*")
              if p.is_dir() and p.name != final.name and ".tmp-" not in p.name and ".old-" not in p.name]
    if others:
        raise ConversionError(f"dataset id {dataset_id} is already used by {raw_root / others[0]}: choose "
                              f"another -d or remove that folder")
    if final.exists() and not overwrite:
        raise ConversionError(f"output {final} already exists: pass --overwrite to replace it")

    test_patients = patient_level_test_split([c.patient_id for c in cases], test_fraction, seed)
    n_patients = len(set(c.patient_id for c in cases))
    n_train_planned = sum(c.patient_id not in test_patients for c in cases)
    if verbose and test_fraction > 0 and n_patients < 2:
        print(f"note: all {len(cases)} cases belong to one patient, so there is no test set (--test-fraction "
              f"{test_fraction} is ignored); every case is used for training")
    if verbose and test_patients and 2 * len(test_patients) >= n_patients and \
            len(test_patients) / n_patients > test_fraction:  # few patients: rounding and the minimum of 1
        print(f"WARNING: --test-fraction {test_fraction} puts {len(test_patients)} of {n_patients} patients "
              f"({100 * len(test_patients) / n_patients:.0f}%) in imagesTs/labelsTs ({test_fraction} x "
              f"{n_patients} patients, rounded, at least one). Fix: --test-fraction 0 to train on every patient, "
              f"or add patients")
    if verbose and test_patients and n_train_planned < 5:
        print(f"WARNING: --test-fraction {test_fraction} leaves {n_train_planned} training case(s); nnU-Net's "
              f"5-fold cross-validation needs at least 5: lower --test-fraction or add cases")
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = raw_root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with _CleanupOnSignal():
        _write_into(tmp, final, cases, test_patients, channel_names, labels, file_ending, extra_json, verbose)
    if verbose:
        n_train = sum(c.patient_id not in test_patients for c in cases)
        print(f"wrote {final}: {n_train} training cases, {len(cases) - n_train} test cases "
              f"({len(test_patients)} of {n_patients} patients in imagesTs/labelsTs)")
    return final


def _write_into(tmp: Path, final: Path, cases: Sequence[CaseSource], test_patients: Set[str],
                channel_names: Mapping[int, str], labels: Mapping[str, int], file_ending: str,
                extra_json: Optional[Mapping], verbose: bool) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    allowed = set(int(v) for v in labels.values())
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir(parents=True)
        n_train = 0
        for i, case in enumerate(cases):
            channels, label = case.load()
            label = _check_case(case, channels, label, len(channel_names), allowed)
            split = "Ts" if case.patient_id in test_patients else "Tr"
            n_train += split == "Tr"
            for k, ch in enumerate(channels):
                _write(ch, tmp / f"images{split}" / f"{case.case_id}_{k:04d}{file_ending}", file_ending)
            _write(label, tmp / f"labels{split}" / f"{case.case_id}{file_ending}", file_ending)
            if verbose and (i + 1) % 50 == 0:
                print(f"  {i + 1}/{len(cases)} cases written")
            _test_slowdown()
        if n_train == 0:
            raise ConversionError("all cases fell into the test set: lower --test-fraction")
        generate_dataset_json(str(tmp), {int(k): v for k, v in channel_names.items()}, dict(labels), n_train,
                              file_ending, dataset_name=final.name,
                              license=(extra_json or {}).get("licence", "see the dataset's own license"),
                              converted_by="tskd-nnunet dataset_conversion",
                              **{k: v for k, v in (extra_json or {}).items() if k != "licence"},
                              numTest=len(cases) - n_train)
        with open(tmp / CASE_PATIENT_MAP, "w") as f:
            json.dump({c.case_id: c.patient_id for c in cases}, f, indent=1, sort_keys=True)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        # os.replace cannot replace a non-empty folder: park the old one, swap, then delete it.
        old = final.parent / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:  # a signal between the two renames: put the old dataset back
            if not final.exists():
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------- CLI
def add_common_args(parser: NNUNetStyleParser, default_id: Optional[int], default_name: Optional[str],
                    name_help: Optional[str] = None) -> None:
    """-d, --name (required when no default is given; -n: deprecated), --output-root, --test-fraction, --seed,
    --overwrite."""
    parser.add_argument("-d", "--dataset-id", type=int, default=default_id, required=default_id is None,
                        help=f"nnU-Net dataset id (default {default_id})")
    parser.add_argument("--name", default=default_name,
                        help=name_help or f"dataset name, folder becomes DatasetXXX_NAME (default {default_name})")
    parser.add_deprecated_alias("-n", "name", "--name")
    if default_name is None and not name_help:
        parser.require("name", "--name")
    parser.add_argument("--output-root", default=None,
                        help="folder to write DatasetXXX_NAME into (default: $nnUNet_raw)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of PATIENTS moved to imagesTs/labelsTs (default 0.2; 0 = no test set)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")


def converter_parser(prog: str, doc: str) -> NNUNetStyleParser:
    """The parser of a converter: its module docstring as the description, kept as written."""
    return NNUNetStyleParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def write_dataset_from_args(args, cases: Callable[[], Sequence[CaseSource]], *, channel_names: Mapping[int, str],
                            labels: Mapping[str, int], file_ending: str, licence: str, reference: str,
                            dataset_name: Optional[str] = None) -> Path:
    """``write_dataset`` with the arguments of ``add_common_args``. ``$nnUNet_raw`` / --output-root is checked
    before ``cases()`` reads any input, so a missing setting is reported first."""
    raw_root = resolve_raw_root(args.output_root)
    return write_dataset(cases(), raw_root=raw_root, dataset_id=args.dataset_id,
                         dataset_name=dataset_name or args.name, channel_names=channel_names, labels=labels,
                         file_ending=file_ending, test_fraction=args.test_fraction, seed=args.seed,
                         overwrite=args.overwrite, extra_json={"licence": licence, "reference": reference})


def run_cli(fn: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> int:
    """Run a converter; ConversionError → one line on stderr and exit code 2 (no traceback)."""
    try:
        fn(argv)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
