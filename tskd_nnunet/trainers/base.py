"""Shared behaviour of all our trainers: the training schedule and crash-safe checkpoints.

nnU-Net's default is 1000 epochs x 250 iterations (about a day on 2 CPU cores). A trainer class
may set ``schedule = (epochs, train_iters, val_iters)``; ``TSKD_SCHEDULE`` overrides it for every
trainer at once, which is how the benchmark runner's CPU profile shortens all methods alike.

Checkpoints (documentation/reliability.md):

- ``checkpoint_latest.pth`` is written at the end of every epoch (``TSKD_SAVE_EVERY=N``: every N
  epochs), so a killed run resumed with ``--c`` loses at most one epoch (nnU-Net's default of 50
  meant that short runs never wrote one).
- Every checkpoint (latest, best, final) is written to a temporary file in the same folder and moved
  into place with ``os.replace``: a kill during the write never leaves half a file.
- ``--c`` with an unreadable checkpoint names the file and falls back to the previous good one
  (final -> latest -> best -> start over), saying so in the training log.

Settings (documentation/configuration.md): every ``TSKD_*`` setting that changes what a trainer trains
(``training_settings()``; subclasses add theirs) is printed at start, kept in the attribute
``tskd_settings`` (nnU-Net's debug.json) and in the plans under ``tskd_settings`` (plans.json and every
checkpoint's ``init_args``). ``--c`` refuses a checkpoint recorded with other values, in one line naming
the file and the ``export`` that continues it.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from tskd_nnunet.config import TSKDConfigError, save_every_from_env, schedule_from_env

# the order in which nnU-Net's --c looks for a checkpoint (nnunetv2/run/run_training.py)
RESUME_CHAIN = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
REQUIRED_KEYS = ("network_weights", "optimizer_state", "current_epoch", "logging", "init_args")
SETTINGS_KEY = "tskd_settings"  # plans entry (so also each checkpoint's init_args) and trainer attribute


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def read_checkpoint(path: str) -> Tuple[Optional[dict], Optional[str]]:
    """(the checkpoint, None) if ``path`` is a readable nnU-Net checkpoint, else (None, a short reason why not)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, empty file, ...: torch raises many types
        text = " ".join(str(e).split()) or type(e).__name__
        return None, f"{type(e).__name__}: {text[:160]}"
    if not isinstance(ckpt, dict):
        return None, f"holds a {type(ckpt).__name__}, not an nnU-Net checkpoint dict"
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        return None, f"is not an nnU-Net training checkpoint (missing {', '.join(missing)})"
    return ckpt, None


def check_checkpoint(path: str) -> Optional[str]:
    """None if ``path`` is a readable nnU-Net checkpoint, else a short reason why not."""
    return read_checkpoint(path)[1]


def settings_conflict(recorded: Dict[str, Any], current: Dict[str, Any], checkpoint: str) -> Optional[str]:
    """None if ``current`` settings equal the ones ``checkpoint`` recorded, else the one-line refusal of ``--c``."""
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if not changed:
        return None

    def show(v: Any) -> str:
        return "unset" if v is None else str(v)

    fixes = [(f"export {k}={recorded[k]}" if recorded.get(k) is not None else f"unset {k}") if k.startswith("TSKD_")
             else f"set the trainer's {k} back to {show(recorded.get(k))}" for k in changed]
    return (f"{checkpoint} was trained with other settings: " +
            ", ".join(f"{k}={show(recorded.get(k))} (now {show(current.get(k))})" for k in changed) +
            f". Fix: {'; '.join(fixes)} to continue it, or train without --c into another nnUNet_results folder.")


