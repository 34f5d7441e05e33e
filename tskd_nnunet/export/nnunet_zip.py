"""A trained student as a standard nnU-Net model zip: installs and predicts with plain nnU-Net (issue #31).

    tskd_export_nnunet -d 990 -c 2d -f 0 -tr DistillTrainer_small -o student.zip [--fp16]
    # on a machine with only `pip install nnunetv2`:
    nnUNetv2_install_pretrained_model_from_zip student.zip
    nnUNetv2_predict -i IN -o OUT -d 990 -c 2d -tr nnUNetTrainer -p nnUNetPlans_DistillTrainer_small -f 0

A student's checkpoint names our trainer class (``DistillTrainer...``), which nnU-Net cannot find without
this package, and carries optimizer state. The zip holds instead, for the model folder
``nnUNetTrainer__<plans>_<trainer>__<configuration>``:

- ``plans.json``: the model folder's plans under a new plans identifier (default ``<plans>_<trainer>``, so
  installing never overwrites a plain nnU-Net model of the dataset), with the exported configuration only
  (inheritance resolved) and its architecture kwargs describing the student (a width preset's
  ``features_per_stage``), so nnU-Net's own ``nnUNetTrainer.build_network_architecture`` builds it;
- ``dataset.json``, ``dataset_fingerprint.json``: copies;
- ``fold_k/checkpoint_final.pth``: ``network_weights`` (fp16 with ``--fp16``) and the fields nnU-Net's
  predictor reads (``trainer_name: nnUNetTrainer``, ``init_args``, ``inference_allowed_mirroring_axes``);
  ``progress.png`` and ``validation/summary.json`` as nnU-Net's exporter requires;
- ``tskd_provenance.json``: teacher(s) and their checkpoint sha256, transfer-set counts, KD settings,
  versions (nnU-Net ignores it).

The zip itself is written by nnU-Net's ``export_pretrained_model`` from a staging ``nnUNet_results`` tree
(nnU-Net reads ``nnUNet_results`` from the environment at each use), then the provenance is appended.
Before writing, nnU-Net's predictor loads the staged folder exactly as ``nnUNetv2_predict -tr nnUNetTrainer``
will (strict ``load_state_dict``) and its logits must equal the source model's. The zip goes to a temporary
file beside the output and is moved into place (``os.replace``). See documentation/export.md.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import datetime
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from tskd_nnunet.atomic_io import atomic_path, read_json
from tskd_nnunet.export.onnx_export import ExportError
from tskd_nnunet.models.vit_backbones import sha256_of

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

ZIP_TRAINER = "nnUNetTrainer"  # nnU-Net's own trainer: what the recipient's nnUNetv2_predict -tr names
CHECKPOINT = "checkpoint_final.pth"  # nnUNetv2_predict's default -chk
PROVENANCE_FILE = "tskd_provenance.json"
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")  # nnU-Net's exporter needs all three
FOLD_FILES = ("progress.png", os.path.join("validation", "summary.json"))  # ... and these per fold
LOGIT_TOLERANCE = 1e-5  # max |logits| exported vs source network (fp32 weights); measured 0 (same ops)

Fold = Union[int, str]


# ----------------------------------------------------------------------------- which students qualify
def planned_width(trainer_class: type) -> Optional[float]:
    """The ``features_per_stage`` factor with which ``trainer_class`` builds nnU-Net's planned network, or None
    when its network is not nnU-Net's planned one (ViT student, teachers, foreign custom trainers)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from tskd_nnunet.trainers.distill import DistillTrainer

    # the class that defines the builder nnU-Net's predictor will call (a staticmethod in nnU-Net, a classmethod here)
    owner = next(k for k in trainer_class.__mro__ if "build_network_architecture" in vars(k))
    if owner is nnUNetTrainer:
        return 1.0  # nnU-Net's own builder (e.g. TSKDPlainTrainer)
    if owner is DistillTrainer:
        return float(trainer_class.student_width)  # models.students.build_plans_student
    return None


