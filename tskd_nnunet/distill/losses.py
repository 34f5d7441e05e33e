"""Distillation losses, as plain functions and small modules (no nnU-Net state needed).

Reductions, so numbers are comparable between runs and with the literature:

* ``kd_kl_loss``: per pixel, KL(teacher || student) of the temperature-softened class
  distributions *summed over classes*; then *averaged over pixels and batch*; then multiplied by
  T² (Hinton et al. 2015: keeps the gradient scale independent of T).
* Deep supervision: the student's outputs at each scale get nnU-Net's weights (1/2^i, the lowest
  output 0, normalised to sum 1, as nnU-Net's ``_build_loss``); the teacher's full-resolution
  logits are average-pooled ("area") to each output's shape.
* Feature KD: a learned 1x1 convolution maps the student stage to the teacher's channel count,
  the result is resized to the teacher's token grid, then MSE (mean over all elements) or
  channel-wise distillation (CWD, Shu et al. 2021: per channel, KL of the spatial softmax with
  temperature tau, summed over locations, averaged over channels and batch, times tau²).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
               multilabel: bool = False) -> torch.Tensor:
    """T² · mean over pixels of KL(softmax(t/T) ‖ softmax(s/T)), classes on dim 1.

    ``multilabel=True`` is for nnU-Net's region training (sigmoid outputs): each channel is a
    Bernoulli distribution and the per-pixel KL is summed over channels.
    Computed in float32 whatever the autocast dtype, because KL of near-equal distributions is a
    difference of small numbers.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = float(temperature)
    s = student_logits.float() / t
    te = teacher_logits.float() / t
    if multilabel:
        p_t = torch.sigmoid(te)
        kl = (p_t * (F.logsigmoid(te) - F.logsigmoid(s))
              + (1 - p_t) * (F.logsigmoid(-te) - F.logsigmoid(-s))).sum(1)
    else:
        log_p_t = F.log_softmax(te, dim=1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=1))).sum(1)
    return kl.mean() * (t * t)


def kd_kl_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 2.0,
                          valid: Optional[torch.Tensor] = None, multilabel: bool = False, eps: float = 1e-6
                          ) -> torch.Tensor:
    """As :func:`kd_kl_loss`, from the teacher's probabilities at temperature 1 (the cached targets):
    softened with the same T (softmax(z/T) = normalise(p^(1/T)); for sigmoid outputs, sigmoid(logit(p)/T)),
    and averaged over the pixels where ``valid`` (B x 1 x spatial, weights in [0, 1]) is positive only:
    padding and rotated-in corners carry no loss. A target interpolated against padding is renormalised."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher targets "
                         f"{tuple(teacher_probs.shape)} differ in shape")
    t = float(temperature)
    s = student_logits.float() / t
    p = teacher_probs.float()
    w = torch.ones_like(p[:, :1]) if valid is None else valid.float()
    if multilabel:
        p = (p / w.clamp_min(eps)).clamp(eps, 1 - eps)
        te = (torch.log(p) - torch.log1p(-p)) / t
        p_t = torch.sigmoid(te)
        kl = (p_t * (F.logsigmoid(te) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-te) - F.logsigmoid(-s))).sum(1)
    else:
        log_p = torch.log(p.clamp_min(eps)) / t
        log_p_t = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=1))).sum(1)
    mask = (w[:, 0] > 0.5).float()
    return (kl * mask).sum() / mask.sum().clamp_min(1.0) * (t * t)


def class_probabilities(logits: torch.Tensor, multilabel: bool = False, dim: int = 1) -> torch.Tensor:
    """Float32 probabilities of logits: sigmoid per channel (region outputs) or softmax over ``dim``."""
    return torch.sigmoid(logits.float()) if multilabel else torch.softmax(logits.float(), dim)


def kd_soft_dice_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      valid: Optional[torch.Tensor] = None, multilabel: bool = False, smooth: float = 1e-5
                      ) -> torch.Tensor:
    """1 − mean over foreground classes of the batch soft Dice between the student's probabilities and the
    teacher's (temperature 1), over the pixels where ``valid`` > 0.5. Why: the pixel KL is a cross-entropy,
    dominated by background on images where an organ is ~1% of the pixels, so small organs are learned late;
    nnU-Net's own loss adds Dice for the same reason. Class 0 (background) is left out for softmax outputs, as
    in nnU-Net's Dice (``do_bg=False``); every channel counts for sigmoid (region) outputs."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher targets "
                         f"{tuple(teacher_probs.shape)} differ in shape")
    s = class_probabilities(student_logits, multilabel)
    p = teacher_probs.float()
    if not multilabel:
        s, p = s[:, 1:], p[:, 1:]
    w = torch.ones_like(s[:, :1]) if valid is None else (valid.float() > 0.5).float()
    dims = [0, *range(2, s.ndim)]
    inter = (s * p * w).sum(dims)
    dice = (2 * inter + smooth) / ((s * w).sum(dims) + (p * w).sum(dims) + smooth)
    return 1 - dice.mean()


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """nnU-Net's weights for deep-supervision outputs: 1/2^i, the lowest resolution 0, sum 1."""
    if num_outputs == 1:
        return np.ones(1)
    w = np.array([1 / (2 ** i) for i in range(num_outputs)])
    w[-1] = 0
    return w / w.sum()


