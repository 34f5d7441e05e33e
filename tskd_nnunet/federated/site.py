"""What a site does with its nnU-Net teacher in a federation: nnU-Net's own trainer, a few calls in order.

The site's teacher lives where ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER`` puts it
(``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION/fold_F``); each round continues that one nnU-Net
training by E epochs, like ``--c`` would:

1. the trainer is built and initialised with ``num_epochs = rounds x E`` (so the warm-up + poly learning-rate
   schedule spans the whole federation, not each round) and resumes the site's own last checkpoint if there is
   one (nnU-Net's ``load_checkpoint`` through our fallback chain: optimizer moments, logger, epoch counter);
2. the global trainable tensors replace the local ones;
3. nnU-Net's ``validation_step`` over its validation batches gives the global model's pseudo-Dice at this site;
4. nnU-Net's ``run_training`` trains E more epochs (its own validation logs the local pseudo-Dice each epoch,
   its ``on_train_end`` writes checkpoint_final.pth);
5. the trainable tensors are returned with the number of labeled training cases of this fold (the weight).

:func:`install_global` ends the federation at the site: the global weights go into ``checkpoint_final.pth`` of
that folder, so ``nnUNetv2_predict -tr TRAINER`` and ``DistillTrainer`` (``TSKD_TEACHER_TRAINER=TRAINER``) use the
federated teacher like any other; ``federated.json`` beside it says where the weights came from.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch

from tskd_nnunet.atomic_io import atomic_torch_save, atomic_write_json
from tskd_nnunet.federated.updates import State, load_trainable_state, trainable_state
from tskd_nnunet.models.util import unwrap_network
from tskd_nnunet.trainers.base import RESUME_CHAIN


@dataclass
class SiteTask:
    """The federation's training settings, the same at every site (sent by the server with each message)."""
    dataset: int
    configuration: str
    fold: int
    trainer: str
    plans: str
    total_epochs: int    # rounds x local epochs: the length of the learning-rate schedule
    local_epochs: int

    def to_config(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_config(cls, d: Dict[str, Any]) -> "SiteTask":
        ints = ("dataset", "fold", "total_epochs", "local_epochs")
        return cls(**{k: int(d[k]) if k in ints else str(d[k]) for k in cls.__dataclass_fields__})


@contextmanager
def site_lock(task: SiteTask) -> Iterator[None]:
    """One trainer at a time in the site's model folder: a message of a federation that was restarted meanwhile
    (the SuperLink killed while this site trained) waits for the training still running instead of racing it."""
    folder = output_folder(task)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".federated.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_trainer(task: SiteTask, device: torch.device):
    """nnU-Net's trainer for ``task`` at this site, initialised, resumed from its own last checkpoint if any."""
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(task.dataset), task.configuration, task.fold, task.trainer, task.plans,
                                    device=device)
    trainer.num_epochs = task.total_epochs  # before initialize(): the LR schedule and recorded settings see it
    trainer.initialize()
    if any(os.path.isfile(os.path.join(trainer.output_folder, n)) for n in RESUME_CHAIN):
        trainer.load_checkpoint(os.path.join(trainer.output_folder, RESUME_CHAIN[0]))
    return trainer


def num_labeled_cases(trainer) -> Tuple[int, int]:
    """(training cases, validation cases) of the trainer's fold: nnU-Net's own split of this site's data."""
    tr_keys, val_keys = trainer.do_split()
    return len(tr_keys), len(val_keys)


def pseudo_dice(trainer) -> Tuple[float, List[float]]:
    """nnU-Net's pseudo-Dice of the trainer's current network: its ``validation_step`` over
    ``num_val_iterations_per_epoch`` batches of its validation loader, pooled like ``on_validation_epoch_end``."""
    train_loader, val_loader = trainer.get_dataloaders()  # nnU-Net builds both; only the validation one is used
    _finish(train_loader)
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.eval()
    tp = fp = fn = 0
    with torch.no_grad():
        for _ in range(trainer.num_val_iterations_per_epoch):
            out = trainer.validation_step(next(val_loader))
            tp, fp, fn = tp + np.asarray(out["tp_hard"]), fp + np.asarray(out["fp_hard"]), fn + np.asarray(out["fn_hard"])
    _finish(val_loader)
    per_class = [float(2 * t / (2 * t + p + n)) if (2 * t + p + n) > 0 else float("nan") for t, p, n in zip(tp, fp, fn)]
    return float(np.nanmean(per_class)) if not all(np.isnan(per_class)) else float("nan"), per_class