def onnx_fix(trainer: str, dataset: str, configuration: str, fold: Fold, plans: str) -> str:
    return (f"export it with tskd_export (ONNX) instead: tskd_export -d {dataset} -c {configuration} -f {fold} "
            f"-tr {trainer} -p {plans} -o {trainer}_onnx")


def default_plans_name(plans_name: str, trainer: str) -> str:
    return f"{plans_name}_{trainer}"


def student_plans(plans: dict, configuration: str, width: float, plans_name: str) -> dict:
    """The plans of the zip: ``configuration`` only (inheritance resolved), architecture kwargs scaled by
    ``width`` exactly as the student was built (``models.students.scaled_arch_kwargs``), ``plans_name``
    set, our own entries (``tskd_*``: settings, ViT specs) left out; they go to the provenance."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tskd_nnunet.models.students import scaled_arch_kwargs

    cfg = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration)
    if cfg.get("previous_stage"):
        raise ExportError(f"configuration {configuration} is a cascade stage (previous_stage "
                          f"{cfg['previous_stage']}); a model zip of one stage cannot predict. Fix: export a "
                          f"configuration that is not cascaded (2d, 3d_fullres, 3d_lowres)")
    cfg.pop("inherits_from", None)  # resolved above
    cfg.pop("next_stage", None)  # the cascade's next stage is not in the zip
    cfg["architecture"] = dict(cfg["architecture"], arch_kwargs=scaled_arch_kwargs(cfg["architecture"]["arch_kwargs"],
                                                                                   width))
    out = {k: copy.deepcopy(v) for k, v in plans.items() if not k.startswith("tskd_") and k != "configurations"}
    out["plans_name"] = plans_name
    out["configurations"] = {configuration: cfg}
    return out


# ----------------------------------------------------------------------------- checkpoint
def export_checkpoint(checkpoint: dict, plans: dict, configuration: str, fold: Fold, dataset_json: dict,
                      fp16: bool = False) -> dict:
    """What nnU-Net's predictor reads from a checkpoint, nothing else (no optimizer, logs, KD heads): the
    network weights (floating tensors in fp16 with ``fp16``; nnU-Net's ``load_state_dict`` copies them into
    its fp32 network) and ``trainer_name`` = nnUNetTrainer. Plain types only: loads with weights_only=True."""
    # nnU-Net's U-Nets list the encoder's tensors twice (``decoder.encoder.*`` shares their storage) and torch.save
    # stores a shared storage once: convert each storage once, so that fp16 keeps the sharing and halves the size
    weights, converted = {}, {}
    for k, v in checkpoint["network_weights"].items():
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            v = converted.setdefault(key, v.half())
        weights[k] = v
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return {"network_weights": weights, "trainer_name": ZIP_TRAINER,
            "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json},
            "inference_allowed_mirroring_axes": tuple(int(a) for a in axes) if axes is not None else None}


# ----------------------------------------------------------------------------- provenance
def _debug_value(debug: dict, key: str) -> Any:
    """A trainer attribute from nnU-Net's debug.json (which stores ``str(value)``), as a Python value."""
    text = debug.get(key)
    if text is None or text == "None":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _transfer_set_counts(fold_dir: str, debug: dict) -> Optional[Dict[str, int]]:
    counts = _debug_value(debug, "transfer_set_counts")
    if isinstance(counts, dict) and counts:
        return {str(k): int(v) for k, v in counts.items()}
    from tskd_nnunet.data.transfer_set import parse_counts

    for log in sorted(glob.glob(os.path.join(fold_dir, "training_log_*.txt"))):  # the first run's line
        with open(log, errors="replace") as f:
            found = parse_counts(f.read())
        if found:
            return found
    return None


