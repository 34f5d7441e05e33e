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

Non-finite values (documentation/reliability.md, "Round two"): a training step whose loss or gradients are NaN/Inf
is skipped (the optimizer leaves the weights alone) and logged; ``max_nonfinite_steps`` (5) such steps in a row stop
the training with :class:`NonFiniteError`, naming the last good checkpoint, which is kept: a checkpoint whose
weights are not all finite is never written.

Errors: nnU-Net's ``nnUNetv2_train`` has no error handling of its own, so an exception from a trainer reached
Python's handler as a 30-line traceback. A trainer of ours, once constructed, installs a ``sys.excepthook`` that
prints our one-line error classes (``ONE_LINE_ERRORS``) as that one line alone (``module.Class: message``, the same
last line as before) and leaves every other exception to the previous hook; in-process callers still receive the
typed exception.

Settings (documentation/configuration.md): every ``TSKD_*`` setting that changes what a trainer trains
(``training_settings()``; subclasses add theirs) is printed at start, kept in the attribute
``tskd_settings`` (nnU-Net's debug.json) and in the plans under ``tskd_settings`` (plans.json and every
checkpoint's ``init_args``). ``--c`` refuses a checkpoint recorded with other values, in one line naming
the file and the ``export`` that continues it.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from tskd_nnunet.config import TSKDConfigError, check_environment, save_every_from_env, schedule_from_env

# the order in which nnU-Net's --c looks for a checkpoint (nnunetv2/run/run_training.py)
RESUME_CHAIN = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
REQUIRED_KEYS = ("network_weights", "optimizer_state", "current_epoch", "logging", "init_args")
SETTINGS_KEY = "tskd_settings"  # plans entry (so also each checkpoint's init_args) and trainer attribute


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the fix."""


class NonFiniteError(RuntimeError):
    """The loss or the weights turned NaN/Inf; the message names the checkpoint kept and the fix."""


# our error classes whose message is complete (names the file or variable and the fix), by qualified name, so
# that the hook needs no import of the modules that define them
ONE_LINE_ERRORS = frozenset({
    "tskd_nnunet.config.TSKDConfigError", "tskd_nnunet.trainers.base.CheckpointError",
    "tskd_nnunet.trainers.base.NonFiniteError", "tskd_nnunet.distill.teacher_io.TeacherError",
    "tskd_nnunet.models.vit_backbones.TeacherCheckpointError", "tskd_nnunet.data.transfer_set.TransferSetError",
    "tskd_nnunet.data.preprocessed_files.PreprocessedFileError"})


def is_one_line_error(exc: BaseException) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in ONE_LINE_ERRORS for c in type(exc).__mro__)


def install_one_line_errors() -> None:
    """Make an uncaught error of ONE_LINE_ERRORS print as its one line (what nnUNetv2_train shows the user);
    every other exception still goes to the previous hook. Idempotent."""
    previous = sys.excepthook
    if getattr(previous, "_tskd_one_line", False):
        return

    def hook(exc_type, exc, tb):
        if is_one_line_error(exc):
            print(f"{exc_type.__module__}.{exc_type.__qualname__}: {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)
    hook._tskd_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def nonfinite_tensors(state: Dict[str, Any]) -> List[str]:
    """Names of the floating-point tensors in ``state`` (a state dict) holding NaN or Inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))))


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
    # consecutive non-finite training steps that stop the run. One such step is skipped: a rare batch (an fp16
    # overflow in a loss term, a degenerate crop) can give one, and skipping it costs nothing. Five in a row,
    # with batches drawn at random, is no longer chance but the data, the teacher's targets or the weights; a
    # diverged run gives a NaN at every step, so it stops within five steps of the last good one.
    max_nonfinite_steps: int = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        install_one_line_errors()
        check_environment()  # before nnU-Net creates the fold folder and its log
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = schedule_from_env() or self.schedule
        if schedule is not None:
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = schedule
        self.save_every = max(1, min(save_every_from_env(), self.num_epochs))
        # the checkpoint file load_checkpoint really used (None: none, or started over)
        self.loaded_checkpoint_file: Optional[str] = None
        self.tskd_settings: Dict[str, Any] = {}  # filled in initialize(), once every subclass has set its own
        self.nonfinite_in_a_row = 0
        self._step_skipped = False

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
        was_initialized = self.was_initialized
        super().initialize()
        if not was_initialized:
            self.optimizer.register_step_pre_hook(self._skip_nonfinite_step)

    # ---- non-finite steps: skipped; max_nonfinite_steps in a row stop the run ------------------
    def _skip_nonfinite_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Optimizer pre-step hook: with a NaN/Inf gradient (a NaN loss gives one everywhere) the step leaves every
        weight as it is (an optimizer skips parameters without a gradient). Under AMP, nnU-Net's GradScaler skips
        such steps before they get here."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not all_finite(p.grad for p in params):
            for p in params:
                p.grad = None
            self._step_skipped = True

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step, then the count of non-finite steps in a row (their update was skipped)."""
        self._step_skipped = False
        out = super().train_step(batch)
        bad = self._step_skipped or not np.all(np.isfinite(out["loss"]))
        if self.is_ddp:  # every rank stops at the same step, or the others would wait for it forever
            import torch.distributed as dist
            flag = torch.tensor([float(bad)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            self.nonfinite_in_a_row = 0
            return out
        self.nonfinite_in_a_row += 1
        self.print_to_log_file(f"WARNING: epoch {self.current_epoch}: non-finite loss or gradient (loss "
                               f"{float(np.mean(out['loss']))}): step skipped, weights unchanged "
                               f"({self.nonfinite_in_a_row} of {self.max_nonfinite_steps} in a row)",
                               also_print_to_console=True)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            msg = (f"training stopped in epoch {self.current_epoch}: the loss was non-finite (NaN/Inf) in "
                   f"{self.nonfinite_in_a_row} consecutive steps ({self.max_nonfinite_steps} stop a run; see "
                   f"{self.log_file}). {self._kept_checkpoints()} Fix: look for NaN/Inf in the inputs or the "
                   f"teacher's targets, or lower the learning rate; then resume with --c or train again.")
            self.print_to_log_file(msg, also_print_to_console=False)
            raise NonFiniteError(msg)
        return out

    def _kept_checkpoints(self) -> str:
        found = [os.path.join(self.output_folder, n) for n in RESUME_CHAIN
                 if os.path.isfile(os.path.join(self.output_folder, n))]
        return (f"Kept the last good checkpoint(s): {', '.join(found)}." if found else
                f"No checkpoint was written before (nothing in {self.output_folder}).")

    # ---- writing: temp file in the same folder, then os.replace --------------------------------
    def save_checkpoint(self, filename: str, extra: Optional[dict] = None) -> None:
        """nnU-Net's checkpoint (plus ``extra`` entries, e.g. a student's KD heads) written to a temp file
        and moved onto ``filename`` only when complete: one rename, never a file without its extras. Weights that
        are not all finite are never written: the previous file stays."""
        network = getattr(self, "network", None)
        bad = nonfinite_tensors(network.state_dict()) if network is not None else []
        if bad:
            raise NonFiniteError(
                f"not writing {filename}: the network's {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                f"hold NaN/Inf ({len(bad)} tensor(s)). {self._kept_checkpoints()} Fix: look for NaN/Inf in the "
                f"inputs or the teacher's targets, or lower the learning rate; then resume with --c or train again.")
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