def _finish(loader: Any) -> None:
    if hasattr(loader, "_finish"):
        loader._finish()


def initial_state(task: SiteTask, device: torch.device) -> State:
    """The trainable tensors of a freshly built teacher (round 0 of a federation)."""
    trainer = build_trainer(task, device)
    return trainable_state(unwrap_network(trainer.network))


def local_round(task: SiteTask, global_state: State, device: torch.device) -> Tuple[State, Dict[str, Any]]:
    """Steps 1-5 of the module docstring. Returns (trainable state, metrics)."""
    trainer = build_trainer(task, device)
    load_trainable_state(unwrap_network(trainer.network), global_state)
    n_train, n_val = num_labeled_cases(trainer)
    global_dice, global_per_class = pseudo_dice(trainer)
    start = trainer.current_epoch
    trainer.num_epochs = start + task.local_epochs
    trainer.print_to_log_file(f"federated round: global weights loaded (pseudo Dice here "
                              f"{np.round(global_per_class, 4).tolist()}), local epochs {start}-{trainer.num_epochs - 1}",
                              also_print_to_console=True)
    trainer.run_training()
    local_per_class = [float(v) for v in trainer.logger.get_value("dice_per_class_or_region", step=-1)]
    metrics = {"num_train": n_train, "num_val": n_val, "global_pseudo_dice": global_dice,
               "global_pseudo_dice_per_class": global_per_class,
               "local_pseudo_dice": float(np.nanmean(local_per_class)), "local_pseudo_dice_per_class": local_per_class,
               "epochs": [start, trainer.num_epochs]}
    return trainable_state(unwrap_network(trainer.network)), metrics


def install_global(task: SiteTask, global_state: State, device: torch.device, provenance: Dict[str, Any]
                   ) -> Tuple[str, Dict[str, Any]]:
    """Write the global teacher as this site's nnU-Net model (checkpoint_final.pth, atomically) and report its
    pseudo-Dice here. Returns (model folder, metrics)."""
    from batchgenerators.utilities.file_and_folder_operations import join, save_json

    trainer = build_trainer(task, device)
    net = unwrap_network(trainer.network)
    load_trainable_state(net, global_state)
    n_train, n_val = num_labeled_cases(trainer)
    dice, per_class = pseudo_dice(trainer)
    # what on_train_start would have copied, for a site that never trained a round (prediction needs them)
    if not os.path.isfile(join(trainer.output_folder_base, "plans.json")):
        save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, "plans.json"), sort_keys=False)
        save_json(trainer.dataset_json, join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    os.makedirs(trainer.output_folder, exist_ok=True)
    local = join(trainer.output_folder, "checkpoint_final.pth")
    if os.path.isfile(local):  # the site's own last local model, kept for comparison
        os.replace(local, join(trainer.output_folder, "checkpoint_local_final.pth"))
    trainer.save_checkpoint(local)
    metrics = {"num_train": n_train, "num_val": n_val, "global_pseudo_dice": dice, "global_pseudo_dice_per_class": per_class}
    atomic_write_json(join(trainer.output_folder, "federated.json"), {**provenance, **metrics})
    trainer.print_to_log_file(f"federated teacher installed as {local} (pseudo Dice here {np.round(per_class, 4).tolist()})",
                              also_print_to_console=True)
    return trainer.output_folder, metrics


def keep_sent(folder: str, rnd: int, state: State) -> str:
    """The site's own record of exactly what it sent in round ``rnd`` (audit; never leaves the site)."""
    path = os.path.join(folder, "federated_sent", f"round_{rnd:04d}.pt")
    atomic_torch_save(state, path)
    return path


def output_folder(task: SiteTask) -> str:
    """nnU-Net's model folder of ``task`` at this site (``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF/fold_F``)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(task.dataset, task.trainer, task.plans, task.configuration, task.fold)