def _teachers(model_folder: str, configuration: str, fold: Fold, settings: dict, debug: dict,
              student_checkpoint: str) -> List[Dict[str, Any]]:
    """The teacher(s) a student fold distilled, with checkpoint sha256: recorded by the target cache the student
    trained on (cached KD) or, failing that, of the teacher's checkpoint now in nnUNet_results (said so)."""
    cache = _debug_value(debug, "target_cache_folder")
    manifest = read_json(os.path.join(cache, "manifest.json"), default=None) if isinstance(cache, str) else None
    results, dataset = os.path.dirname(os.path.dirname(model_folder)), os.path.basename(os.path.dirname(model_folder))

    def relative(path: Optional[str]) -> Optional[str]:  # no local folder names in a file that leaves the lab
        inside = path and os.path.abspath(path).startswith(results + os.sep)
        return os.path.relpath(path, results) if inside else path

    if manifest and manifest.get("teachers"):
        return [{"trainer": t["trainer"], "checkpoint": relative(t.get("checkpoint")), "sha256": t["sha256"],
                 "sha256_from": "the target cache the student was trained on (manifest.json)"}
                for t in manifest["teachers"]]
    names = [t for t in str(settings.get("TSKD_TEACHER_TRAINER") or "").split(",") if t]
    plans_name = settings.get("TSKD_TEACHER_PLANS") or os.path.basename(model_folder).split("__")[1]
    chk = settings.get("TSKD_TEACHER_CHECKPOINT") or "checkpoint_final.pth"
    out = []
    loaded = debug.get("teacher_checkpoint_file")  # what an online student loaded (DistillTrainer records it)
    for name in names:
        path = os.path.join(results, dataset, f"{name}__{plans_name}__{configuration}", f"fold_{fold}", chk)
        if len(names) == 1 and loaded and loaded != "None":
            path = loaded
        entry: Dict[str, Any] = {"trainer": name, "checkpoint": relative(path), "sha256": None}
        if os.path.isfile(path):
            entry["sha256"] = sha256_of(path)
            entry["sha256_from"] = "the teacher's checkpoint in nnUNet_results at export time (online KD records none)"
            if os.path.getmtime(path) > os.path.getmtime(student_checkpoint):
                entry["warning"] = "the teacher's checkpoint is newer than the student's: it may have been retrained"
        else:
            entry["sha256_from"] = "not found at export time"
        out.append(entry)
    return out


def fold_provenance(model_folder: str, configuration: str, fold: Fold, checkpoint_path: str,
                    checkpoint: dict) -> Dict[str, Any]:
    """What produced one fold of the student: its settings, transfer set and teacher(s)."""
    fold_dir = os.path.dirname(checkpoint_path)
    debug = read_json(os.path.join(fold_dir, "debug.json"), default={})
    settings = ((checkpoint.get("init_args") or {}).get("plans") or {}).get("tskd_settings") or {}
    distilled = "TSKD_TEACHER_TRAINER" in settings
    summary = read_json(os.path.join(fold_dir, "validation", "summary.json"), default={})
    return {
        "source_checkpoint": os.path.basename(checkpoint_path),
        "source_checkpoint_sha256": sha256_of(checkpoint_path),
        "epochs_trained": checkpoint.get("current_epoch"),
        "training_settings": settings,  # every TSKD_* setting and KD knob (documentation/configuration.md)
        "kd_mode": settings.get("TSKD_KD_MODE"),
        "transfer_set_counts": _transfer_set_counts(fold_dir, debug) if distilled else None,
        "teachers": _teachers(model_folder, configuration, fold, settings, debug, checkpoint_path) if distilled else [],
        "validation_foreground_mean": (summary.get("foreground_mean") or None),
    }


# ----------------------------------------------------------------------------- checks through nnU-Net's predictor
def _predictor(model_folder: str, folds: Sequence[Fold], checkpoint_name: str,
               device: torch.device) -> "nnUNetPredictor":
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notes on CPU use and on its trainer search
        p = nnUNetPredictor(perform_everything_on_device=False, device=device, verbose=False, allow_tqdm=False)
        p.initialize_from_trained_model_folder(model_folder, tuple(folds), checkpoint_name)
    return p


def _forward(predictor, params: dict, x: torch.Tensor) -> torch.Tensor:
    net = predictor.network
    net.load_state_dict(params)
    net.to(x.device).eval()
    with torch.no_grad():
        return net(x).float()


def compare_networks(source: "nnUNetPredictor", exported: "nnUNetPredictor", fp16: bool, device: torch.device,
                     seed: int = 0) -> Dict[str, float]:
    """Per fold: source and exported network (as nnU-Net's predictor rebuilds them) on one random patch.
    fp32 weights: the logits must agree within LOGIT_TOLERANCE. fp16 weights: the largest probability
    difference is returned (a random patch; documentation/export.md has the one measured on real images)."""
    cm = source.configuration_manager
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    channels = determine_num_input_channels(source.plans_manager, cm, source.dataset_json)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, channels, *[int(s) for s in cm.patch_size]), generator=g).to(device)
    worst_logit, worst_prob = 0.0, 0.0
    for p_src, p_exp in zip(source.list_of_parameters, exported.list_of_parameters):
        a, b = _forward(source, p_src, x), _forward(exported, p_exp, x)
        worst_logit = max(worst_logit, float((a - b).abs().max()))
        has_regions = source.label_manager.has_regions
        prob = (lambda t: torch.sigmoid(t)) if has_regions else (lambda t: torch.softmax(t, 1))
        worst_prob = max(worst_prob, float((prob(a) - prob(b)).abs().max()))
    if not fp16 and worst_logit > LOGIT_TOLERANCE:
        raise ExportError(f"the exported network differs from the trained one (max |logits| {worst_logit:.3g}); "
                          f"nnU-Net's rebuild from the written plans is not this student. Fix: report this trainer "
                          f"as not exportable, and use tskd_export (ONNX)")
    return {"max_abs_logit_diff_vs_source": worst_logit, "max_abs_prob_diff_vs_source": worst_prob}


# ----------------------------------------------------------------------------- files and folders
def check_output_path(output: str) -> None:
    """The zip's path must be a file whose nearest existing ancestor is a folder."""
    if os.path.isdir(output):
        raise ExportError(f"-o {output} is a folder; it must name the zip file to write. Fix: "
                          f"-o {os.path.join(output, 'student.zip')}")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write {output}: {parent} is a file, not a folder. Fix: choose -o in a folder")


def check_model_folder(model_folder: str, folds: Sequence[Fold], checkpoint_name: str) -> None:
    if not os.path.isdir(model_folder):
        raise ExportError(f"model folder {model_folder} not found. Fix: check -d/-tr/-p/-c and nnUNet_results "
                          f"(train it first: nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER)")
    for name in MODEL_FILES:
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise ExportError(f"{os.path.join(model_folder, name)} not found: {model_folder} is not a finished "
                              f"nnU-Net model folder. Fix: check -d/-tr/-p/-c, or finish the training")
    trained = sorted(d[len("fold_"):] for d in os.listdir(model_folder)
                     if d.startswith("fold_") and os.path.isdir(os.path.join(model_folder, d)))
    for fold in folds:
        fold_dir = os.path.join(model_folder, f"fold_{fold}")
        if not os.path.isdir(fold_dir):
            raise ExportError(f"{fold_dir} not found (folds trained: {', '.join(trained) or 'none'}). Fix: "
                              f"-f {' '.join(trained) or 'FOLD'}, or train fold {fold} first")
        ckpt = os.path.join(fold_dir, checkpoint_name)
        if not os.path.isfile(ckpt):
            found = sorted(f for f in os.listdir(fold_dir) if f.endswith(".pth"))
            raise ExportError(f"checkpoint not found: {ckpt}. Fix: " + (
                f"checkpoints there: {', '.join(found)}; pick one with -chk" if found else
                "train it first (nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER)"))
        for name in FOLD_FILES:
            if not os.path.isfile(os.path.join(fold_dir, name)):
                raise ExportError(f"{os.path.join(fold_dir, name)} not found (nnU-Net's model zip carries it; "
                                  f"nnUNetv2_train writes it when the training finishes). Fix: finish the training "
                                  f"(nnUNetv2_train ... --c), or run its validation (nnUNetv2_train ... --val)")


def _load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, pickle garbage: torch raises many types
        raise ExportError(f"cannot read checkpoint {path} ({type(e).__name__}). Fix: restore the file or "
                          f"pick another with -chk") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "trainer_name" not in ckpt:
        raise ExportError(f"{path} is not an nnU-Net checkpoint (no network_weights/trainer_name). Fix: pick "
                          f"another with -chk")
    return ckpt


