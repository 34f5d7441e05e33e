"""Backbone registry: tiny SAM-format and timm-format checkpoints load through the public path;
bad files give one-line errors. The two writers here are reused by the teacher tests."""
from __future__ import annotations

import os
from typing import Dict, List

import pytest
import torch

from tskd_nnunet.models.vit_backbones import (REGISTRY, RandomTeacherWarning, TeacherCheckpointError, create_backbone,
                                              read_checkpoint, sha256_of)

# A reduced SAM: 2 blocks, block 0 windowed (window 4), block 1 global, trained at 128^2 (8x8 tokens).
TINY_SAM = dict(embed_dim=64, depth=2, num_heads=2, window_size=4, global_attn_indexes=[1])
TINY_SAM_OVERRIDES = {"depth": 2, "embed_dim": 64, "num_heads": 2, "window_size": 4, "global_attn_indexes": [1]}
TINY_VIT_OVERRIDES = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def write_tiny_sam_checkpoint(path: str, embed_dim: int = 64, depth: int = 2, num_heads: int = 2,
                              window_size: int = 4, global_attn_indexes: List[int] = (1,), native_img: int = 128,
                              in_chans: int = 3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights in the official ``sam_vit_b_01ec64.pth`` layout (written out by hand, not via timm):
    ``image_encoder.*`` (NHWC pos_embed, rel_pos tables, mlp.lin1/lin2, 4-layer neck) plus prompt
    encoder and mask decoder entries, as in the real file."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    grid, head_dim, e = native_img // 16, embed_dim // num_heads, "image_encoder."
    sd = {e + "pos_embed": r(1, grid, grid, embed_dim), e + "patch_embed.proj.weight": r(embed_dim, in_chans, 16, 16),
          e + "patch_embed.proj.bias": r(embed_dim)}
    for i in range(depth):
        b = f"{e}blocks.{i}."
        n = grid if i in global_attn_indexes else window_size
        sd.update({b + "norm1.weight": 1 + r(embed_dim), b + "norm1.bias": r(embed_dim),
                   b + "attn.rel_pos_h": r(2 * n - 1, head_dim), b + "attn.rel_pos_w": r(2 * n - 1, head_dim),
                   b + "attn.qkv.weight": r(3 * embed_dim, embed_dim), b + "attn.qkv.bias": r(3 * embed_dim),
                   b + "attn.proj.weight": r(embed_dim, embed_dim), b + "attn.proj.bias": r(embed_dim),
                   b + "norm2.weight": 1 + r(embed_dim), b + "norm2.bias": r(embed_dim),
                   b + "mlp.lin1.weight": r(4 * embed_dim, embed_dim), b + "mlp.lin1.bias": r(4 * embed_dim),
                   b + "mlp.lin2.weight": r(embed_dim, 4 * embed_dim), b + "mlp.lin2.bias": r(embed_dim)})
    sd.update({e + "neck.0.weight": r(256, embed_dim, 1, 1), e + "neck.1.weight": 1 + r(256), e + "neck.1.bias": r(256),
               e + "neck.2.weight": r(256, 256, 3, 3), e + "neck.3.weight": 1 + r(256), e + "neck.3.bias": r(256),
               "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": r(2, 128),
               "prompt_encoder.no_mask_embed.weight": r(1, 256), "mask_decoder.iou_token.weight": r(1, 256)})
    torch.save(sd, path)
    return sd


def write_tiny_timm_checkpoint(path: str, embed_dim: int = 64, depth: int = 2, num_heads: int = 2,
                               img_size: int = 64, in_chans: int = 3, wrap: str = "", seed: int = 0
                               ) -> Dict[str, torch.Tensor]:
    """A plain timm ViT state_dict (what our MAE/MoCo pretraining writes), optionally wrapped."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, img_size=img_size, in_chans=in_chans)
    sd = model.state_dict()
    torch.save({wrap: sd} if wrap else sd, path)
    return sd


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    paths = {"sam": str(d / "tiny_sam.pth"), "timm": str(d / "tiny_vit.pth"), "timm_wrapped": str(d / "wrapped.pth")}
    sd_sam = write_tiny_sam_checkpoint(paths["sam"])
    sd_timm = write_tiny_timm_checkpoint(paths["timm"])
    write_tiny_timm_checkpoint(paths["timm_wrapped"], wrap="model")
    return paths, sd_sam, sd_timm


def test_sam_checkpoint_loads_with_resampled_positions(ckpts):
    paths, sd, _ = ckpts
    bb = create_backbone("sam_vit_b", paths["sam"], img_size=64, overrides=TINY_SAM_OVERRIDES)
    m = bb.model
    # unchanged tensors are the file's (key conversion mlp.lin1 -> mlp.fc1), resampled ones have the new grid
    assert torch.equal(m.blocks[0].mlp.fc1.weight, sd["image_encoder.blocks.0.mlp.lin1.weight"])
    assert torch.equal(m.blocks[0].attn.rel_pos_h, sd["image_encoder.blocks.0.attn.rel_pos_h"])  # windowed: kept
    assert m.pos_embed.shape == (1, 4, 4, 64) and m.blocks[1].attn.rel_pos_h.shape == (7, 32)  # 8x8 grid -> 4x4
    feats = bb.forward_features_multi(torch.randn(2, 3, 64, 64))
    assert bb.feature_blocks == [0, 0, 1, 1] and len(feats) == 4
    assert all(f.shape == (2, 64, 4, 4) for f in feats)
    assert bb.embed_dim == 64 and bb.patch_size == 16 and bb.in_chans == 3


def test_timm_checkpoint_loads_plain_and_wrapped(ckpts):
    paths, _, sd = ckpts
    for key in ("timm", "timm_wrapped"):
        bb = create_backbone("vit_tiny", paths[key], img_size=(96, 64), overrides=TINY_VIT_OVERRIDES)
        assert torch.equal(bb.model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
        assert bb.model.pos_embed.shape == (1, 1 + 6 * 4, 64)  # 4x4 grid resampled to 6x4
        feats = bb.forward_features_multi(torch.randn(1, 3, 96, 64))
        assert [tuple(f.shape) for f in feats] == [(1, 64, 6, 4)] * 4


def test_missing_corrupt_and_absent_weights_are_clear(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(TeacherCheckpointError, match=r"nope\.pth does not exist.*Fix"):
        create_backbone("sam_vit_b", missing, 64)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(TeacherCheckpointError, match=r"corrupt\.pth is not a readable PyTorch checkpoint.*Fix"):
        create_backbone("sam_vit_b", str(corrupt), 64)
    with pytest.raises(TeacherCheckpointError, match=r"No weights given.*TSKD_TEACHER_WEIGHTS"):
        create_backbone("sam_vit_b", None, 64)
    with pytest.warns(RandomTeacherWarning, match="RANDOMLY INITIALISED"):
        bb = create_backbone("vit_tiny", None, 32, allow_random_init=True, overrides=TINY_VIT_OVERRIDES)
    assert len(bb.forward_features_multi(torch.randn(1, 3, 32, 32))) == 4


def test_wrong_model_size_and_wrong_format(ckpts):
    paths, _, _ = ckpts
    with pytest.raises(TeacherCheckpointError) as e:
        create_backbone("sam_vit_b", paths["sam"], 64)  # tiny file, full-size name
    msg = str(e.value)
    assert "\n" not in msg and "tiny_sam.pth" in msg and "embed_dim 64 (expected 768)" in msg
    assert "TSKD_TEACHER_ARCH_OVERRIDES" in msg and '"num_heads": 2' in msg
    with pytest.raises(TeacherCheckpointError, match="not a Segment Anything checkpoint"):
        create_backbone("sam_vit_b", paths["timm"], 64, overrides=TINY_SAM_OVERRIDES)
    with pytest.raises(TeacherCheckpointError, match="not a timm ViT state dict"):
        create_backbone("vit_small", paths["sam"], 64, overrides=TINY_VIT_OVERRIDES)


def test_wrong_size_names_the_matching_registered_model(tmp_path):
    """A ViT-S-shaped file (random, 32^2) offered as vit_base is recognised as vit_small."""
    path = str(tmp_path / "vit_s.pth")
    write_tiny_timm_checkpoint(path, embed_dim=384, depth=12, num_heads=6, img_size=32)
    with pytest.raises(TeacherCheckpointError, match=r"look like vit_small"):
        create_backbone("vit_base", path, 32)


def test_registry_and_sha(ckpts):
    paths, _, _ = ckpts
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "vit_tiny", "vit_small", "vit_base"} <= set(REGISTRY)
    with pytest.raises(TeacherCheckpointError, match="Unknown teacher backbone 'sam_vit_x'"):
        create_backbone("sam_vit_x", paths["sam"], 64)
    assert len(sha256_of(paths["sam"])) == 64
    assert "image_encoder.pos_embed" in read_checkpoint(paths["sam"])
