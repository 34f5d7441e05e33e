"""Small helpers shared by the teacher and student trainers."""
from __future__ import annotations

from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from torch._dynamo import OptimizedModule

    mod = network.module if hasattr(network, "module") and not isinstance(network, OptimizedModule) else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod
