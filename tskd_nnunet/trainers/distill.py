"""DistillTrainer: distil a trained teacher into a small nnU-Net student.

``nnUNetv2_train DATASET 2d FOLD -tr DistillTrainer`` trains the student nnU-Net planned for the
configuration (or a slimmer preset) on the transfer set (tskd_nnunet.data.transfer_set): nnU-Net's
Dice+CE on the labeled cases of each batch, pixel KD (tskd_nnunet.distill.losses) on every case,
optionally feature KD. The teacher (tskd_nnunet.distill.teacher_io) runs frozen on the same
augmented batch. ``build_network_architecture`` builds only the student, so ``nnUNetv2_predict
-tr DistillTrainer`` never needs the teacher, and checkpoints hold student weights only (the
feature-KD projection is a training-only submodule of the network, saved under its own checkpoint key).

nnU-Net owns the loop and its ``train_step``; this class overrides hooks: the datasets
(``get_tr_and_val_datasets``: the transfer set, with the cached teacher targets riding along), the
training transforms, the loss (``_build_loss``: :class:`DistillationLoss`, nnU-Net's loss plus the KD
terms) and a thin ``train_step`` that tells the loss about the batch before nnU-Net's own step runs.
``get_dataloaders`` is the one copy of nnU-Net code (for the sampling probabilities; see its docstring).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch import autocast, nn

from nnunetv2.paths import nnUNet_raw, nnUNet_results
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from tskd_nnunet import config
from tskd_nnunet.config import (synthetic_fraction_from_env, teacher_checkpoint_from_env, teacher_plans_from_env,
                                teacher_trainer_from_env, unlabeled_fraction_from_env)
from tskd_nnunet.data.transfer_set import (SOURCES, SYNTHETIC, TransferDataset, TransferSet, build_transfer_set,
                                           format_counts, raw_test_ids, sampling_probabilities)
from tskd_nnunet.distill.losses import (DeepSupervisionKD, DistillationLoss, FeatureKD, FeatureTap, feature_tap_for,
                                        masked_supervised_loss, through_every_parameter, tokens_to_grid)
from tskd_nnunet.distill.target_cache import (CachedTargetDataset, missing_cases, split_batch, verify_targets,
                                              wrap_transforms)
from tskd_nnunet.distill.teacher_io import TeacherError, load_teacher
from tskd_nnunet.models.students import (build_plans_student, build_vit_student, count_parameters,
                                         load_vit_student_weights, resolve_vit_student_spec)
from tskd_nnunet.models.teacher_net import (TeacherSpec, adamw_param_groups, deep_supervision_scales,
                                            resolve_recorded_spec)
from tskd_nnunet.models.util import attach_training_module, unwrap_network
from tskd_nnunet.trainers.base import ScheduledTrainer
from tskd_nnunet.trainers.teacher import WarmupPolyLRScheduler

HEADS_KEY = "tskd_kd_heads"  # the feature-KD projection: its submodule name in the network and its checkpoint key


class DistillTrainer(ScheduledTrainer):
    """Teacher → student distillation. Class attributes are the knobs; variants override them."""

    teacher_trainer_name: str = "LiteMedSAMTeacherTrainer"  # TSKD_TEACHER_TRAINER overrides (comma list: ensemble)
    kd_weight: float = 1.0            # alpha: weight of pixel KD (supervised loss has weight 1)
    kd_temperature: float = 2.0       # T of the softened distributions; the loss is scaled by T²
    kd_dice_weight: float = 0.0       # > 0: also soft Dice vs the teacher's probabilities (small organs, _dice)
    kd_hard_labels: bool = False      # the teacher's argmax instead of its probabilities (_hard)
    feature_kd: Optional[str] = None  # None (off), "mse" or "cwd"
    feature_kd_weight: float = 1.0
    student_width: float = 1.0        # features_per_stage factor of the planned U-Net
    feature_source_is_teacher = True  # TaskAgnostic distils features of the un-tuned backbone instead

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher: Optional[nn.Module] = None
        self.teacher_checkpoint_file: Optional[str] = None  # what load_teacher loaded (named in its errors)
        self.kd_heads: Optional[nn.ModuleDict] = None
        self.pixel_kd: Optional[DeepSupervisionKD] = None
        self.transfer_set: Optional[TransferSet] = None
        self._labeled_ids: set = set()
        self._source_of: Dict[str, str] = {}
        self._drawn: Counter = Counter()
        self._taps: Dict[str, FeatureTap] = {}
        self.kd_mode = self.resolve_kd_mode()  # an attribute: nnU-Net's debug.json records it
        self.target_cache_folder: Optional[str] = None
        self.transfer_set_counts: Dict[str, int] = {}
        self.unlabeled_fraction = unlabeled_fraction_from_env()
        self.synthetic_fraction = synthetic_fraction_from_env()
        self.teacher_trainers = [t.strip() for t in teacher_trainer_from_env(self.teacher_trainer_name).split(",")]
        self.teacher_plans = teacher_plans_from_env(self.plans_manager.plans_name)
        self.teacher_checkpoint_name = teacher_checkpoint_from_env()
        self.teacher_tta = config.teacher_tta_from_env()

    def training_settings(self) -> Dict[str, Any]:
        settings = super().training_settings()
        settings.update({
            "TSKD_KD_MODE": self.kd_mode, "TSKD_TEACHER_TRAINER": ",".join(self.teacher_trainers),
            "TSKD_TEACHER_PLANS": self.teacher_plans, "TSKD_TEACHER_CHECKPOINT": self.teacher_checkpoint_name,
            "TSKD_TEACHER_TTA": "1" if self.teacher_tta else "0", "TSKD_UNLABELED_FRACTION": self.unlabeled_fraction,
            "TSKD_SYNTHETIC_FRACTION": self.synthetic_fraction,
            "kd_weight": self.kd_weight, "kd_temperature": self.kd_temperature, "feature_kd": self.feature_kd,
            "feature_kd_weight": self.feature_kd_weight, "student_width": self.student_width})
        if self.kd_dice_weight:  # only when on: checkpoints from before the knob continue with --c
            settings["kd_dice_weight"] = self.kd_dice_weight
        if self.kd_hard_labels:
            settings["kd_hard_labels"] = True
        return settings

    def resolve_kd_mode(self) -> str:
        """cached (default off CUDA) or online; feature KD and task-agnostic KD need the teacher online."""
        if not self.uses_teacher_logits() and not self.feature_kd:
            return "none"
        mode = config.kd_mode_from_env(self.device.type)
        if self.feature_kd and mode == "cached":
            if config.env_str("TSKD_KD_MODE"):
                raise config.TSKDConfigError(f"{type(self).__name__} distils features, which are not cached. Fix: "
                                             f"export TSKD_KD_MODE=online (or unset it).")
            mode = "online"
        return mode

    # ---- network: the student only -------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return build_plans_student(configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision, cls.student_width)

    def initialize(self):
        if not self.was_initialized and self.feature_kd and self.feature_source_is_teacher:
            self.load_teacher()  # the projection's size depends on the teacher
        super().initialize()
        self.pixel_kd = DeepSupervisionKD(self.kd_temperature, multilabel=self.label_manager.has_regions,
                                          dice_weight=self.kd_dice_weight, hard=self.kd_hard_labels)
        heads = count_parameters(self.kd_heads) if self.kd_heads is not None else 0
        self.print_to_log_file(f"Student {type(unwrap_network(self.network)).__name__} (width {self.student_width}): "
                               f"{count_parameters(self.network) - heads:,} parameters")

    def load_teacher(self) -> nn.Module:
        """Find the teacher by convention, check it matches, move it to the device, frozen. Once per process
        (under DDP: once per rank, on the rank's own device)."""
        if self.teacher is None:
            if len(self.teacher_trainers) > 1:
                raise config.TSKDConfigError(f"TSKD_TEACHER_TRAINER names {len(self.teacher_trainers)} teachers; an "
                                             f"ensemble is distilled through cached targets only. Fix: export "
                                             f"TSKD_KD_MODE=cached.")
            trainer = self.teacher_trainers[0]
            network, loc = load_teacher(os.fspath(nnUNet_results), self.plans_manager.plans, self.configuration_name,
                                        self.dataset_json, self.fold, trainer, self.teacher_plans,
                                        self.teacher_checkpoint_name)
            self.teacher = network.to(self.device)
            self.teacher_checkpoint_file = loc.checkpoint
            self.print_to_log_file(f"Teacher {trainer} from {loc.checkpoint}: {count_parameters(network):,} parameters "
                                   f"(frozen, eval mode)")
        return self.teacher

    # ---- cached teacher targets (tskd_nnunet/distill/target_cache.py) ------------------------------
    def prepare_target_cache(self, dataset: TransferDataset, predictions: Optional[str] = None) -> str:
        """The folder of the teacher(s)' cached targets for the dataset's cases, built where missing or stale.
        ``predictions``: a folder of the teacher's ``nnUNetv2_predict --save_probabilities`` output to take cases from
        (tskd_cache_targets --from_predictions). Under DDP only rank 0 builds the teachers and writes (each file
        atomically); the other ranks receive its folder, check that every case is there, and only read
        (memory-mapped, read-only)."""
        folder = self._build_target_cache(dataset, predictions) if self.local_rank == 0 else None
        if self.is_ddp:
            import torch.distributed as dist
            shared = [folder]
            dist.broadcast_object_list(shared, src=0)  # also the barrier: rank 0 has finished writing
            folder = shared[0]
        missing = missing_cases(folder, dataset.identifiers, dataset.case_file)
        if missing:
            raise TeacherError(f"Cached teacher targets {folder} lack {len(missing)} case(s), e.g. {missing[0]}. Fix: "
                               f"delete the folder; the next training run (or tskd_cache_targets) rebuilds it.")
        verify_targets(folder, dataset.identifiers)  # every rank: each raises the same one-line error, none waits
        return folder

    def _build_target_cache(self, dataset: TransferDataset, predictions: Optional[str]) -> str:
        identifiers = dataset.identifiers
        if predictions is None and self.target_cache_folder and not missing_cases(self.target_cache_folder,
                                                                                   identifiers, dataset.case_file):
            return self.target_cache_folder  # a loader rebuilt over the same cases: no teacher to build
        from tskd_nnunet.distill.target_cache import build_cache, cache_folder, cache_key
        from tskd_nnunet.distill.teacher_io import load_teacher_for_cache
        teachers = [load_teacher_for_cache(os.fspath(nnUNet_results), self.plans_manager.plans, self.configuration_name,
                                           self.dataset_json, self.fold, t, self.teacher_plans,
                                           self.teacher_checkpoint_name) for t in self.teacher_trainers]
        tta = self.teacher_tta
        key = cache_key(teachers, self.plans_manager.plans, self.configuration_name, self.fold, tta)
        folder = cache_folder(self.preprocessed_dataset_folder_base, self.plans_manager.plans_name,
                              self.configuration_name, self.fold, key)
        n = build_cache(folder, teachers, dataset.load_case, identifiers, self.device, tta,
                        self.label_manager.has_regions,
                        {"key": key, "fold": self.fold, "configuration": self.configuration_name},
                        log=lambda m: self.print_to_log_file(m, also_print_to_console=True), predictions=predictions,
                        case_file=dataset.case_file)
        self.print_to_log_file(f"Teacher targets: {folder} ({n} computed now, {len(identifiers) - n} reused; key "
                               f"{key} = teacher checkpoint(s) + plans + fold + TTA {tta})", also_print_to_console=True)
        return folder

    def student_optimizer(self):
        """Optimizer and LR scheduler of the student (nnU-Net's SGD + poly); variants may change it."""
        return super().configure_optimizers()

    def configure_optimizers(self):
        optimizer, lr_scheduler = self.student_optimizer()
        if self.feature_kd:
            self.kd_heads = self._build_feature_heads().to(self.device)
            # a training-only submodule of the network (nnU-Net wraps it in DDP next, and clips its gradients with
            # the network's), left out of network_weights; same hyper-parameters and LR schedule as the student
            attach_training_module(unwrap_network(self.network), HEADS_KEY, self.kd_heads)
            optimizer.add_param_group({"params": list(self.kd_heads.parameters())})
        return optimizer, lr_scheduler

    # ---- feature KD ----------------------------------------------------------------------------
    def teacher_outputs(self, data: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(teacher logits at full resolution or None, teacher features (B, C, *grid) or None), no grad."""
        if not self.uses_teacher_logits() and not self.feature_kd:
            return None, None
        with torch.no_grad():
            out = self.load_teacher()(data)
        logits = (out[0] if isinstance(out, (list, tuple)) else out) if self.uses_teacher_logits() else None
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise TeacherError(f"Teacher {self.teacher_checkpoint_file} gives NaN/Inf outputs on the batch of epoch "
                               f"{self.current_epoch} (online KD): the student would train to NaN. Fix: retrain the "
                               f"teacher, or distil from another checkpoint of it (TSKD_TEACHER_CHECKPOINT).")
        feats = tokens_to_grid(self._taps["teacher"].pop()) if self.feature_kd else None
        return logits, feats

    def _build_feature_heads(self) -> nn.ModuleDict:
        student = unwrap_network(self.network)
        self._taps = {"student": feature_tap_for(student)}
        if self.feature_source_is_teacher:
            self._taps["teacher"] = feature_tap_for(self.load_teacher())
        # one dummy forward at patch size tells both feature shapes
        x = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size), device=self.device)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            student(x)
        student.train(was_training)
        s_feat = self._taps["student"].pop()
        _, t_feat = self.teacher_outputs(x)
        self.print_to_log_file(f"Feature KD ({self.feature_kd}): student {self._taps['student'].module_name} "
                               f"{tuple(s_feat.shape[1:])} -> features {tuple(t_feat.shape[1:])}")
        return nn.ModuleDict({"feature": FeatureKD(s_feat.shape[1], t_feat.shape[1], s_feat.ndim - 2,
                                                    self.feature_kd)})

    # ---- data: the transfer set ----------------------------------------------------------------
    def build_transfer_set(self, tr_keys: List[str], val_keys: List[str]) -> TransferSet:
        raw = os.path.join(os.fspath(nnUNet_raw), self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        return build_transfer_set(self.preprocessed_dataset_folder_base, self.preprocessed_dataset_folder,
                                  self.plans_manager.plans_name, self.configuration_name, self.fold, tr_keys, val_keys,
                                  raw_test_ids(raw, self.dataset_json["file_ending"]),
                                  self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))

    def select_training_cases(self, ts: TransferSet) -> TransferSet:
        """Hook for variants that train on a part of the transfer set (TaskAgnostic's phase 2)."""
        return ts

    def transfer_dataset(self) -> Tuple[TransferDataset, List[str]]:
        """The fold's transfer set as one nnU-Net dataset (logged and recorded), and the validation keys."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        tr_keys, val_keys = self.do_split()
        self.transfer_set = self.select_training_cases(self.build_transfer_set(tr_keys, val_keys))
        self._labeled_ids = set(self.transfer_set.labeled)
        self._source_of = self.transfer_set.source_of()
        counts = self.transfer_set.counts()
        self.print_to_log_file(f"{format_counts(counts)}; validation: {len(val_keys)} cases (never drawn for "
                               f"training)")
        self.transfer_set_counts = counts
        dataset = TransferDataset(self.transfer_set, self.dataset_class, self.folder_with_segs_from_previous_stage,
                                  self.label_manager.has_ignore_label, tuple([-1] + self.label_manager.all_labels))
        return dataset, val_keys

    def build_target_cache(self, predictions: Optional[str] = None) -> str:
        """What ``tskd_cache_targets`` runs: the cache for this fold's whole transfer set, without training."""
        dataset, _ = self.transfer_dataset()
        self.target_cache_folder = self.prepare_target_cache(dataset, predictions)
        return self.target_cache_folder

    def get_tr_and_val_datasets(self):
        """nnU-Net's hook: training draws from the transfer set, in cached mode with the teacher's targets appended
        as image channels; validation is nnU-Net's own dataset of the fold's validation cases."""
        dataset_tr, val_keys = self.transfer_dataset()
        if self.kd_mode == "cached":
            self.target_cache_folder = self.prepare_target_cache(dataset_tr)
            dataset_tr = CachedTargetDataset(dataset_tr, self.target_cache_folder)
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys,
                                         folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return dataset_tr, dataset_val

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms (a static method there); in cached mode the teacher's target channels ride
        through them as the regression target (target_cache.wrap_transforms)."""
        transforms = super().get_training_transforms(*args, **kwargs)
        return wrap_transforms(transforms, self.num_input_channels) if self.kd_mode == "cached" else transforms

    def get_dataloaders(self):
        """nnU-Net 2.8's ``get_dataloaders`` with one change, for which nnU-Net has no hook: the training loader
        gets ``sampling_probabilities`` (TSKD_UNLABELED_FRACTION, TSKD_SYNTHETIC_FRACTION; None, nnU-Net's uniform
        draw, when both are unset).
        Datasets and transforms come from the hooks above. tests/test_nnunet_hooks.py fails when the installed
        nnU-Net's ``get_dataloaders`` is not the one copied here (documentation/conventions.md says what to do)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded,
                                                        foreground_labels=self.label_manager.foreground_labels,
                                                        regions=regions, ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        synthetic = {i for i in dataset_tr.identifiers if self._source_of.get(i) == SYNTHETIC}
        probs = sampling_probabilities(dataset_tr.identifiers, dataset_tr.unlabeled, self.unlabeled_fraction,
                                       synthetic, self.synthetic_fraction)
        common = dict(label_manager=self.label_manager, pad_sides=None,
                      oversample_foreground_percent=self.oversample_foreground_percent,
                      probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = nnUNetDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size,
                                 sampling_probabilities=probs, transforms=tr_transforms, **common)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, sampling_probabilities=None,
                                  transforms=val_transforms, **common)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            gen_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin_memory=pin,
                                                  wait_time=0.002)
            gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                   pin_memory=pin, wait_time=0.002)
        next(gen_tr), next(gen_val)  # start the workers now, as nnU-Net does
        return gen_tr, gen_val

    # ---- training step: nnU-Net's, with the distillation loss ----------------------------------
    def on_train_start(self):
        if self.uses_teacher_logits() and self.kd_mode == "online":
            self.load_teacher()
        super().on_train_start()

    def uses_teacher_logits(self) -> bool:
        return self.kd_weight > 0

    def on_train_epoch_start(self):
        self._drawn = Counter()
        super().on_train_epoch_start()

    def _build_loss(self):
        return DistillationLoss(super()._build_loss(), self._step_terms)

    def loss_terms(self, output, target, labeled: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                   teacher_features: Optional[torch.Tensor], teacher_probs: Optional[torch.Tensor] = None,
                   valid: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Named loss terms of one batch; their sum is optimised. Pixel KD from the teacher's logits (online)
        or its cached probabilities with their validity mask (cached)."""
        terms = {"sup": masked_supervised_loss(self.loss.supervised, output, target, labeled)}
        if teacher_logits is not None or teacher_probs is not None:
            terms["kd"] = self.kd_weight * self.pixel_kd(output, teacher_logits, teacher_probs, valid)
        if teacher_features is not None and self.kd_heads is not None:
            terms["feat"] = self.feature_kd_weight * self.kd_heads["feature"](self._taps["student"].pop(),
                                                                             teacher_features)
        return terms

    def _step_terms(self, output, target, **batch) -> Dict[str, torch.Tensor]:
        terms = self.loss_terms(output, target, **batch)
        if self.is_ddp:
            heads = list(self.kd_heads.parameters()) if self.kd_heads is not None else []
            terms = through_every_parameter(terms, output, heads)
        return terms

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's ``train_step``, after telling the loss about the batch: which cases are labeled and the
        teacher's targets (cached: split off the image channels; online: the teacher's forward on the same batch,
        under the autocast nnU-Net's step uses)."""
        data = batch["data"].to(self.device, non_blocking=True)
        keys = [str(k) for k in batch["keys"]]
        self._drawn.update(self._source_of.get(k, "?") for k in keys)
        kd: Dict[str, Any] = {"labeled": torch.tensor([k in self._labeled_ids for k in keys], dtype=torch.bool),
                              "teacher_logits": None, "teacher_features": None}
        if self.kd_mode == "cached":
            data, kd["teacher_probs"], kd["valid"] = split_batch(data, self.num_input_channels)
        else:
            with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                kd["teacher_logits"], kd["teacher_features"] = self.teacher_outputs(data)
        self.loss.batch = kd
        try:
            out = super().train_step(dict(batch, data=data))
        finally:
            self.loss.batch = None
        out.update({f"{k}_loss": float(v.cpu()) for k, v in self.loss.last_terms.items()})
        return out

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        parts = {k: np.mean([o[k] for o in train_outputs]) for k in train_outputs[0] if k.endswith("_loss")}
        self.print_to_log_file("loss terms: " + ", ".join(f"{k[:-5]} {v:.4f}" for k, v in parts.items()))
        self.print_to_log_file("cases drawn this epoch: " + ", ".join(f"{s} {self._drawn.get(s, 0)}" for s in SOURCES))

    # ---- checkpoints: student weights in network_weights, KD heads under their own key ----------
    def save_checkpoint(self, filename: str) -> None:
        # the heads go into the temp file before its one rename (base.py): a kill never leaves a checkpoint
        # without them (writing them in a second pass did, for a moment after every save)
        extra = {HEADS_KEY: self.kd_heads.state_dict()} if self.kd_heads is not None else None
        super().save_checkpoint(filename, extra=extra)

    def load_extra_state(self, checkpoint: dict) -> None:
        if self.kd_heads is None:
            return
        if HEADS_KEY in checkpoint:
            self.kd_heads.load_state_dict(checkpoint[HEADS_KEY])
        else:
            self.print_to_log_file(f"WARNING: checkpoint has no {HEADS_KEY!r}; feature-KD projection starts fresh")


class DistillTrainer_T4(DistillTrainer):
    kd_temperature = 4.0


class DistillTrainer_dice(DistillTrainer):
    kd_dice_weight = 1.0


class DistillTrainer_hard(DistillTrainer):
    """Pseudo-labels: every transfer-set case learns the teacher's argmax through cross-entropy (KL at T = 1
    against a one-hot target) + soft Dice, i.e. nnU-Net's own Dice + CE, with the teacher as annotator."""
    kd_temperature = 1.0
    kd_dice_weight = 1.0
    kd_hard_labels = True


class DistillTrainer_feat(DistillTrainer):
    feature_kd = "mse"


class DistillTrainer_cwd(DistillTrainer):
    feature_kd = "cwd"


class DistillTrainer_small(DistillTrainer):
    student_width = 0.5


class DistillTrainer_tiny(DistillTrainer):
    student_width = 0.25


class DistillTrainer_test(DistillTrainer):
    schedule = (1, 2, 1)
    teacher_trainer_name = "ViTLoRATeacherTrainer_test"


class DistillTrainer_demo(DistillTrainer):
    schedule = (4, 25, 5)
    teacher_trainer_name = "LiteMedSAMTeacherTrainer_demo"


STUDENT_PLANS_KEY = "tskd_student"  # plans entry with the ViT student's spec (like teacher.py's tskd_teacher)


class DistillTrainer_vittiny(DistillTrainer):
    """The paper's student: ViT-Tiny with the teacher's input adapter and UNETR decoder, every weight
    trained (no LoRA), from random init or TSKD_STUDENT_WEIGHTS (timm-format, e.g. MAE/MoCo pretraining).

    The spec is recorded in the plans under ``tskd_student`` exactly as the teacher records
    ``tskd_teacher`` (nnU-Net writes the plans to the output folder's plans.json), so
    ``nnUNetv2_predict -tr DistillTrainer_vittiny`` rebuilds the student from plans.json alone.
    Deep supervision, optimizer (AdamW, warm-up + poly) and checkpoints (whole network) follow the
    full-fine-tuning teacher.
    """

    student_backbone: str = "vit_tiny"
    student_decoder_channels: int = 32
    base_lr: float = 5e-4
    adamw_weight_decay: float = 5e-2
    warmup_fraction: float = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr, self.weight_decay = self.base_lr, self.adamw_weight_decay
        self.student_spec = self._resolve_student_spec()
        self.plans_manager.plans[STUDENT_PLANS_KEY] = self.student_spec.to_dict()

    @classmethod
    def student_spec_from_env(cls, patch_size: Sequence[int]) -> TeacherSpec:
        return resolve_vit_student_spec(cls.student_backbone, config.student_weights(), config.student_arch_overrides(),
                                        patch_size, cls.student_decoder_channels)

    def _resolve_student_spec(self) -> TeacherSpec:
        """As the teacher: the spec recorded in this output folder wins unless TSKD_STUDENT_* is set."""
        return resolve_recorded_spec(self.output_folder_base, STUDENT_PLANS_KEY, config.student_env_is_set(),
                                     lambda: self.student_spec_from_env(self.configuration_manager.patch_size),
                                     "ViT student", "TSKD_STUDENT_")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Also nnU-Net's inference entry: reads the spec from the plans (the model folder's plans.json)."""
        d = plans_manager.plans.get(STUDENT_PLANS_KEY)
        spec = TeacherSpec.from_dict(d) if d else cls.student_spec_from_env(configuration_manager.patch_size)
        return build_vit_student(spec, num_input_channels, num_output_channels,
                                 deep_supervision_scales(configuration_manager.pool_op_kernel_sizes),
                                 enable_deep_supervision)

    def initialize(self):
        was_initialized = self.was_initialized
        super().initialize()
        if not was_initialized:  # a --c / --val checkpoint is loaded after this and overrides these weights
            s = self.student_spec
            loaded = load_vit_student_weights(unwrap_network(self.network), s)
            self.print_to_log_file(f"ViT student: {s.backbone} (overrides {s.arch_overrides}) from "
                                   f"{s.checkpoint if loaded else 'RANDOM INIT'} at {s.img_size[0]}x{s.img_size[1]}, "
                                   f"decoder channels {s.decoder_channels}, all weights trained",
                                   also_print_to_console=True)

    def student_optimizer(self):
        optimizer = torch.optim.AdamW(adamw_param_groups(self.network, self.weight_decay), lr=self.initial_lr,
                                      betas=(0.9, 0.999))
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)


class DistillTrainer_vittiny_test(DistillTrainer_vittiny):
    schedule = (1, 2, 1)
    teacher_trainer_name = "ViTLoRATeacherTrainer_test"


class PhasedDistillTrainer(DistillTrainer):
    """Two phases over one schedule: phase 1 (the first ``phase1_fraction`` of the epochs) on the whole
    transfer set, phase 2 on the labeled cases only (the loader is rebuilt at the boundary). The phase
    follows ``current_epoch``, so ``--c`` resumes in the right one. Subclasses say what each phase optimises."""

    phase1_fraction = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._loader_phase: Optional[int] = None

    @property
    def phase1_epochs(self) -> int:
        return int(round(self.num_epochs * self.phase1_fraction))

    def phase(self) -> int:
        return 1 if self.current_epoch < self.phase1_epochs else 2

    def select_training_cases(self, ts: TransferSet) -> TransferSet:
        self._loader_phase = self.phase()
        return ts if self._loader_phase == 1 else ts.labeled_only()

    def on_train_epoch_start(self):
        if self._loader_phase == 1 and self.phase() == 2:  # phase boundary: labeled cases only from now on
            for loader in (self.dataloader_train, self.dataloader_val):
                if isinstance(loader, NonDetMultiThreadedAugmenter):
                    loader._finish()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        super().on_train_epoch_start()


class DistillTrainer_twostage(PhasedDistillTrainer):
    """Vemulapalli et al. (ICML 2024): distil on the whole transfer set (pixel KD only), then fine-tune the
    student on the labeled cases (nnU-Net's supervised loss only); the joint loss is DistillTrainer's."""

    def loss_terms(self, output, target, labeled, teacher_logits, teacher_features, teacher_probs=None,
                   valid=None) -> Dict[str, torch.Tensor]:
        if self.phase() == 1:
            return {"kd": self.kd_weight * self.pixel_kd(output, teacher_logits, teacher_probs, valid)}
        return {"sup": masked_supervised_loss(self.loss.supervised, output, target, labeled)}


class DistillTrainer_twostage_test(DistillTrainer_twostage):
    schedule = (2, 2, 1)
    teacher_trainer_name = "ViTLoRATeacherTrainer_test"


class TaskAgnosticDistillTrainer(PhasedDistillTrainer):
    """The paper's baseline: task-agnostic KD, then supervised fine-tuning, on the same student.

    Phase 1: the student's deepest encoder stage mimics the *un-tuned* foundation backbone's token maps
    (feature KD, MSE through a learned 1x1 projection) on the whole transfer set, labels unused.
    Phase 2: nnU-Net's supervised loss on the labeled cases only. The backbone comes from the same
    TSKD_TEACHER_* settings as the teacher (backbone, weights; LiteMedSAM when TSKD_TEACHER_BACKBONE=litemedsam),
    so baseline and teacher start from the same model.
    """

    kd_weight = 0.0
    feature_kd = "mse"
    feature_source_is_teacher = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.foundation: Optional[nn.Module] = None

    def training_settings(self) -> Dict[str, Any]:
        settings = super().training_settings()  # + the foundation model's variables, as set
        settings.update({name: config.env_str(name) for name in config.TEACHER_ENV_VARS})
        return settings

    def load_foundation(self) -> nn.Module:
        if self.foundation is None:
            from tskd_nnunet.models.teacher_net import build_foundation_encoder
            from tskd_nnunet.trainers.teacher import ViTLoRATeacherTrainer
            spec = ViTLoRATeacherTrainer.spec_from_env(self.configuration_manager.patch_size)
            self.foundation = build_foundation_encoder(spec, self.num_input_channels).to(self.device)
            self.print_to_log_file(f"Foundation model {spec.backbone} from {spec.checkpoint or 'RANDOM INIT'}: "
                                   f"{count_parameters(self.foundation):,} parameters (frozen); phase 1 = epochs "
                                   f"0..{self.phase1_epochs - 1} feature KD, then supervised fine-tuning")
        return self.foundation

    def teacher_outputs(self, data: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.phase() == 2 and self.kd_heads is not None:  # (while building the heads: always features)
            return None, None
        return None, tokens_to_grid(self.load_foundation().encode(data))

    def loss_terms(self, output, target, labeled, teacher_logits, teacher_features, teacher_probs=None,
                   valid=None) -> Dict[str, torch.Tensor]:
        if self.phase() == 1:
            return {"feat": self.feature_kd_weight * self.kd_heads["feature"](self._taps["student"].pop(),
                                                                             teacher_features)}
        return {"sup": masked_supervised_loss(self.loss.supervised, output, target, labeled)}


class TaskAgnosticDistillTrainer_test(TaskAgnosticDistillTrainer):
    schedule = (2, 2, 1)
