"""The pretraining loop shared by MAE, MoCo v3 and their CNN variants.

An *objective* is an ``nn.Module`` whose ``forward(batch)`` returns the scalar loss, with
``set_progress(fraction)`` (called before each step: momentum schedules) and ``export(meta)``
(the object written to the output file). The loop owns the rest: AdamW with warm-up + cosine LR,
autocast + GradScaler on CUDA (as nnU-Net's train_step), a tqdm bar, an atomic resume state every
``save_every`` steps (``<out>.state.pth``), and the loss curve (``<out stem>_loss.csv`` / ``.png``).

Batches are drawn in this process with a generator seeded by (seed, step), so a resumed run sees
the same images it would have seen uninterrupted.
"""
from __future__ import annotations

import csv
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tskd_nnunet.models.util import backward_and_step
from tskd_nnunet.pretrain.corpus import PretrainCorpus, PretrainError
from tskd_nnunet.atomic_io import atomic_path, atomic_torch_save as save_atomic  # noqa: E402


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    save_every: int = 100
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    signature: Dict[str, Any] = field(default_factory=dict)  # what must match to resume (objective, arch, ...)


def companion_paths(output: str) -> Dict[str, str]:
    stem = output[:-4] if output.endswith(".pth") else output
    return {"state": stem + ".state.pth", "csv": stem + "_loss.csv", "png": stem + "_loss.png"}


def lr_at(step: int, total: int, base_lr: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms, tokens and position embeddings (all 1-D or token-shaped)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token")) or "mask_tokens" in name
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def write_curve(history: List[Dict[str, float]], paths: Dict[str, str], title: str) -> None:
    """Loss curve as CSV and PNG beside the output (both replaced atomically)."""
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        w.writeheader()
        w.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    if len(losses) >= 2 * k and k > 1:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def run_pretraining(objective: nn.Module, corpus: PretrainCorpus, output: str, cfg: LoopConfig,
                    device: torch.device, meta: Optional[Dict[str, Any]] = None) -> List[Dict[str, float]]:
    """Train ``objective`` on batches of ``corpus`` for ``cfg.steps`` steps and write ``output``.

    Returns the loss history (one dict per step: step, loss, lr)."""
    paths = companion_paths(output)
    if not cfg.resume and not cfg.overwrite:
        for p in (output, paths["state"]):
            if os.path.exists(p):
                raise PretrainError(f"{p} exists from an earlier run. Fix: pass --resume to continue it, "
                                    f"--overwrite to start over, or choose another -o")
    torch.manual_seed(cfg.seed)
    objective.to(device)
    optimizer = torch.optim.AdamW(param_groups(objective, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    history: List[Dict[str, float]] = []
    start = 0
    if cfg.resume and os.path.isfile(paths["state"]):
        try:
            state = torch.load(paths["state"], map_location=device, weights_only=False)
        except Exception as e:  # truncated/foreign file: say which and how to recover
            raise PretrainError(f"cannot read resume state {paths['state']} ({type(e).__name__}). Fix: delete it and "
                                f"start over with --overwrite") from None
        if state.get("signature") != cfg.signature:
            raise PretrainError(f"{paths['state']} was written by a different run ({state.get('signature')}). "
                                f"Fix: rerun with the same settings, or use --overwrite / another -o")
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, history = int(state["step"]), list(state["history"])
        print(f"Resuming from {paths['state']} at step {start}/{cfg.steps}")
    elif cfg.resume:
        print(f"No resume state at {paths['state']}: starting from step 0")

    def checkpoint(step: int) -> None:
        save_atomic({"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
                     "history": history, "signature": cfg.signature}, paths["state"])
        if history:
            write_curve(history, paths, f"{cfg.signature.get('objective', 'pretraining')} loss")

    objective.train()
    autocast = (lambda: torch.autocast(device.type, enabled=True)) if device.type == "cuda" else nullcontext
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
               desc=str(cfg.signature.get("objective", "pretrain")), dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_fraction)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = corpus.batch(cfg.batch_size, np.random.default_rng([cfg.seed, step])).to(device, non_blocking=True)
        objective.set_progress(step / max(1, cfg.steps))
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = objective(batch)
        if not torch.isfinite(loss):
            raise PretrainError(f"loss became {loss.item()} at step {step}. Fix: lower --lr (now {cfg.lr}) and "
                                f"resume from {paths['state']} with --resume")
        backward_and_step(loss, optimizer, scaler)
        history.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    checkpoint(cfg.steps)
    meta = dict(meta or {}, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                final_loss=history[-1]["loss"] if history else None)
    save_atomic(objective.export(meta), output)
    print(f"Wrote {output} (loss curve: {paths['png']}; resume state: {paths['state']})")
    return history