@contextlib.contextmanager
def _nnunet_results(folder: str):
    """nnU-Net (>= 2.8) reads nnUNet_results from the environment whenever it is used (nnunetv2.paths)."""
    old = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = folder
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    import tskd_nnunet

    out = {"tskd_nnunet": tskd_nnunet.__version__, "torch": torch.__version__}
    try:
        out["nnunetv2"] = md.version("nnunetv2")
    except md.PackageNotFoundError:
        pass
    return out


# ----------------------------------------------------------------------------- staging and checks

def stage_model_folder(staged: str, model_folder: str, paths: Dict[Fold, str], checkpoints: Dict[Fold, dict],
                       plans: dict, configuration: str, dataset_json: dict, fp16: bool) -> Dict[str, Dict[str, int]]:
    """Write the zip's model folder at ``staged``: new plans, dataset files, per fold the exported checkpoint
    (as checkpoint_final.pth) and the files nnU-Net's exporter takes along. Returns checkpoint sizes per fold."""
    os.makedirs(staged)
    with open(os.path.join(staged, "plans.json"), "w") as f:
        json.dump(plans, f, indent=4)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copyfile(os.path.join(model_folder, name), os.path.join(staged, name))
    sizes = {}
    for fold, path in paths.items():
        src_dir, dst_dir = os.path.dirname(path), os.path.join(staged, f"fold_{fold}")
        os.makedirs(os.path.join(dst_dir, "validation"))
        for name in FOLD_FILES:
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
        torch.save(export_checkpoint(checkpoints[fold], plans, configuration, fold, dataset_json, fp16),
                   os.path.join(dst_dir, CHECKPOINT))
        sizes[str(fold)] = {"source_checkpoint_bytes": os.path.getsize(path),
                            "exported_checkpoint_bytes": os.path.getsize(os.path.join(dst_dir, CHECKPOINT))}
    return sizes


def check_staged(staged: str, model_folder: str, folds: Sequence[Fold], checkpoint_name: str, trainer: str,
                 fix: str, fp16: bool, device: torch.device) -> Tuple[Dict[str, float], str, int]:
    """Load the staged folder as the recipient's ``nnUNetv2_predict -tr nnUNetTrainer`` will (strict
    ``load_state_dict``) and the trained one as ``-tr TRAINER`` does; same network class and logits (fp32).
    Returns the checks, the network class name and its parameter count."""
    try:
        exported = _predictor(staged, folds, CHECKPOINT, device)
    except RuntimeError as e:
        raise ExportError(f"nnU-Net cannot load the exported {trainer} ({' '.join(str(e).split())[:200]}). "
                          f"Fix: {fix}") from None
    source = _predictor(model_folder, folds, checkpoint_name, device)
    if type(exported.network) is not type(source.network):
        raise ExportError(f"{trainer} runs a {type(source.network).__name__}, nnU-Net would build a "
                          f"{type(exported.network).__name__}. Fix: {fix}")
    checks = compare_networks(source, exported, fp16, device)
    return checks, type(source.network).__name__, sum(p.numel() for p in source.network.parameters())


