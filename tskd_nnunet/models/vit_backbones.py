"""Vision-transformer backbones by name, loaded from a local checkpoint file (nothing is downloaded).

Registry (timm-style names):

| name | family | checkpoint format |
|---|---|---|
| ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h`` | SAM image encoder | official Segment Anything ``.pth`` (``image_encoder.*``) |
| ``medsam_vit_b`` | SAM image encoder | MedSAM ``.pth`` (same format as SAM) |
| ``vit_tiny`` / ``vit_small`` / ``vit_base`` | timm ``vit_*_patch16_224`` | plain timm state_dict (optionally under ``state_dict``/``model``) |

``create_backbone`` returns a :class:`ViTBackbone` whose ``forward_features_multi`` gives the tokens
of several blocks as B x C x h x w maps. The model is built at the working image size; the
checkpoint's absolute position embedding (and, for SAM, the relative position tables of the
global-attention blocks) are resampled once at load, so a SAM encoder trained at 1024^2 runs at
256^2 with static shapes. Reduced models (tests, other pretraining runs) use the same path with
``overrides`` (e.g. ``{"depth": 2, "embed_dim": 64, "num_heads": 2}``); a checkpoint whose shapes do
not match the requested model is a :class:`TeacherCheckpointError` saying which size they fit.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from tskd_nnunet import atomic_io

SizeLike = Union[int, Sequence[int]]


class TeacherCheckpointError(RuntimeError):
    """A backbone checkpoint is missing, unreadable, changed, of the wrong kind or model size; or a teacher's
    spec, channels or saved weights do not fit (teacher_net.py). One-line message naming the file and the fix."""


class RandomTeacherWarning(UserWarning):
    """A backbone was built without pretrained weights: it is not a foundation model."""


@dataclass(frozen=True)
class BackboneDef:
    name: str
    family: str  # "sam" | "timm"
    timm_name: str
    arch: Dict[str, object]
    checkpoint_hint: str


_SAM_B = dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0, window_size=14,
              global_attn_indexes=[2, 5, 8, 11])
REGISTRY: Dict[str, BackboneDef] = {d.name: d for d in [
    BackboneDef("sam_vit_b", "sam", "samvit_base_patch16", _SAM_B, "sam_vit_b_01ec64.pth"),
    BackboneDef("sam_vit_l", "sam", "samvit_large_patch16",
                dict(_SAM_B, embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
                "sam_vit_l_0b3195.pth"),
    BackboneDef("sam_vit_h", "sam", "samvit_huge_patch16",
                dict(_SAM_B, embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
                "sam_vit_h_4b8939.pth"),
    BackboneDef("medsam_vit_b", "sam", "samvit_base_patch16", _SAM_B, "medsam_vit_b.pth"),
    BackboneDef("vit_tiny", "timm", "vit_tiny_patch16_224",
                dict(embed_dim=192, depth=12, num_heads=3, patch_size=16, mlp_ratio=4.0), "vit_tiny_patch16_224 state_dict"),
    BackboneDef("vit_small", "timm", "vit_small_patch16_224",
                dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, mlp_ratio=4.0), "vit_small_patch16_224 state_dict"),
    BackboneDef("vit_base", "timm", "vit_base_patch16_224",
                dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0), "vit_base_patch16_224 state_dict"),
]}
_OVERRIDABLE = {"embed_dim", "depth", "num_heads", "mlp_ratio", "window_size", "global_attn_indexes", "in_chans",
                "feature_blocks"}
# Keys a checkpoint may carry that the encoder does not use (classifier heads, MAE decoders, SAM neck).
_IGNORED_PREFIXES = ("head.", "fc_norm.", "decoder", "mask_token", "neck.")


def list_backbones() -> List[str]:
    return sorted(list(REGISTRY) + ["litemedsam"])  # litemedsam: tskd_nnunet/models/litemedsam.py


def _size2(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (H, W), got {size}")
    return size  # type: ignore[return-value]


def default_feature_blocks(depth: int, num_maps: int) -> List[int]:
    """Ends of ``num_maps`` equal stretches of the network: (2, 5, 8, 11) for 12 blocks and 4 maps,
    which are SAM's global-attention blocks (and UNETR's z3/z6/z9/z12)."""
    return [max(0, math.ceil(depth * (i + 1) / num_maps) - 1) for i in range(num_maps)]


# ---------------------------------------------------------------------------------------------- files
_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def sha256_of(path: str) -> str:
    """sha256 hex digest of a file (cached per path, size and mtime within a process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = atomic_io.sha256_of(path)
    return _SHA_CACHE[key]


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and a
    ``module.`` prefix. Errors name the file and the fix."""
    if not os.path.isfile(path):
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} does not exist. Fix: point TSKD_TEACHER_WEIGHTS (or checkpoint=) at the "
            f"backbone's weights file, e.g. sam_vit_b_01ec64.pth.")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the same thing to the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            raise TeacherCheckpointError(
                f"Teacher checkpoint {path} holds Python objects besides tensors. Fix: re-save only its state dict, "
                f"e.g. torch.save(torch.load(path, weights_only=False)['model'], path)") from None
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} is not a readable PyTorch checkpoint ({reason}). Fix: re-download or "
            f"re-copy the file; it may be truncated or of another format.") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} does not contain a state dict of tensors. Fix: save the ViT's "
            f"model.state_dict() (optionally under 'state_dict' or 'model').")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def checkpoint_format(state_dict: Dict[str, torch.Tensor]) -> str:
    """'sam' (official SAM/MedSAM keys), 'samvit' (timm's converted SAM), 'timm' (timm ViT) or 'unknown'."""
    if "image_encoder.patch_embed.proj.weight" in state_dict:
        return "sam"
    if "patch_embed.proj.weight" in state_dict:
        if "blocks.0.attn.rel_pos_h" in state_dict or state_dict.get("pos_embed", torch.zeros(1, 1, 1)).dim() == 4:
            return "samvit"
        return "timm"
    return "unknown"


def convert_sam_checkpoint(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """SAM ``image_encoder.*`` keys -> timm VisionTransformerSAM keys (timm's own filter: drops the
    prompt encoder and mask decoder, renames ``mlp.lin`` -> ``mlp.fc``)."""
    from timm.models.vision_transformer_sam import checkpoint_filter_fn
    return checkpoint_filter_fn(state_dict, None)


@dataclass
class CheckpointShapes:
    """What a (timm-keyed) ViT state dict says about its architecture."""
    embed_dim: int
    depth: int
    in_chans: int
    patch_size: int
    mlp_hidden: int
    head_dim: Optional[int] = None  # SAM only (from the relative position tables)
    global_blocks: List[int] = field(default_factory=list)  # SAM: blocks whose rel-pos table is not windowed
    window_size: Optional[int] = None

    def describe(self) -> str:
        s = f"embed_dim={self.embed_dim}, depth={self.depth}, patch_size={self.patch_size}, in_chans={self.in_chans}"
        if self.head_dim:
            s += f", num_heads={self.embed_dim // self.head_dim}"
        return s


def checkpoint_shapes(sd: Dict[str, torch.Tensor], family: str) -> CheckpointShapes:
    w = sd["patch_embed.proj.weight"]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    shapes = CheckpointShapes(embed_dim=int(w.shape[0]), depth=depth, in_chans=int(w.shape[1]),
                              patch_size=int(w.shape[-1]), mlp_hidden=int(fc1.shape[0]) if fc1 is not None else -1)
    if family == "sam" and "blocks.0.attn.rel_pos_h" in sd:
        lengths = [int(sd[f"blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
        shapes.head_dim = int(sd["blocks.0.attn.rel_pos_h"].shape[1])
        grid_len = 2 * int(sd["pos_embed"].shape[1]) - 1 if "pos_embed" in sd else max(lengths)
        shapes.global_blocks = [i for i, n in enumerate(lengths) if n == grid_len]
        windowed = [n for n in lengths if n != grid_len]
        shapes.window_size = (windowed[0] + 1) // 2 if windowed else None
    return shapes


# ------------------------------------------------------------------------------------------ architecture
def resolve_arch(name: str, overrides: Optional[dict] = None) -> Tuple[BackboneDef, Dict[str, object]]:
    """The registry entry and its architecture with ``overrides`` applied (unknown keys are an error)."""
    if name not in REGISTRY:
        raise TeacherCheckpointError(
            f"Unknown teacher backbone {name!r}. Fix: choose one of {', '.join(list_backbones())} "
            f"(TSKD_TEACHER_BACKBONE).")
    bdef = REGISTRY[name]
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - _OVERRIDABLE)
    if bad:
        raise TeacherCheckpointError(
            f"Architecture overrides {bad} are not supported. Fix: use only {sorted(_OVERRIDABLE)} in "
            f"TSKD_TEACHER_ARCH_OVERRIDES.")
    arch = dict(bdef.arch)
    if bdef.family == "sam" and "depth" in overrides and "global_attn_indexes" not in overrides:
        arch["global_attn_indexes"] = sorted(set(default_feature_blocks(int(overrides["depth"]), 4)))
    arch.update(overrides)
    arch.setdefault("in_chans", 3)
    if bdef.family != "sam":
        arch.pop("window_size", None)
        arch.pop("global_attn_indexes", None)
    return bdef, arch


def _looks_like(shapes: CheckpointShapes, family: str) -> str:
    same = [n for n, d in REGISTRY.items() if d.family == family and d.arch["embed_dim"] == shapes.embed_dim
            and d.arch["depth"] == shapes.depth]
    if same:
        return f"its shapes look like {' / '.join(same)}"
    return "no registered model has these shapes"


def check_model_size(name: str, arch: Dict[str, object], shapes: CheckpointShapes, path: str,
                     requested_in_chans: Optional[int] = None) -> None:
    """Raise TeacherCheckpointError when the checkpoint's shapes are not those of ``name`` (+ overrides)."""
    expected = CheckpointShapes(embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                                in_chans=shapes.in_chans, patch_size=int(arch["patch_size"]),
                                mlp_hidden=int(int(arch["embed_dim"]) * float(arch["mlp_ratio"])))
    problems = []
    for attr in ("embed_dim", "depth", "patch_size"):
        if getattr(shapes, attr) != getattr(expected, attr):
            problems.append(f"{attr} {getattr(shapes, attr)} (expected {getattr(expected, attr)})")
    if shapes.mlp_hidden not in (-1, expected.mlp_hidden) and not problems:
        problems.append(f"mlp hidden size {shapes.mlp_hidden} (expected {expected.mlp_hidden})")
    if requested_in_chans is not None and requested_in_chans != shapes.in_chans:
        problems.append(f"in_chans {shapes.in_chans} (expected {requested_in_chans})")
    if shapes.head_dim and not problems and int(arch["embed_dim"]) // int(arch["num_heads"]) != shapes.head_dim:
        problems.append(f"num_heads {shapes.embed_dim // shapes.head_dim} (expected {arch['num_heads']})")
    if shapes.head_dim and not problems:
        if shapes.global_blocks != sorted(int(i) for i in arch["global_attn_indexes"]):  # type: ignore[union-attr]
            problems.append(f"global-attention blocks {shapes.global_blocks} (expected {arch['global_attn_indexes']})")
        elif shapes.window_size is not None and shapes.window_size != int(arch["window_size"]):
            problems.append(f"window_size {shapes.window_size} (expected {arch['window_size']})")
    if problems:
        family = REGISTRY[name].family
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} does not fit backbone {name!r}: {'; '.join(problems)}; "
            f"{_looks_like(shapes, family)} ({shapes.describe()}). Fix: set TSKD_TEACHER_BACKBONE to the matching "
            f"model, or for a reduced model TSKD_TEACHER_ARCH_OVERRIDES, e.g. "
            f"'{{\"embed_dim\": {shapes.embed_dim}, \"depth\": {shapes.depth}, \"num_heads\": "
            f"{shapes.embed_dim // shapes.head_dim if shapes.head_dim else 'N'}}}'.")


def inspect_checkpoint(name: str, path: str, overrides: Optional[dict] = None
                       ) -> Tuple[Dict[str, torch.Tensor], CheckpointShapes]:
    """Read ``path`` for backbone ``name``: format check, key conversion, size check.
    Returns the timm-keyed state dict and its shapes."""
    bdef, arch = resolve_arch(name, overrides)
    sd = read_checkpoint(path)
    fmt = checkpoint_format(sd)
    if bdef.family == "sam":
        if fmt == "sam":
            sd = convert_sam_checkpoint(sd)
        elif fmt != "samvit":
            raise TeacherCheckpointError(
                f"Teacher checkpoint {path} is not a Segment Anything checkpoint (no image_encoder.* keys; format "
                f"{fmt!r}). Fix: use {bdef.checkpoint_hint} for {name}, or a vit_* backbone name for a timm ViT file.")
    elif fmt != "timm":
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} is not a timm ViT state dict (format {fmt!r}). Fix: for SAM/MedSAM files "
            f"use TSKD_TEACHER_BACKBONE=sam_vit_b/l/h or medsam_vit_b; for {name} save a timm "
            f"{bdef.timm_name} state_dict.")
    shapes = checkpoint_shapes(sd, bdef.family)
    requested = (overrides or {}).get("in_chans")
    check_model_size(name, arch, shapes, path, int(requested) if requested is not None else None)
    return sd, shapes


# ------------------------------------------------------------------------------------------- the module
class ViTBackbone(nn.Module):
    """A timm ViT (plain or SAM) and which blocks' tokens to return as feature maps."""

    def __init__(self, model: nn.Module, family: str, name: str, feature_blocks: Sequence[int],
                 img_size: Tuple[int, int], patch_size: int, embed_dim: int, in_chans: int):
        super().__init__()
        self.model = model
        self.family = family
        self.name = name
        self.feature_blocks = [int(b) for b in feature_blocks]
        self._take = sorted(set(self.feature_blocks))
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.in_chans = in_chans

    def forward_features_multi(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: B x in_chans x H x W at the working size -> one B x embed_dim x H/p x W/p map per
        entry of ``feature_blocks`` (raw block tokens for SAM; final-norm'ed tokens for timm ViTs)."""
        maps = self.model.forward_intermediates(x, indices=self._take, norm=self.family == "timm",
                                                intermediates_only=True, output_fmt="NCHW")
        by_block = dict(zip(self._take, maps))
        return [by_block[b] for b in self.feature_blocks]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_features_multi(x)


def _resample_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    if rel_pos.shape[0] == length:
        return rel_pos
    r = F.interpolate(rel_pos.float().t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return r[0].t().to(rel_pos.dtype)


def _adapt_sam_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resample the absolute position embedding and the global blocks' relative position tables to
    the model's grid (SAM is trained at 1024^2 = 64x64 tokens)."""
    from timm.layers import resample_abs_pos_embed_nhwc
    out = {}
    own = model.state_dict()
    for k, v in sd.items():
        if k.startswith(_IGNORED_PREFIXES):
            continue
        if k == "pos_embed" and k in own and v.shape != own[k].shape:
            v = resample_abs_pos_embed_nhwc(v, list(own[k].shape[1:3]))
        elif ".attn.rel_pos_" in k and k in own and v.shape != own[k].shape:
            v = _resample_rel_pos(v, own[k].shape[0])
        out[k] = v
    return out


def _load_strictly(model: nn.Module, sd: Dict[str, torch.Tensor], path: str, name: str) -> None:
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatch left after the size check: report it in one line
        first = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:1]
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} does not fit backbone {name!r}: {first[0] if first else e}. Fix: choose the "
            f"matching TSKD_TEACHER_BACKBONE / TSKD_TEACHER_ARCH_OVERRIDES.") from None
    missing = [k for k in result.missing_keys if not k.startswith(_IGNORED_PREFIXES) and not k.startswith("norm.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(_IGNORED_PREFIXES)]
    if missing or unexpected:
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} does not match backbone {name!r}: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}. Fix: use a checkpoint of that model (see documentation/teacher.md).")


def create_backbone(name: str, checkpoint: Optional[str], img_size: SizeLike, allow_random_init: bool = False,
                    overrides: Optional[dict] = None) -> ViTBackbone:
    """Build backbone ``name`` at working size ``img_size`` and load ``checkpoint`` (a SAM/MedSAM
    ``.pth`` or a timm ViT state dict). ``checkpoint=None`` is refused unless ``allow_random_init``
    (then a RandomTeacherWarning). ``overrides`` changes the architecture (depth, embed_dim,
    num_heads, mlp_ratio, window_size, global_attn_indexes, in_chans, feature_blocks)."""
    import timm

    bdef, arch = resolve_arch(name, overrides)
    img_hw = _size2(img_size)
    patch = int(arch["patch_size"])
    if img_hw[0] % patch or img_hw[1] % patch:
        raise ValueError(f"img_size {img_hw} must be a multiple of the patch size {patch}")
    sd = None
    if checkpoint is None:
        if not allow_random_init:
            raise TeacherCheckpointError(
                f"No weights given for teacher backbone {name!r}. Fix: export TSKD_TEACHER_WEIGHTS=/path/to/"
                f"{bdef.checkpoint_hint} (or pass checkpoint=); only for smoke tests set TSKD_ALLOW_RANDOM_TEACHER=1.")
        warnings.warn(f"Teacher backbone {name!r} is RANDOMLY INITIALISED: this is not a foundation model and "
                      f"its results say nothing about distilling one.", RandomTeacherWarning, stacklevel=2)
        in_chans = int(arch["in_chans"])
    else:
        sd, shapes = inspect_checkpoint(name, checkpoint, overrides)
        in_chans = shapes.in_chans
    kwargs = dict(img_size=img_hw, in_chans=in_chans, num_classes=0, patch_size=patch,
                  embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]), num_heads=int(arch["num_heads"]),
                  mlp_ratio=float(arch["mlp_ratio"]))
    if bdef.family == "sam":
        kwargs.update(window_size=int(arch["window_size"]),
                      global_attn_indexes=[int(i) for i in arch["global_attn_indexes"]])  # type: ignore[union-attr]
    model = timm.create_model(bdef.timm_name, pretrained=False, **kwargs)
    if sd is not None:
        if bdef.family == "sam":
            sd = _adapt_sam_state_dict(sd, model)
        else:
            from timm.models.vision_transformer import checkpoint_filter_fn
            sd = checkpoint_filter_fn({k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIXES)}, model)
        _load_strictly(model, sd, checkpoint, name)  # type: ignore[arg-type]
    depth = int(arch["depth"])
    num_maps = int(round(math.log2(patch)))
    blocks = [int(b) for b in arch.get("feature_blocks") or default_feature_blocks(depth, num_maps)]  # type: ignore[union-attr]
    if len(blocks) != num_maps or not all(0 <= b < depth for b in blocks):
        raise TeacherCheckpointError(
            f"feature_blocks {blocks} must name {num_maps} blocks in 0..{depth - 1}. Fix: correct "
            f"TSKD_TEACHER_ARCH_OVERRIDES.")
    # drop what the encoder never uses (SAM neck, classifier head, blocks after the last tapped one)
    model.prune_intermediate_layers(sorted(set(blocks)), prune_norm=bdef.family == "sam", prune_head=True)
    return ViTBackbone(model, bdef.family, name, blocks, img_hw, patch, int(arch["embed_dim"]), in_chans)
