"""LoRA on a ViT backbone through peft: inject, freeze the base, merge, tell base from adapter keys.

peft's ``inject_adapter_in_model`` replaces the targeted ``nn.Linear`` layers in place (no
PeftModel wrapper), so the backbone keeps its own forward and key names; LoRA tensors appear as
``...attn.qkv.lora_A.default.weight`` and the frozen base weight as ``...attn.qkv.base_layer.weight``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from torch import nn


@dataclass(frozen=True)
class LoraSettings:
    """rank, alpha (scaling = alpha / r), dropout, the attention projections to adapt (names of the
    ``attn`` submodules: ``qkv`` and/or ``proj``) and, for staged encoders (LiteMedSAM's TinyViT:
    ``layers.1..3``), which stages get adapters (None = every block)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = field(default_factory=lambda: ("qkv", "proj"))
    stages: Optional[Sequence[int]] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["stages"] = None if self.stages is None else [int(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        stages = d.get("stages")
        return cls(r=int(d["r"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]), targets=tuple(d["targets"]),
                   stages=None if stages is None else tuple(int(s) for s in stages))


def target_regex(targets: Sequence[str], stages: Optional[Sequence[int]] = None) -> str:
    """A full-match pattern for peft: the given projections inside every transformer block's
    attention (and nowhere else: ``patch_embed.proj`` is a Conv2d we must not touch), optionally only
    in ``layers.<stage>``."""
    names = "|".join(sorted(set(targets)))
    where = r"(.*\.)?" if stages is None else r"(.*\.)?layers\.(" + "|".join(str(int(s)) for s in sorted(set(stages))) + r")\."
    return rf"{where}blocks\.\d+\.attn\.({names})"


def is_lora_key(key: str) -> bool:
    return "lora_" in key


def add_lora(backbone: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers into ``backbone`` (in place) and freeze everything else in it."""
    from peft import LoraConfig, inject_adapter_in_model

    if not settings.targets or settings.r < 1:
        raise ValueError(f"LoRA needs rank >= 1 and at least one target, got {settings}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_regex(settings.targets, settings.stages), bias="none")
    inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_(is_lora_key(name))
    if not any(p.requires_grad for p in backbone.parameters()):
        raise ValueError(f"LoRA targets {list(settings.targets)} matched no layer of the backbone")
    return backbone


def lora_layers(module: nn.Module) -> Dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def merge_lora_(module: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain layer back (in place): the
    result has the original key names and no adapter overhead, e.g. for a faster frozen teacher."""
    for name, layer in lora_layers(module).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module


def trainable_fraction(module: nn.Module) -> float:
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / max(1, total)


def lora_parameter_names(module: nn.Module) -> List[str]:
    return [n for n, _ in module.named_parameters() if is_lora_key(n)]