# ----------------------------------------------------------------------------- the export
def export_model_zip(model_folder: str, output: str, folds: Sequence[Fold] = (0,),
                     checkpoint_name: str = "checkpoint_final.pth", fp16: bool = False,
                     plans_name: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                     verbose: bool = True) -> Dict[str, Any]:
    """Write ``output`` (a zip in nnU-Net's model-zip layout) from the trained model folder
    ``nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>``; return the provenance it carries
    (plus ``zip_bytes`` and the sizes of the source and exported checkpoints)."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    device = torch.device(device)
    model_folder = os.path.abspath(model_folder)
    check_output_path(output)
    try:
        folds = [f if f == "all" else int(f) for f in folds]
    except ValueError:
        raise ExportError(f"-f {' '.join(map(str, folds))}: a fold is a number or 'all'. Fix: e.g. -f 0") from None
    if len(set(map(str, folds))) != len(folds):
        raise ExportError(f"fold given twice in -f {' '.join(map(str, folds))}. Fix: name each fold once")
    check_model_folder(model_folder, folds, checkpoint_name)
    parts = os.path.basename(model_folder).split("__")
    if len(parts) != 3:
        raise ExportError(f"{model_folder} is not named TRAINER__PLANS__CONFIGURATION as nnU-Net's model folders. "
                          f"Fix: give the folder nnUNetv2_train wrote")
    folder_trainer, source_plans_name, configuration = parts
    dataset_name = os.path.basename(os.path.dirname(model_folder))
    plans = read_json(os.path.join(model_folder, "plans.json"), error=ExportError, fix="restore the model folder")
    dataset_json = read_json(os.path.join(model_folder, "dataset.json"), error=ExportError,
                             fix="restore the model folder")
    plans_name = plans_name or default_plans_name(source_plans_name, folder_trainer)
    if "__" in plans_name or os.sep in plans_name or not plans_name:
        raise ExportError(f"--plans_name {plans_name!r} cannot name an nnU-Net model folder (no '__' or '/'). "
                          f"Fix: e.g. --plans_name {default_plans_name(source_plans_name, folder_trainer)}")

    paths = {f: os.path.join(model_folder, f"fold_{f}", checkpoint_name) for f in folds}
    checkpoints = {f: _load_checkpoint(p) for f, p in paths.items()}
    trainer = checkpoints[folds[0]]["trainer_name"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search of nnUNet_extTrainer
            trainer_class = recursive_find_trainer_class_by_name(trainer)
    except (RuntimeError, AssertionError):
        raise ExportError(f"{paths[folds[0]]} names trainer {trainer}, which this environment cannot find. Fix: "
                          f"export where the trainer is installed (pip install tskd-nnunet, or nnUNet_extTrainer)"
                          ) from None
    width = planned_width(trainer_class)
    if width is None:
        raise ExportError(f"{trainer} builds a network that nnU-Net's own trainer cannot rebuild from plans (not "
                          f"nnU-Net's planned U-Net), so plain nnU-Net could not load it. Fix: "
                          f"{onnx_fix(trainer, dataset_name, configuration, folds[0], source_plans_name)}")
    try:
        new_plans = student_plans(plans, configuration, width, plans_name)
    except (ValueError, RuntimeError, KeyError) as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"{os.path.join(model_folder, 'plans.json')}: {' '.join(str(e).split())}. Fix: check -c"
                          ) from None

    provenance: Dict[str, Any] = {
        "about": ("Provenance of a student distilled with tskd-nnunet, exported by tskd_export_nnunet as a plain "
                  "nnU-Net model. nnU-Net does not read this file."),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "dataset": dataset_name,
        "student": {"trainer": trainer, "plans": source_plans_name, "configuration": configuration,
                    "width": width, "model_folder": f"{dataset_name}/{os.path.basename(model_folder)}"},
        "exported_as": {"trainer": ZIP_TRAINER, "plans": plans_name, "configuration": configuration,
                        "folds": folds, "weights_dtype": "float16" if fp16 else "float32",
                        "predict": (f"nnUNetv2_predict -i INPUT -o OUTPUT -d {dataset_name} -c {configuration} "
                                    f"-tr {ZIP_TRAINER} -p {plans_name} -f {' '.join(map(str, folds))}")},
        "folds": {str(f): fold_provenance(model_folder, configuration, f, paths[f], checkpoints[f]) for f in folds},
    }
    model_dir_name = f"{ZIP_TRAINER}__{plans_name}__{configuration}"
    fix = onnx_fix(trainer, dataset_name, configuration, folds[0], source_plans_name)
    with tempfile.TemporaryDirectory(prefix="tskd_export_nnunet_") as staging:
        staged = os.path.join(staging, dataset_name, model_dir_name)
        sizes = stage_model_folder(staged, model_folder, paths, checkpoints, new_plans, configuration, dataset_json,
                                   fp16)
        checkpoints.clear()
        provenance["checks"], network, parameters = check_staged(staged, model_folder, folds, checkpoint_name, trainer,
                                                                 fix, fp16, device)
        provenance["student"].update(network=network, parameters=parameters, features_per_stage=new_plans[
            "configurations"][configuration]["architecture"]["arch_kwargs"].get("features_per_stage"))
        provenance["sizes"] = sizes
        # nnU-Net's own exporter writes the zip from the staging tree; then the provenance joins the model folder
        with atomic_path(output) as tmp, _nnunet_results(staging), contextlib.redirect_stdout(io.StringIO()):
            export_pretrained_model(dataset_name, str(tmp), configurations=(configuration,), trainer=ZIP_TRAINER,
                                    plans_identifier=plans_name, folds=tuple(folds), strict=True,
                                    save_checkpoints=(CHECKPOINT,), export_crossval_predictions=False)
            with zipfile.ZipFile(tmp, "a", zipfile.ZIP_DEFLATED) as z:
                z.writestr(f"{dataset_name}/{model_dir_name}/{PROVENANCE_FILE}", json.dumps(provenance, indent=2))
    provenance["zip_bytes"] = os.path.getsize(output)
    if verbose:
        mb = 1024 ** 2
        src = sum(s["source_checkpoint_bytes"] for s in sizes.values()) / mb
        dst = sum(s["exported_checkpoint_bytes"] for s in sizes.values()) / mb
        print(f"{trainer} ({provenance['student']['network']}, width {width}, "
              f"{provenance['student']['parameters']:,} parameters) -> {output}: {provenance['zip_bytes'] / mb:.2f} MB "
              f"(checkpoint{'s' if len(folds) > 1 else ''} {src:.2f} MB -> {dst:.2f} MB, "
              f"{'fp16' if fp16 else 'fp32'}; max |logits| vs the trained network "
              f"{provenance['checks']['max_abs_logit_diff_vs_source']:.2g})")
        print(f"install: nnUNetv2_install_pretrained_model_from_zip {output}")
        print(f"predict: {provenance['exported_as']['predict']}")
    return provenance


# ----------------------------------------------------------------------------- console command
def main(argv: Optional[List[str]] = None) -> int:
    """``tskd_export_nnunet``: spelled like nnUNetv2_export_model_to_zip / nnUNetv2_predict."""
    import warnings

    from tskd_nnunet.cli_args import NNUNetStyleParser

    p = NNUNetStyleParser(prog="tskd_export_nnunet", description=(
        "Write a trained student as a standard nnU-Net model zip that plain nnU-Net (without tskd-nnunet) installs "
        "with nnUNetv2_install_pretrained_model_from_zip and runs with nnUNetv2_predict -tr nnUNetTrainer "
        "-p <plans_name>. See documentation/export.md."))
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration (e.g. 2d, 3d_fullres)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"],
                   help="folds (0-4 or all), as nnU-Net's export. Default: 0 1 2 3 4")
    p.add_argument("-tr", default="DistillTrainer", help="trainer class of the student. Default: DistillTrainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of the student. Default: nnUNetPlans")
    p.add_argument("-chk", default="checkpoint_final.pth",
                   help="checkpoint to export (written as checkpoint_final.pth). Default: checkpoint_final.pth")
    p.add_argument("-o", required=True, help="output zip file (written atomically)")
    p.add_argument("--fp16", action="store_true",
                   help="store the weights in fp16 (half the size; nnU-Net still computes in fp32)")
    p.add_argument("--plans_name", default=None,
                   help="plans identifier written into the zip (what the recipient passes to -p). "
                        "Default: <plans>_<trainer>, e.g. nnUNetPlans_DistillTrainer")
    p.add_argument("-device", default="cpu", help="device of the export-time check (cpu, cuda). Default: cpu")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    try:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        try:
            model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
        except (RuntimeError, TypeError, ValueError) as e:  # unknown dataset, nnUNet_results unset
            raise ExportError(f"{' '.join(str(e).split())}. Fix: check -d and nnUNet_raw/nnUNet_results") from None
        export_model_zip(model_folder, args.o, args.f, args.chk, fp16=args.fp16, plans_name=args.plans_name,
                         device=args.device)
    except ExportError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
