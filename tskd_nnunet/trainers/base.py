"""Shared behaviour of all our trainers: the training schedule.

nnU-Net's default is 1000 epochs x 250 iterations (about a day on 2 CPU cores). A trainer class
may set ``schedule = (epochs, train_iters, val_iters)``; ``TSKD_SCHEDULE`` overrides it for every
trainer at once, which is how the benchmark runner's CPU profile shortens all methods alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from tskd_nnunet.config import schedule_from_env


class ScheduledTrainer(nnUNetTrainer):
    """nnUNetTrainer whose epoch/iteration counts come from ``schedule`` or ``TSKD_SCHEDULE``."""

    schedule: Optional[Tuple[int, int, int]] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = schedule_from_env() or self.schedule
        if schedule is not None:
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = schedule
            self.save_every = max(1, min(self.save_every, self.num_epochs))


class TSKDPlainTrainer(ScheduledTrainer):
    """Plain nnU-Net, only with the schedule hook: the baseline at the benchmark's short schedules."""


class TSKDPlainTrainer_demo(TSKDPlainTrainer):
    schedule = (4, 25, 5)


class TSKDPlainTrainer_test(TSKDPlainTrainer):
    schedule = (1, 2, 1)
