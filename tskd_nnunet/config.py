"""The one place where our trainers read their settings.

nnU-Net builds a trainer from five fixed arguments (plans, configuration, fold, dataset_json,
device), so anything else a trainer needs comes from ``TSKD_*`` environment variables, read here.
Every variable is documented in documentation/configuration.md.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple


class TSKDConfigError(ValueError):
    """A TSKD_* setting is malformed. The message names the variable and the fix."""


def env_str(name: str, default: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


# the spellings of a yes/no setting (case-insensitive); anything else is refused, never read as "off" or "on"
TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no ``TSKD_*`` variable: one of TRUE_VALUES / FALSE_VALUES, ``default`` when unset or empty."""
    value = env_str(name)
    if value is None:
        return default
    if value.lower() in TRUE_VALUES:
        return True
    if value.lower() in FALSE_VALUES:
        return False
    raise TSKDConfigError(f"{name}={value!r} is not a yes/no value ({', '.join(TRUE_VALUES)} or "
                          f"{', '.join(FALSE_VALUES)}). Fix: export {name}={'1' if default else '0'} "
                          f"(the default), or unset it")


def env_choice(name: str, choices: Tuple[str, ...], default: str) -> str:
    """An enumerated ``TSKD_*`` variable (case-insensitive): one of ``choices``, ``default`` when unset or empty."""
    value = env_str(name)
    if value is None:
        return default
    if value.lower() not in choices:
        raise TSKDConfigError(f"{name}={value!r} is not one of {', '.join(choices)}. Fix: export {name}={default}, "
                              f"or unset it")
    return value.lower()


