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


def env_flag(name: str) -> bool:
    return (env_str(name, "") or "").lower() in ("1", "true", "yes", "on")


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
