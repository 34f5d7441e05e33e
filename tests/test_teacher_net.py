"""The teacher network in-process: shapes, deep supervision, adapter-only state, LoRA, errors."""
from __future__ import annotations

import pytest
import torch

from test_backbones import (TINY_SAM_OVERRIDES, TINY_VIT_OVERRIDES, write_tiny_sam_checkpoint,
                            write_tiny_timm_checkpoint)
from tskd_nnunet.models.lora import LoraSettings, lora_layers
from tskd_nnunet.models.teacher_net import (ViTInputAdapter, build_foundation_encoder, build_teacher_network,
                                            deep_supervision_scales, resolve_teacher_spec, verify_base_file)
from tskd_nnunet.models.vit_backbones import TeacherCheckpointError
from tskd_nnunet.trainers.teacher import WarmupPolyLRScheduler, adamw_param_groups

POOLS = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]  # nnU-Net's 2d plan for 64x64 patches


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tsam") / "tiny_sam.pth")
    write_tiny_sam_checkpoint(path)
    return path


def _spec(path, lora=LoraSettings(r=4, alpha=8), img=None, patch=(64, 64), backbone="sam_vit_b",
          overrides=TINY_SAM_OVERRIDES, random=False):
    return resolve_teacher_spec(backbone, path, random, overrides, img, patch, lora, decoder_channels=8)


def test_forward_matches_nnunet_deep_supervision_and_patch_size(sam_file):
    net = build_teacher_network(_spec(sam_file), 1, 3, deep_supervision_scales(POOLS), enable_deep_supervision=True)
    x = torch.randn(2, 1, 64, 64)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 64, 64), (2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    net.decoder.deep_supervision = False
    assert net(x).shape == (2, 3, 64, 64)
    feats = net.encode(x)
    assert len(feats) == 4 and feats[0].shape == (2, 64, 4, 4)


def test_working_size_differs_from_patch(sam_file):
    """A 48x80 patch runs the ViT at 96x128 (TSKD_TEACHER_IMG_SIZE) and returns logits at 48x80."""
    spec = _spec(sam_file, img=(96, 128), patch=(48, 80))
    net = build_teacher_network(spec, 2, 2, deep_supervision_scales([[1, 1], [2, 2], [2, 2]]), True)
    outs = net(torch.randn(1, 2, 48, 80))
    assert [tuple(o.shape[2:]) for o in outs] == [(48, 80), (24, 40)]
    assert _spec(sam_file, patch=(40, 72)).img_size == (48, 80)  # default: rounded up to the 16-grid


def test_adapter_only_state_dict_roundtrip_and_frozen_base(sam_file):
    spec = _spec(sam_file)
    net = build_teacher_network(spec, 1, 2)
    sd = net.state_dict()
    backbone_keys = [k for k in sd if k.startswith("backbone.")]
    assert backbone_keys and all("lora_" in k for k in backbone_keys)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable if n.startswith("backbone."))
    assert any(n.startswith("decoder.") for n in trainable) and any(n.startswith("adapter.") for n in trainable)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    other = build_teacher_network(spec, 1, 2)
    other.load_state_dict(net.state_dict())  # strict, without base tensors
    x = torch.randn(1, 1, 64, 64)
    net.eval(), other.eval()
    assert torch.allclose(net(x), other(x), atol=1e-6)
    with pytest.raises(TeacherCheckpointError, match="unexpected"):
        other.load_state_dict(dict(net.state_dict(), bogus=torch.zeros(1)))
    with pytest.raises(TeacherCheckpointError, match="missing"):
        other.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("decoder.")})


def test_full_finetune_and_random_store_everything(sam_file):
    full = build_teacher_network(_spec(sam_file, lora=None), 1, 2)
    assert "backbone.model.blocks.0.attn.qkv.weight" in full.state_dict()
    assert all(p.requires_grad for p in full.parameters())
    with pytest.warns(UserWarning, match="RANDOMLY"):
        rnd = build_teacher_network(_spec(None, random=True), 1, 2)
    assert "backbone.model.blocks.0.attn.qkv.base_layer.weight" in rnd.state_dict()


def test_teacher_frozen_for_distillation_has_its_lora_merged(sam_file):
    """teacher_io freezes a loaded teacher with its LoRA merged into the base weights (less work per step):
    no adapter layer is left and the outputs are the same within 1e-5."""
    from tskd_nnunet.distill.teacher_io import freeze_teacher
    net = build_teacher_network(_spec(sam_file), 1, 2)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        before = net.eval()(x)
        assert lora_layers(net)
        frozen = freeze_teacher(net)
        assert not lora_layers(frozen) and not frozen.training and not any(p.requires_grad for p in frozen.parameters())
        assert torch.allclose(before, frozen(x), atol=1e-5)


def test_channel_mapping_and_mismatch(tmp_path, sam_file):
    a = ViTInputAdapter(1, 3, (32, 32))
    y = a(torch.ones(1, 1, 16, 16))
    assert y.shape == (1, 3, 32, 32) and torch.allclose(y, torch.ones_like(y))  # grey -> RGB replication
    ident = ViTInputAdapter(2, 2, (16, 16))
    x = torch.randn(1, 2, 16, 16)
    assert torch.allclose(ident(x), x)
    two_chan = str(tmp_path / "mae_2ch.pth")
    write_tiny_timm_checkpoint(two_chan, in_chans=2)
    spec = _spec(two_chan, backbone="vit_tiny", overrides=TINY_VIT_OVERRIDES)
    assert spec.in_chans == 2
    build_teacher_network(spec, 2, 2)  # matching channels: fine
    with pytest.raises(TeacherCheckpointError, match=r"declares 1 input channel.*mae_2ch\.pth.*pretrained on 2"):
        build_teacher_network(spec, 1, 2)


def test_base_file_missing_or_changed(tmp_path):
    path = tmp_path / "base.pth"
    write_tiny_sam_checkpoint(str(path))
    spec = _spec(str(path))
    verify_base_file(spec)
    write_tiny_sam_checkpoint(str(path), seed=1)
    with pytest.raises(TeacherCheckpointError, match=r"base\.pth changed since training.*Fix: restore"):
        build_teacher_network(spec, 1, 2)
    path.unlink()
    with pytest.raises(TeacherCheckpointError, match=r"base\.pth .* are missing.*Fix"):
        build_teacher_network(spec, 1, 2)


def test_foundation_encoder_is_frozen(sam_file):
    enc = build_foundation_encoder(_spec(sam_file), 1)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert [f.shape[1] for f in enc.encode(torch.randn(1, 1, 64, 64))] == [64] * 4


def test_scheduler_warms_up_then_decays_and_optimizer_skips_frozen(sam_file):
    net = build_teacher_network(_spec(sam_file), 1, 2)
    groups = adamw_param_groups(net, 0.01)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in net.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = WarmupPolyLRScheduler(opt, 1e-3, max_steps=100, warmup_steps=5)
    lrs = []
    for epoch in range(100):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < lrs[4] < lrs[5] == pytest.approx(1e-3) and lrs[50] < lrs[5] and lrs[-1] < 1e-4