def resize_logits_to(logits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Average-pool ("area") logits to a spatial ``shape``; identity when it already matches."""
    if tuple(logits.shape[2:]) == tuple(shape):
        return logits
    return F.interpolate(logits.float(), size=tuple(shape), mode="area")


def harden(teacher_probs: torch.Tensor, multilabel: bool = False, valid: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """The teacher's hard labels as probabilities: one-hot of the argmax (softmax outputs), or each channel
    thresholded at 0.5 (sigmoid / region outputs; a target interpolated against padding, ``valid`` < 1, is
    thresholded at half its validity)."""
    p = teacher_probs.float()
    if multilabel:
        return (p > (0.5 if valid is None else 0.5 * valid.float())).float()
    return F.one_hot(p.argmax(1), p.shape[1]).movedim(-1, 1).float()


class DeepSupervisionKD(nn.Module):
    """Pixel KD on every deep-supervision output of the student, with nnU-Net's weights."""

    def __init__(self, temperature: float = 2.0, multilabel: bool = False, dice_weight: float = 0.0,
                 hard: bool = False):
        super().__init__()
        self.temperature = temperature
        self.multilabel = multilabel
        self.dice_weight = dice_weight  # > 0: add kd_soft_dice_loss against the teacher's probabilities
        self.hard = hard  # the teacher's argmax instead of its probabilities (T = 1: cross-entropy, + Dice)

    def forward(self, student_outputs: Outputs, teacher_logits: Optional[torch.Tensor] = None,
                teacher_probs: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher logits (online KD) or cached probabilities + validity (cached KD), at full resolution;
        both are area-pooled to each output's shape (hard labels: then the argmax at that shape)."""
        outputs = list(student_outputs) if isinstance(student_outputs, (list, tuple)) else [student_outputs]
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if w == 0:
                continue
            logits, probs, v = None, None, None
            if teacher_probs is not None:
                v = resize_logits_to(valid, out.shape[2:]) if valid is not None else None
                probs = resize_logits_to(teacher_probs, out.shape[2:])
            else:
                logits = resize_logits_to(teacher_logits, out.shape[2:])
                if self.dice_weight or self.hard:  # online: probabilities only when a term needs them (hot path)
                    probs = class_probabilities(logits, self.multilabel)
            if self.hard:
                probs = harden(probs, self.multilabel, v)
            if logits is None or self.hard:
                loss = kd_kl_loss_from_probs(out, probs, self.temperature, v, self.multilabel)
            else:
                loss = kd_kl_loss(out, logits, self.temperature, self.multilabel)
            if self.dice_weight:
                loss = loss + self.dice_weight * kd_soft_dice_loss(out, probs, v, self.multilabel)
            total = total + float(w) * loss
        return total


def zero_through(outputs: Outputs) -> torch.Tensor:
    """0, but a function of every output (every deep-supervision scale): keeps the graph and gives each
    parameter behind the outputs a (zero) gradient, which nnU-Net's DDP (``find_unused_parameters`` off) needs."""
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(o.sum() for o in outputs) * 0.0


def through_every_parameter(terms: Dict[str, torch.Tensor], outputs: Outputs,
                            parameters: Sequence[torch.Tensor] = ()) -> Dict[str, torch.Tensor]:
    """``terms`` with 0 added to the first one through every output and every one of ``parameters``: under DDP
    (``find_unused_parameters`` off, as nnU-Net builds it) every parameter needs a gradient on every step, also
    when a phase leaves the decoder, a deep-supervision output or the KD heads out of the loss."""
    first = next(iter(terms))
    return dict(terms, **{first: terms[first] + zero_through(outputs) + sum(p.sum() for p in parameters) * 0.0})


class DistillationLoss(nn.Module):
    """The trainer's ``self.loss``: nnU-Net's own loss (``supervised``) outside a training step (validation),
    and inside one the sum of ``terms(output, target, **batch)``, where ``batch`` is what ``train_step`` set for
    the batch at hand (which cases are labeled, the teacher's targets). So nnU-Net's ``train_step`` runs
    unchanged: ``self.loss(output, target)`` is the whole distillation loss. ``last_terms`` keeps the named
    terms of the last step (detached) for the log."""

    def __init__(self, supervised: nn.Module, terms: Callable[..., Dict[str, torch.Tensor]]):
        super().__init__()
        self.supervised = supervised
        self.terms = terms
        self.batch: Optional[dict] = None
        self.last_terms: Dict[str, torch.Tensor] = {}

    def forward(self, output: Outputs, target: Outputs) -> torch.Tensor:
        if self.batch is None:
            return self.supervised(output, target)
        terms = self.terms(output, target, **self.batch)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return sum(terms.values())


def masked_supervised_loss(loss: Callable[[Outputs, Outputs], torch.Tensor], outputs: Outputs,
                           targets: Outputs, labeled: torch.Tensor) -> torch.Tensor:
    """nnU-Net's supervised loss on the labeled samples of a batch only; 0 when none is labeled.

    ``outputs``/``targets`` are tensors or deep-supervision lists with the batch on dim 0;
    ``labeled`` is a bool vector over the batch. Unlabeled samples are removed before the loss, so
    their (all-zero or ignored) segmentations can never contribute, not even through batch Dice.
    """
    labeled = labeled.to(torch.bool)
    first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    if not bool(labeled.any()):
        return zero_through(outputs)
    if bool(labeled.all()):
        return loss(outputs, targets)
    idx = labeled.nonzero(as_tuple=True)[0].to(first.device)

    def pick(x: Outputs) -> Outputs:
        if isinstance(x, (list, tuple)):
            return [i.index_select(0, idx.to(i.device)) for i in x]
        return x.index_select(0, idx.to(x.device))

    return loss(pick(outputs), pick(targets))


def tokens_to_grid(features: Union[torch.Tensor, Sequence[torch.Tensor]], channels_last: Optional[bool] = None
                   ) -> torch.Tensor:
    """Bring a feature map to (B, C, *grid).

    Accepts (B, C, *grid) maps, timm/SAM style (B, H, W, C) maps (``channels_last=True``), and ViT
    token sequences (B, N, C), where leading class/register tokens are dropped so that the rest is
    a square grid. A list or tuple (e.g. all encoder stages) gives its last element.
    """
    if isinstance(features, (list, tuple)):
        features = features[-1]
    if features.ndim == 3:
        b, n, c = features.shape
        side = int(np.floor(np.sqrt(n)))
        prefix = n - side * side
        return features[:, prefix:].transpose(1, 2).reshape(b, c, side, side)
    if channels_last:
        return features.movedim(-1, 1)
    return features


def channel_wise_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """CWD: per channel, KL(softmax_spatial(t/tau) ‖ softmax_spatial(s/tau)) · tau², mean over B·C."""
    b, c = teacher.shape[:2]
    s = student.float().reshape(b, c, -1) / tau
    t = teacher.float().reshape(b, c, -1) / tau
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum(-1)
    return kl.mean() * (tau * tau)


class FeatureKD(nn.Module):
    """Student stage → teacher features: learned 1x1 projection, resize to the teacher grid, MSE or CWD.

    The projection is training-only: the trainer keeps it outside the student network, so the
    student checkpoint and inference never see it.
    """

    def __init__(self, student_channels: int, teacher_channels: int, spatial_dims: int = 2, mode: str = "mse",
                 cwd_tau: float = 4.0):
        super().__init__()
        if mode not in ("mse", "cwd"):
            raise ValueError(f"feature KD mode must be 'mse' or 'cwd', got {mode!r}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(student_channels, teacher_channels, kernel_size=1)
        self.mode = mode
        self.cwd_tau = cwd_tau

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        projected = self.proj(student_features)
        if projected.shape[2:] != teacher_features.shape[2:]:
            mode = "bilinear" if projected.ndim == 4 else "trilinear"
            projected = F.interpolate(projected, size=tuple(teacher_features.shape[2:]), mode=mode,
                                      align_corners=False)
        if self.mode == "cwd":
            return channel_wise_distillation(projected, teacher_features, self.cwd_tau)
        return F.mse_loss(projected.float(), teacher_features.float())


class FeatureTap:
    """Keeps what one submodule produced (``take="output"``) or received as its ``input_index``-th
    positional argument (``take="input"``) in the last forward pass (a hook), so feature KD needs no
    second forward and no change to the network's own ``forward``."""

    def __init__(self, network: nn.Module, module_name: str, take: str = "output", input_index: int = 0):
        try:
            module = network.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"{type(network).__name__} has no submodule {module_name!r} to take features from") \
                from None
        self.module_name = module_name
        self.output: Optional[torch.Tensor] = None
        if take == "output":
            self._handle = module.register_forward_hook(lambda _m, _i, out: self._keep(out))
        else:
            self._handle = module.register_forward_pre_hook(lambda _m, args: self._keep(args[input_index]))

    def _keep(self, value) -> None:
        self.output = value

    def pop(self) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError(f"no features captured from {self.module_name!r}: run a forward pass first")
        out, self.output = self.output, None
        return out

    def remove(self) -> None:
        self._handle.remove()


def feature_tap_for(network: nn.Module) -> FeatureTap:
    """Where to take features from a network:

    * nnU-Net's U-Nets (``encoder.stages``): the deepest encoder stage's output;
    * the ViT teacher (tskd_nnunet.models.teacher_net.ViTSegNet: ``encode`` + ``decoder``): the token
      maps its decoder receives (2nd argument, a list; the deepest map is used), i.e. the backbone's
      features at no extra cost.
    """
    encoder = getattr(network, "encoder", None)
    stages = getattr(encoder, "stages", None)
    if stages is not None and len(stages) > 0:
        return FeatureTap(network, f"encoder.stages.{len(stages) - 1}")
    if callable(getattr(network, "encode", None)) and isinstance(getattr(network, "decoder", None), nn.Module):
        return FeatureTap(network, "decoder", take="input", input_index=1)
    raise ValueError(f"cannot tell which module of {type(network).__name__} gives features for feature KD")