class ScheduledTrainer(nnUNetTrainer):
    """nnUNetTrainer whose epoch/iteration counts come from ``schedule`` or ``TSKD_SCHEDULE``, with
    per-epoch atomic ``checkpoint_latest.pth`` and a ``--c`` that survives a damaged checkpoint."""

    schedule: Optional[Tuple[int, int, int]] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = schedule_from_env() or self.schedule
        if schedule is not None:
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = schedule
        self.save_every = max(1, min(save_every_from_env(), self.num_epochs))
        # the checkpoint file load_checkpoint really used (None: none, or started over)
        self.loaded_checkpoint_file: Optional[str] = None
        self.tskd_settings: Dict[str, Any] = {}  # filled in initialize(), once every subclass has set its own

    def training_settings(self) -> Dict[str, Any]:
        """Every TSKD_* setting that changes what this run trains, by variable name (trainer attributes by their
        own name), as JSON values (None: unset). Subclasses add theirs."""
        schedule = (self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)
        return {"TSKD_SCHEDULE": ",".join(str(n) for n in schedule)}

    def initialize(self):
        if not self.was_initialized:
            self.tskd_settings = self.training_settings()
            self.plans_manager.plans[SETTINGS_KEY] = self.tskd_settings  # plans.json and every checkpoint's init_args
            self.print_to_log_file("TSKD settings: " + ", ".join(f"{k}={'unset' if v is None else v}"
                                                                for k, v in self.tskd_settings.items()),
                                   also_print_to_console=True)
        super().initialize()

    # ---- writing: temp file in the same folder, then os.replace --------------------------------
    def save_checkpoint(self, filename: str, extra: Optional[dict] = None) -> None:
        """nnU-Net's checkpoint (plus ``extra`` entries, e.g. a student's KD heads) written to a temp file
        and moved onto ``filename`` only when complete: one rename, never a file without its extras."""
        folder, name = os.path.split(os.path.abspath(filename))
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(tmp)
            if os.path.isfile(tmp):  # rank != 0 or checkpointing disabled write nothing
                if extra:
                    checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
                    checkpoint.update(extra)
                    torch.save(checkpoint, tmp)
                os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # ---- reading: fall back to the previous good checkpoint when resuming ----------------------
    def _fallback_candidates(self, filename: str) -> Optional[List[str]]:
        """Files to try, in order, when ``filename`` is what nnU-Net's --c picked; None = no fallback
        (validation, --val, an explicit file): then an unreadable file is an error."""
        folder, name = os.path.split(os.path.abspath(filename))
        if name not in RESUME_CHAIN or os.path.abspath(folder) != os.path.abspath(self.output_folder):
            return None
        if self.current_epoch != 0 or "--val" in sys.argv:
            return None
        return [os.path.join(folder, n) for n in RESUME_CHAIN[RESUME_CHAIN.index(name):]]

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not isinstance(filename_or_checkpoint, str):
            super().load_checkpoint(filename_or_checkpoint)
            return
        filename = filename_or_checkpoint
        candidates = self._fallback_candidates(filename)
        if candidates is None:
            checkpoint, reason = read_checkpoint(filename) if os.path.isfile(filename) else (None, "does not exist")
            if reason is not None:
                raise CheckpointError(f"checkpoint {filename} cannot be loaded ({reason}). Fix: restore the file, "
                                      f"or delete it and resume with --c from checkpoint_latest/best.pth")
            self._load(filename, checkpoint)
            return
        for path in candidates:
            if not os.path.isfile(path):
                continue
            checkpoint, reason = read_checkpoint(path)
            if reason is None:
                if path != filename:
                    self.print_to_log_file(f"falling back to {path}")
                self._load(path, checkpoint)
                return
            self.print_to_log_file(f"WARNING: checkpoint {path} is unreadable ({reason}); trying the previous "
                                   f"good checkpoint", also_print_to_console=True)
        self.print_to_log_file(f"WARNING: no readable checkpoint in {self.output_folder} "
                               f"(tried {', '.join(os.path.basename(p) for p in candidates)}): starting a new "
                               f"training from epoch 0", also_print_to_console=True)
        if not self.was_initialized:
            self.initialize()
        self.loaded_checkpoint_file = None

    def _load(self, path: str, checkpoint: dict) -> None:
        """nnU-Net's load of ``path`` (``checkpoint`` is its content), after the settings check of ``--c``."""
        recorded = ((checkpoint.get("init_args") or {}).get("plans") or {}).get(SETTINGS_KEY)
        if recorded is not None and "--val" not in sys.argv:  # older checkpoints recorded nothing
            conflict = settings_conflict(recorded, self.training_settings(), path)
            if conflict:
                raise TSKDConfigError(conflict)
        extra = {k: v for k, v in checkpoint.items() if k not in ("network_weights", "optimizer_state")}
        checkpoint.clear()  # nnU-Net reads the file again, onto the device: do not hold the weights twice
        super().load_checkpoint(path)
        self.loaded_checkpoint_file = path
        self.load_extra_state(extra)
        self._log_resume(path)

    def load_extra_state(self, checkpoint: dict) -> None:
        """Hook: restore what a subclass saved beside nnU-Net's entries (``save_checkpoint(extra=...)``)."""

    def _log_resume(self, path: str) -> None:
        self.print_to_log_file(f"loaded checkpoint {path}: continuing from epoch {self.current_epoch} "
                               f"(of {self.num_epochs})", also_print_to_console=True)


class TSKDPlainTrainer(ScheduledTrainer):
    """Plain nnU-Net, only with the schedule hook: the baseline at the benchmark's short schedules."""


class TSKDPlainTrainer_demo(TSKDPlainTrainer):
    schedule = (4, 25, 5)


class TSKDPlainTrainer_test(TSKDPlainTrainer):
    schedule = (1, 2, 1)
