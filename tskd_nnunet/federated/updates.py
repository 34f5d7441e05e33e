"""What a site sends and what the server does with it: the trainable tensors of a teacher, checked and averaged.

*Trainable state* of a network = the entries of its ``state_dict()`` that training can change: parameters with
``requires_grad`` (LoRA adapters, input adapter, head) and the floating-point buffers of modules that own such
parameters (a head's normalisation statistics). The frozen foundation weights never travel: every site rebuilds
them from the same checkpoint file (its sha256 is part of the teacher spec in the shared plans).

The server's rule for a site update ``w_k`` against the global weights ``w_g`` of the round it started from
(:func:`check_update`, documentation/federated.md "Decision record"):

1. the key set equals the global key set (no missing, no extra tensor);
2. each tensor has the global tensor's shape and dtype;
3. every value is finite (no NaN/Inf);
4. ``||w_k - w_g||_2 <= max_update_ratio * max(||w_g||_2, 1)`` over all tensors together (default ratio 1.0):
   no round of honest local training moves the weights by more than their own size; a scaled or exploded
   update does.
5. the weight (labeled cases) is a positive integer.

Accepted updates are averaged weighted by their sites' labeled cases (:func:`weighted_mean`), in float64, and
cast back to each tensor's dtype.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

State = Dict[str, torch.Tensor]

DEFAULT_MAX_UPDATE_RATIO = 1.0


def trainable_keys(network: nn.Module) -> List[str]:
    """Names (as in ``network.state_dict()``) of the trainable parameters and of the floating buffers of the
    modules that own trainable parameters, in state-dict order."""
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    owners = {n.rpartition(".")[0] for n in trainable}
    buffers = {n for n, b in network.named_buffers() if b.is_floating_point() and n.rpartition(".")[0] in owners}
    return [k for k in network.state_dict() if k in trainable or k in buffers]


def trainable_state(network: nn.Module) -> State:
    """The trainable state of ``network`` (detached CPU copies)."""
    sd = network.state_dict()
    return {k: sd[k].detach().cpu().clone() for k in trainable_keys(network)}


def load_trainable_state(network: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (exactly the trainable keys of ``network``) into ``network``."""
    expected = trainable_keys(network)
    problem = key_problem(state, expected)
    if problem:
        raise ValueError(f"global weights do not fit this site's teacher: {problem}")
    sd = network.state_dict()
    with torch.no_grad():
        for k in expected:
            sd[k].copy_(state[k].to(sd[k].device, sd[k].dtype))


def key_problem(state: Mapping[str, torch.Tensor], expected: Sequence[str]) -> Optional[str]:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s) ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s) ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})")
    return "; ".join(parts)


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values() if t.is_floating_point()))


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b||_2 over all floating tensors (same keys)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b if b[k].is_floating_point()))


def check_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], num_cases: object,
                 max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO) -> Optional[str]:
    """None if ``update`` may be averaged into the global weights ``reference``, else why not (one phrase)."""
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        return f"weight (labeled cases) {num_cases!r} is not a positive integer"
    problem = key_problem(update, list(reference))
    if problem:
        return f"key set differs from the global weights: {problem}"
    for k, ref in reference.items():
        t = update[k]
        if not torch.is_tensor(t):
            return f"{k} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(ref.shape):
            return f"{k} has shape {tuple(t.shape)}, the global tensor {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{k} has dtype {t.dtype}, the global tensor {ref.dtype}"
    bad = [k for k, t in update.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"non-finite values (NaN/Inf) in {len(bad)} tensor(s) ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
    dist, bound = distance(update, reference), max_update_ratio * max(state_norm(reference), 1.0)
    if dist > bound:
        return (f"update norm ||w_site - w_global|| = {dist:.4g} exceeds {max_update_ratio:g} x "
                f"max(||w_global||, 1) = {bound:.4g}")
    return None


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int]) -> State:
    """sum_k n_k w_k / sum_k n_k per tensor (float64 accumulation, each tensor's own dtype out). Non-floating
    tensors (counters) must agree across updates and are passed through."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} update(s) and {len(weights)} weight(s)")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    out: State = {}
    for k, first in updates[0].items():
        if not first.is_floating_point():
            out[k] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for u, n in zip(updates, weights):
            acc += u[k].double() * (n / total)
        out[k] = acc.to(first.dtype)
    return out


def summarise(accepted: Sequence[Tuple[str, int]], rejected: Sequence[Tuple[str, str]]) -> str:
    """One log line: which sites went into the mean with which weight, which were refused and why."""
    parts = [f"aggregated {len(accepted)} site(s): " + ", ".join(f"{s} (n={n})" for s, n in accepted)]
    if rejected:
        parts.append("rejected: " + "; ".join(f"{s}: {why}" for s, why in rejected))
    return " | ".join(parts)
