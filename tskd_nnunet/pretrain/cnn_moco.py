"""MoCo v3 with the nnU-Net CNN encoder: features = global average pool of the bottleneck stage.

Only the encoder is trained; the whole planned network (decoder at nnU-Net's own initialisation)
is written, because nnU-Net's ``load_pretrained_weights`` requires every key but the seg layers.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from tskd_nnunet.pretrain.cnn_mim import PlannedNetwork, encoder_stage_outputs, export_network
from tskd_nnunet.pretrain.moco import MoCoV3


class PooledEncoder(nn.Module):
    """nnU-Net encoder -> (B, C_bottleneck) by global average pooling."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encoder_stage_outputs(self.encoder, x)[-1].flatten(2).mean(dim=2)


class CNNMoCoV3(MoCoV3):
    def __init__(self, planned: PlannedNetwork, **kwargs: Any) -> None:
        encoder = PooledEncoder(planned.network.encoder)
        super().__init__(encoder, planned.network.encoder.output_channels[-1], **kwargs)
        self.planned = planned
        # the decoder is not trained here; keep it outside this module's parameters (no optimizer
        # state, no momentum copy) and export it as nnU-Net initialised it
        self._decoder_holder = [planned.network]

    def export(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        network = self._decoder_holder[0]
        return export_network(network, self.planned, dict(meta, objective="cnn_moco_v3"))
