"""Each pretraining objective learns on the phantom corpus, and the properties that make it the method:
MAE's loss sees masked patches only, MoCo's momentum branch moves only by EMA, CNN masking does not leak."""
import numpy as np
import pytest
import torch

from tskd_nnunet.pretrain.corpus import PretrainCorpus
from tskd_nnunet.pretrain.loop import LoopConfig, run_pretraining
from tskd_nnunet.pretrain.mae import MAE, masked_patch_loss, patchify, random_masking
from tskd_nnunet.pretrain.moco import ViTMoCoV3
from tskd_nnunet.pretrain.vit import create_vit

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes tiny models 100x slower
    yield
    torch.set_num_threads(old)


def _train(objective, corpus, tmp_path, steps, batch_size, lr, seed=0):
    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, save_every=10 ** 6, progress=False,
                     signature={"objective": "test"})
    torch.manual_seed(seed)
    return [h["loss"] for h in run_pretraining(objective, corpus, str(tmp_path / "out.pth"), cfg, torch.device("cpu"))]


def _mae(res=32, **kw):
    return MAE(create_vit("vit_tiny", res, 3, TINY), "vit_tiny", res, 3, TINY, decoder_dim=32, decoder_depth=1,
               decoder_heads=2, **kw)


def test_mae_loss_decreases(use_nnunet_env, tmp_path):
    torch.manual_seed(0)
    corpus = PretrainCorpus([990], resolution=32)
    losses = _train(_mae(), corpus, tmp_path, steps=30, batch_size=8, lr=2e-3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    # the output is the encoder alone, as a plain timm state dict
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out["tskd"]["objective"] == "mae" and "patch_embed.proj.weight" in out["state_dict"]
    assert not any(k.startswith("decoder") for k in out["state_dict"])
    assert (tmp_path / "out_loss.csv").read_text().count("\n") == 31 and (tmp_path / "out_loss.png").stat().st_size


def test_mae_loss_only_on_masked_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    _, mask, _ = random_masking(16, 2, 0.75, torch.device("cpu"))
    assert mask.sum().item() == 2 * 12
    base = masked_patch_loss(pred, target, mask)
    visible = mask[..., None] == 0
    assert torch.allclose(masked_patch_loss(torch.where(visible, pred + 5, pred), target, mask), base)
    assert not torch.allclose(masked_patch_loss(torch.where(~visible, pred + 5, pred), target, mask), base)
    # end to end: the model's prediction for a masked patch does not depend on that patch's pixels
    mae = _mae().eval()
    imgs = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 4)
    pred1, m = mae.predict(imgs, noise)
    changed = imgs.clone()
    patches = patchify(changed, 16)
    j = int(torch.nonzero(m[0])[0])
    changed_p = patches.clone()
    changed_p[0, j] += 3.0
    changed = changed_p.view(1, 2, 2, 16, 16, 3).permute(0, 5, 1, 3, 2, 4).reshape(1, 3, 32, 32)
    assert torch.allclose(patchify(changed, 16), changed_p)
    pred2, _ = mae.predict(changed, noise)
    assert torch.allclose(pred1, pred2, atol=1e-6)


def test_moco_loss_decreases_and_momentum_branch_moves_only_by_ema(use_nnunet_env, tmp_path):
    torch.manual_seed(0)
    moco = ViTMoCoV3(create_vit("vit_tiny", 32, 3, TINY), "vit_tiny", 32, 3, TINY, dim=32, mlp_dim=64, momentum=0.9)
    base0 = [p.detach().clone() for p in moco.base.parameters()]
    mom0 = [p.detach().clone() for p in moco.momentum_branch.parameters()]
    assert all(not p.requires_grad for p in moco.momentum_branch.parameters())
    loss = moco(torch.randn(4, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in moco.momentum_branch.parameters())
    assert any(p.grad is not None for p in moco.base.parameters())
    for b, m0, m1 in zip(base0, mom0, moco.momentum_branch.parameters()):
        assert torch.allclose(m1, 0.9 * m0 + 0.1 * b, atol=1e-6)

    corpus = PretrainCorpus([990], resolution=32)
    moco = ViTMoCoV3(create_vit("vit_tiny", 32, 3, TINY), "vit_tiny", 32, 3, TINY, dim=32, mlp_dim=64, momentum=0.9)
    losses = _train(moco, corpus, tmp_path, steps=60, batch_size=16, lr=3e-3)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05, losses


def test_cnn_mim_learns_and_masked_content_does_not_leak(use_nnunet_env, tmp_path):
    from tskd_nnunet.pretrain.cnn_mim import CNNMIM, build_planned_network
    torch.manual_seed(0)
    planned = build_planned_network("990", "2d")
    mim = CNNMIM(planned, mask_ratio=0.6)
    assert planned.patch_size == (64, 64) and planned.total_stride == (16, 16)
    keep = mim.random_keep(2, 64, 64, torch.device("cpu"))
    assert keep.shape == (2, 1, 4, 4) and int((keep == 0).sum()) == 2 * round(16 * 0.6)
    mim.eval()
    imgs = torch.randn(2, 1, 64, 64)
    masked_full = torch.nn.functional.interpolate(keep, size=(64, 64), mode="nearest") == 0
    other = torch.where(masked_full, torch.randn_like(imgs) * 3, imgs)
    with torch.no_grad():
        assert torch.allclose(mim.reconstruct(imgs, keep), mim.reconstruct(other, keep))

    corpus = PretrainCorpus([990], resolution=planned.patch_size, mode="crop", in_chans=1)
    losses = _train(CNNMIM(build_planned_network("990", "2d")), corpus, tmp_path, steps=15, batch_size=4, lr=1e-3)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(out["network_weights"]) == set(build_planned_network("990", "2d").network.state_dict())


def test_cnn_moco_momentum_encoder_gets_no_gradients(use_nnunet_env):
    from tskd_nnunet.pretrain.cnn_mim import build_planned_network
    from tskd_nnunet.pretrain.cnn_moco import CNNMoCoV3
    torch.manual_seed(0)
    moco = CNNMoCoV3(build_planned_network("990", "2d"), dim=16, mlp_dim=32, momentum=0.9)
    opt = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randn(4, 1, 64, 64)
    first = moco(batch)
    first.backward()
    assert all(p.grad is None for p in moco.momentum_branch.parameters())
    opt.step()
    # decoder weights are not trained (nnU-Net init is exported unchanged) and have no momentum copy
    n_enc = sum(1 for _ in moco.base.parameters())
    assert n_enc == sum(1 for _ in moco.momentum_branch.parameters())
    assert not any(n.startswith("_decoder") for n, _ in moco.named_parameters())
