"""Small helpers shared by the trainers, pretraining and the benchmarks."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from torch._dynamo import OptimizedModule

    mod = network.module if hasattr(network, "module") and not isinstance(network, OptimizedModule) else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


def attach_training_module(network: nn.Module, name: str, module: nn.Module) -> None:
    """Make ``module`` the submodule ``name`` of ``network`` for training only (e.g. a feature-KD projection).

    Its parameters are then the network's: nnU-Net's DDP wrapper broadcasts and all-reduces them with the rest,
    and nnU-Net's gradient clipping sees them. The network's ``state_dict`` leaves it out and ``load_state_dict``
    keeps its current values, so checkpoints (``network_weights``), ``nnUNetv2_predict`` and export see the plain
    network. Save and load ``module.state_dict()`` yourself."""
    network.add_module(name, module)
    key = name + "."

    def leave_out(_network, state_dict, prefix, _metadata):
        for k in [k for k in state_dict if k.startswith(prefix + key)]:
            del state_dict[k]

    def keep_current(_network, state_dict, prefix, *_):
        for k, v in module.state_dict().items():
            state_dict.setdefault(prefix + key + k, v)

    network.register_state_dict_post_hook(leave_out)
    network.register_load_state_dict_pre_hook(keep_current)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: Optional["torch.amp.GradScaler"] = None,
                      clip_params: Optional[Iterable[torch.Tensor]] = None, max_norm: float = 12.0) -> None:
    """``loss.backward()`` and ``optimizer.step()`` in the order of nnU-Net's ``train_step``: through the AMP
    ``scaler`` when given (unscaled before clipping), clipping the gradient norm of ``clip_params`` when given."""
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_params is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_params is not None:
            torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
        optimizer.step()