def env_float(name: str, default: float) -> float:
    value = env_str(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise TSKDConfigError(f"{name}={value!r} is not a number. Fix: export {name}=<number>, e.g. {default}") from None


def schedule_from_env() -> Optional[Tuple[int, int, int]]:
    """``TSKD_SCHEDULE="epochs,train_iters,val_iters"``: a short schedule for CPU runs and benchmarks."""
    value = env_str("TSKD_SCHEDULE")
    if value is None:
        return None
    try:
        parts = tuple(int(p) for p in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise TSKDConfigError(
            f"TSKD_SCHEDULE={value!r} is malformed. Fix: export TSKD_SCHEDULE=EPOCHS,TRAIN_ITERS,VAL_ITERS "
            f"with three positive integers, e.g. 5,20,5")
    return parts  # type: ignore[return-value]



def save_every_from_env() -> int:
    """``TSKD_SAVE_EVERY=N``: write ``checkpoint_latest.pth`` every N epochs (default 1: every epoch, so a
    killed run resumed with ``--c`` loses at most one epoch)."""
    value = env_str("TSKD_SAVE_EVERY")
    if value is None:
        return 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise TSKDConfigError(f"TSKD_SAVE_EVERY={value!r} must be a positive integer (epochs between "
                              f"checkpoint_latest.pth writes). Fix: export TSKD_SAVE_EVERY=1")
    return n

# --- distillation (tskd_nnunet/trainers/distill.py) ---

def teacher_trainer_from_env(default: str) -> str:
    """``TSKD_TEACHER_TRAINER``: trainer class name of the teacher folder to distil from."""
    return env_str("TSKD_TEACHER_TRAINER", default)  # type: ignore[return-value]


def teacher_plans_from_env(default: str) -> str:
    """``TSKD_TEACHER_PLANS``: plans name of the teacher folder (default: the student's plans)."""
    return env_str("TSKD_TEACHER_PLANS", default)  # type: ignore[return-value]


def teacher_checkpoint_from_env() -> str:
    """``TSKD_TEACHER_CHECKPOINT``: checkpoint file in the teacher's fold folder (default checkpoint_final.pth)."""
    value = env_str("TSKD_TEACHER_CHECKPOINT", "checkpoint_final.pth")
    if "/" in value or "\\" in value or not value.endswith(".pth"):  # type: ignore[operator]
        raise TSKDConfigError(f"TSKD_TEACHER_CHECKPOINT={value!r} must be a file name in the teacher's fold folder. "
                              f"Fix: export TSKD_TEACHER_CHECKPOINT=checkpoint_best.pth")
    return value  # type: ignore[return-value]


KD_MODES = ("cached", "online")


def kd_mode_from_env(device_type: str) -> str:
    """``TSKD_KD_MODE``: ``cached`` (teacher targets computed once per case, then ride through nnU-Net's
    augmentation) or ``online`` (teacher on every augmented batch). Default: online on CUDA, cached elsewhere."""
    return env_choice("TSKD_KD_MODE", KD_MODES, "online" if device_type == "cuda" else "cached")


def teacher_tta_from_env() -> bool:
    """``TSKD_TEACHER_TTA``: mirroring test-time augmentation when caching teacher targets (default 1)."""
    return env_flag("TSKD_TEACHER_TTA", default=True)


def unlabeled_fraction_from_env() -> Optional[float]:
    """``TSKD_UNLABELED_FRACTION``: share of each batch drawn from unlabeled + synthetic cases.
    Unset: every case equally likely (each source in proportion to its case count)."""
    if env_str("TSKD_UNLABELED_FRACTION") is None:
        return None
    value = env_float("TSKD_UNLABELED_FRACTION", 0.5)
    if not 0.0 <= value < 1.0:
        raise TSKDConfigError(f"TSKD_UNLABELED_FRACTION={value} must be in [0, 1). "
                              f"Fix: export TSKD_UNLABELED_FRACTION=0.5")
    return value


def synthetic_fraction_from_env() -> Optional[float]:
    """``TSKD_SYNTHETIC_FRACTION``: share of each batch drawn from synthetic cases (a cap: many synthetic images
    would otherwise crowd out the real ones). Unset: synthetic cases are drawn like any other case."""
    if env_str("TSKD_SYNTHETIC_FRACTION") is None:
        return None
    value = env_float("TSKD_SYNTHETIC_FRACTION", 0.2)
    unlabeled = unlabeled_fraction_from_env()
    if not 0.0 <= value < 1.0 or (unlabeled is not None and value > unlabeled):
        raise TSKDConfigError(f"TSKD_SYNTHETIC_FRACTION={value} must be in [0, 1) and at most "
                              f"TSKD_UNLABELED_FRACTION ({unlabeled}; synthetic cases are unlabeled). "
                              f"Fix: export TSKD_SYNTHETIC_FRACTION=0.2")
    return value


# --- teacher (ViTLoRATeacherTrainer; documentation/teacher.md) -----------------------------------
TEACHER_ENV_VARS = ("TSKD_TEACHER_BACKBONE", "TSKD_TEACHER_WEIGHTS", "TSKD_ALLOW_RANDOM_TEACHER",
                    "TSKD_TEACHER_ARCH_OVERRIDES", "TSKD_TEACHER_IMG_SIZE")


def teacher_env_is_set() -> bool:
    """Whether the user set any teacher variable (else a recorded teacher spec is reused as is)."""
    return any(env_str(name) is not None for name in TEACHER_ENV_VARS)


def teacher_backbone(default: str = "sam_vit_b") -> str:
    """``TSKD_TEACHER_BACKBONE``: registry name (litemedsam, sam_vit_b, sam_vit_l, sam_vit_h, medsam_vit_b,
    vit_tiny, vit_small, vit_base); default: the trainer's (litemedsam for LiteMedSAMTeacherTrainer*,
    sam_vit_b for ViTLoRATeacherTrainer*)."""
    return env_str("TSKD_TEACHER_BACKBONE", default)  # type: ignore[return-value]


def teacher_weights() -> Optional[str]:
    """``TSKD_TEACHER_WEIGHTS``: path of the backbone checkpoint (SAM/MedSAM .pth or timm ViT state dict)."""
    value = env_str("TSKD_TEACHER_WEIGHTS")
    return os.path.abspath(os.path.expanduser(value)) if value is not None else None


def teacher_allow_random() -> bool:
    """``TSKD_ALLOW_RANDOM_TEACHER=1``: build the backbone without weights (smoke tests only)."""
    return env_flag("TSKD_ALLOW_RANDOM_TEACHER")


def no_autoregister() -> bool:
    """``TSKD_NO_AUTOREGISTER=1``: the start-up hook (tskd_nnunet_autoregister.py) leaves ``nnUNet_extTrainer``
    alone. The hook itself runs at every interpreter start and must not fail, so a bad value is refused here,
    when one of our trainers starts (``check_environment``)."""
    return env_flag("TSKD_NO_AUTOREGISTER")


# every yes/no and enumerated variable, checked together when a trainer starts (check_environment): a bad value
# stops the run even where that trainer does not read the variable (a typo is never silently ignored)
FLAG_VARS = {"TSKD_TEACHER_TTA": True, "TSKD_ALLOW_RANDOM_TEACHER": False, "TSKD_NO_AUTOREGISTER": False}
CHOICE_VARS = {"TSKD_KD_MODE": (KD_MODES, "cached")}


def check_environment() -> None:
    """Refuse (TSKDConfigError, one line) any yes/no or enumerated ``TSKD_*`` variable set outside its set."""
    for name, default in FLAG_VARS.items():
        env_flag(name, default)
    for name, (choices, default) in CHOICE_VARS.items():
        env_choice(name, choices, default)


def env_json_object(name: str) -> dict:
    """A ``TSKD_*`` variable holding a JSON object ({} when unset)."""
    import json
    value = env_str(name)
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise TSKDConfigError(f"{name}={value!r} is not a JSON object. Fix: export "
                              f"{name}='{{\"depth\": 2, \"embed_dim\": 64, \"num_heads\": 2}}'")
    return parsed


def teacher_arch_overrides() -> dict:
    """``TSKD_TEACHER_ARCH_OVERRIDES``: JSON object changing the backbone architecture, e.g.
    '{"depth": 2, "embed_dim": 64, "num_heads": 2}'."""
    return env_json_object("TSKD_TEACHER_ARCH_OVERRIDES")


def teacher_img_size() -> Optional[Tuple[int, int]]:
    """``TSKD_TEACHER_IMG_SIZE``: working size of the ViT, "256" or "256,224" (default: nnU-Net's patch
    size rounded up to the ViT patch grid)."""
    value = env_str("TSKD_TEACHER_IMG_SIZE")
    if value is None:
        return None
    try:
        parts = tuple(int(p) for p in value.replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise TSKDConfigError(f"TSKD_TEACHER_IMG_SIZE={value!r} is malformed. Fix: export TSKD_TEACHER_IMG_SIZE=256 "
                              f"or TSKD_TEACHER_IMG_SIZE=256,224")
    return (parts[0], parts[-1])


# --- ViT student (DistillTrainer_vittiny; documentation/distillation.md) -------------------------
STUDENT_ENV_VARS = ("TSKD_STUDENT_WEIGHTS", "TSKD_STUDENT_ARCH_OVERRIDES")


def student_env_is_set() -> bool:
    """Whether the user set any ViT-student variable (else a recorded student spec is reused as is)."""
    return any(env_str(name) is not None for name in STUDENT_ENV_VARS)


def student_weights() -> Optional[str]:
    """``TSKD_STUDENT_WEIGHTS``: timm-format ViT state dict (e.g. from our MAE / MoCo pretraining) that
    initialises the ViT student's backbone; unset = random initialisation."""
    value = env_str("TSKD_STUDENT_WEIGHTS")
    if value is None:
        return None
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise TSKDConfigError(f"TSKD_STUDENT_WEIGHTS={value!r}: file {path} does not exist. Fix: point it at the "
                              f"timm-format ViT-Tiny state dict from pretraining, or unset it for random init.")
    return path


def student_arch_overrides() -> dict:
    """``TSKD_STUDENT_ARCH_OVERRIDES``: JSON object changing the ViT student's backbone architecture
    (same keys as TSKD_TEACHER_ARCH_OVERRIDES), e.g. '{"depth": 2, "embed_dim": 64, "num_heads": 2}'."""
    return env_json_object("TSKD_STUDENT_ARCH_OVERRIDES")


def fed_fault_round() -> Optional[int]:
    """``TSKD_FED_FAULT=nan@R`` (a drill at one federated site): the round whose update this site sends as NaN."""
    value = env_str("TSKD_FED_FAULT")
    if value is None:
        return None
    kind, _, rnd = value.partition("@")
    if kind != "nan" or not rnd.isdigit():
        raise TSKDConfigError(f"TSKD_FED_FAULT={value!r} is not understood. Fix: export TSKD_FED_FAULT=nan@ROUND "
                              f"(e.g. nan@2), or unset it")
    return int(rnd)
