"""What our trainers assume about the installed nnU-Net.

The trainers override nnU-Net's hooks and never copy its loop; the one copy is
``DistillTrainer.get_dataloaders`` (nnU-Net has no hook for the training loader's sampling
probabilities). These tests fail, with what to do, when a new nnU-Net release changes what we
rely on (documentation/conventions.md, "A new nnU-Net release").
"""
import hashlib
import inspect
import os
import re
from importlib.metadata import version

from conftest import REPO

# sha256 (first 16 hex digits) of the source of nnUNetTrainer.get_dataloaders in nnU-Net 2.8.1, which
# DistillTrainer.get_dataloaders copies with one change (the training loader's sampling_probabilities)
GET_DATALOADERS_2_8_1 = "5f59e2b907cfa2d1"


def _trainer():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return nnUNetTrainer


def _source(name: str) -> str:
    return inspect.getsource(getattr(_trainer(), name))


def test_installed_nnunet_is_in_the_range_setup_py_supports():
    from packaging.specifiers import SpecifierSet
    with open(os.path.join(REPO, "setup.py")) as f:
        supported = re.search(r'"nnunetv2([^"]+)"', f.read()).group(1)
    assert version("nnunetv2") in SpecifierSet(supported), (
        f"nnunetv2 {version('nnunetv2')} is outside {supported} (setup.py). Fix: follow 'A new nnU-Net release' in "
        f"documentation/conventions.md, then widen the range")


def test_get_dataloaders_is_the_one_distill_trainer_copies():
    digest = hashlib.sha256(_source("get_dataloaders").encode()).hexdigest()[:16]
    assert digest == GET_DATALOADERS_2_8_1, (
        "nnUNetTrainer.get_dataloaders changed since nnU-Net 2.8.1. Fix: diff it against "
        "DistillTrainer.get_dataloaders (tskd_nnunet/trainers/distill.py), carry the change over (or drop the copy if "
        f"nnU-Net now takes sampling probabilities from a hook), then set GET_DATALOADERS_2_8_1 = {digest!r}")


def test_the_hooks_we_override_are_called_where_we_rely_on_it():
    get_dataloaders = _source("get_dataloaders")
    assert "self.get_tr_and_val_datasets()" in get_dataloaders      # the transfer set + cached targets
    assert "self.get_training_transforms(" in get_dataloaders       # cached targets ride through augmentation
    train_step = _source("train_step")
    assert "output = self.network(data)" in train_step
    assert "self.loss(output, target)" in train_step                # DistillationLoss adds the KD terms
    assert "clip_grad_norm_(self.network.parameters(), 12)" in train_step  # covers the KD heads in the network
    assert "return {'loss': l.detach().cpu().numpy()}" in train_step
    assert "self.loss(output, target)" in _source("validation_step")  # no batch set: nnU-Net's own loss
    initialize = _source("initialize")
    # the KD heads are attached in configure_optimizers, so DDP (built after it) wraps and synchronises them
    assert initialize.index("self.configure_optimizers()") < initialize.index("DDP(self.network")
    assert initialize.index("DDP(self.network") < initialize.index("self.loss = self._build_loss()")
    # settings recorded in the plans reach every checkpoint through init_args
    assert "'init_args': self.my_init_kwargs" in _source("save_checkpoint")
    assert "self.plans_manager = PlansManager(plans)" in _source("__init__")
