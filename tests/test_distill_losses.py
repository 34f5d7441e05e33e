"""Distillation losses against hand computations (no nnU-Net training needed)."""
import math

import numpy as np
import pytest
import torch

from tskd_nnunet.distill.losses import (DeepSupervisionKD, FeatureKD, FeatureTap, channel_wise_distillation, harden,
                                        deep_supervision_weights, kd_kl_loss, kd_kl_loss_from_probs,
                                        kd_soft_dice_loss, masked_supervised_loss, tokens_to_grid)


def test_kd_is_zero_when_student_equals_teacher():
    t = torch.randn(2, 3, 8, 8)
    assert kd_kl_loss(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl_loss(t.clone(), t, 1.0, multilabel=True).item() == pytest.approx(0.0, abs=1e-6)
    assert DeepSupervisionKD(4.0)([t.clone(), t[:, :, ::2, ::2]], t).item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_and_t_squared_against_hand_computation():
    # two pixels, two classes: s = (0, 0) and (2, 0); t = (2, 0) and (0, 0); T = 2
    s = torch.tensor([[0.0, 2.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)  # (B, C, H, W)
    t = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    pix1 = kl(softmax([2, 0]), softmax([0, 0]))
    pix2 = kl(softmax([0, 0]), softmax([2, 0]))
    expected = T * T * (pix1 + pix2) / 2          # summed over classes, averaged over pixels, times T²
    assert kd_kl_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    # T only enters through the softening and T²: at T = 1 the plain KL mean
    assert kd_kl_loss(s, t, 1.0).item() == pytest.approx(
        (kl([math.e ** 2 / (1 + math.e ** 2), 1 / (1 + math.e ** 2)], [0.5, 0.5]) +
         kl([0.5, 0.5], [math.e ** 2 / (1 + math.e ** 2), 1 / (1 + math.e ** 2)])) / 2, rel=1e-5)


def test_multilabel_kd_is_bernoulli_kl_per_channel():
    s, t = torch.tensor([0.0]).reshape(1, 1, 1, 1), torch.tensor([2.0]).reshape(1, 1, 1, 1)
    p, q = 1 / (1 + math.exp(-1.0)), 0.5  # sigmoid(t/T), sigmoid(s/T) at T = 2
    expected = 4 * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert kd_kl_loss(s, t, 2.0, multilabel=True).item() == pytest.approx(expected, rel=1e-5)


def test_deep_supervision_weights_and_downsampled_teacher():
    w = deep_supervision_weights(4)
    assert np.allclose(w, np.array([1, 0.5, 0.25, 0]) / 1.75)
    torch.manual_seed(0)
    t = torch.randn(1, 2, 8, 8)
    outs = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    expected = (1 / 1.5) * kd_kl_loss(outs[0], t, 2.0) + (0.5 / 1.5) * kd_kl_loss(
        outs[1], torch.nn.functional.avg_pool2d(t, 2), 2.0)  # lowest output has weight 0
    assert DeepSupervisionKD(2.0)(outs, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    teacher = torch.nn.Conv2d(1, 3, 3, padding=1)
    student = torch.nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        t_logits = teacher(x)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = kd_kl_loss(student(x), t_logits, 2.0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_unlabeled_samples_contribute_no_supervised_loss():
    def loss(outputs, targets):  # stands in for nnU-Net's DS-wrapped Dice+CE
        return sum(((o - t) ** 2).mean() for o, t in zip(outputs, targets))

    out = [torch.randn(3, 2, 4, 4, requires_grad=True), torch.randn(3, 2, 2, 2, requires_grad=True)]
    tgt = [torch.randn(3, 2, 4, 4), torch.randn(3, 2, 2, 2)]
    labeled = torch.tensor([True, False, True])
    base = masked_supervised_loss(loss, out, tgt, labeled)
    tgt2 = [t.clone() for t in tgt]
    for t in tgt2:
        t[1] += 100.0  # change only the unlabeled sample's target
    assert masked_supervised_loss(loss, out, tgt2, labeled).item() == pytest.approx(base.item())
    base.backward()
    assert out[0].grad[1].abs().sum() == 0 and out[0].grad[0].abs().sum() > 0
    none = masked_supervised_loss(loss, out, tgt, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad


def test_feature_kd_projection_resize_and_modes():
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    for mode in ("mse", "cwd"):
        head = FeatureKD(8, 16, 2, mode)
        loss = head(s, t)
        loss.backward()
        assert loss.item() > 0 and head.proj.weight.grad is not None
    assert channel_wise_distillation(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="'mse' or 'cwd'"):
        FeatureKD(8, 16, 2, "l1")


def test_tokens_to_grid_and_feature_tap():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # cls + 4x4
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 4, 4) and torch.equal(grid[:, :, 0, 0], tokens[:, 1])
    assert tokens_to_grid(torch.zeros(1, 4, 4, 5), channels_last=True).shape == (1, 5, 4, 4)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU())
    tap = FeatureTap(net, "0")
    y = net(torch.ones(1, 1, 3, 3))
    assert tap.pop().shape == y.shape
    with pytest.raises(RuntimeError, match="run a forward pass"):
        tap.pop()
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        FeatureTap(net, "nope")
    pre = FeatureTap(net, "1", take="input")
    net(torch.ones(1, 1, 3, 3))
    assert torch.equal(pre.pop(), net[0](torch.ones(1, 1, 3, 3)))


def test_soft_dice_kd_against_hand_computation_background_left_out_and_masked():
    # 2 classes, 2 pixels; student probs of class 1: 0.5 / 0.5 (logits 0); teacher: 1 / 0
    s = torch.zeros(1, 2, 1, 2)
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 2)  # class 0 row, class 1 row
    expected = 1 - (2 * 0.5 + 1e-5) / (1.0 + 1.0 + 1e-5)          # class 1 only: inter 0.5, sums 1 and 1
    assert kd_soft_dice_loss(s, p).item() == pytest.approx(expected, rel=1e-5)
    # the masked-out pixel (the teacher's background one) no longer counts: inter 0.5, sums 0.5 and 1
    valid = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert kd_soft_dice_loss(s, p, valid).item() == pytest.approx(1 - (1 + 1e-5) / (1.5 + 1e-5), rel=1e-5)
    # equal to the teacher: ~0; sigmoid outputs count every channel
    t = torch.tensor([[-20.0, 20.0], [20.0, -20.0]]).reshape(1, 2, 1, 2)
    assert kd_soft_dice_loss(t, torch.softmax(t, 1)).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_soft_dice_loss(t, torch.sigmoid(t), multilabel=True).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_soft_dice_loss(s, p[:, :1])


def test_soft_dice_term_does_not_shrink_with_the_organ():
    """Why DistillTrainer_dice exists: missing an organ of 1% of the pixels costs the pixel KL 1/25 of what
    missing a 25% organ costs (it is an average over pixels), while the Dice term charges both about fully."""
    def missed(organ_px: int):
        p = torch.zeros(1, 2, 20, 20)
        p[:, 0] = 1
        p[:, 0].view(-1)[:organ_px], p[:, 1].view(-1)[:organ_px] = 0, 1
        s = torch.zeros(1, 2, 20, 20)
        s[:, 0] = 20.0                                           # student: sure of background everywhere
        return kd_kl_loss_from_probs(s, p, 1.0).item(), kd_soft_dice_loss(s, p).item()
    (kl_small, dice_small), (kl_large, dice_large) = missed(4), missed(100)
    assert kl_large / kl_small == pytest.approx(25, rel=0.01)
    assert dice_small > 0.95 and dice_large > 0.95
    # the module adds it with its weight; without the weight it is the KL alone (the unchanged default)
    s, p = torch.randn(1, 2, 8, 8), torch.softmax(torch.randn(1, 2, 8, 8), 1)
    assert DeepSupervisionKD(2.0)([s], teacher_probs=p).item() == pytest.approx(
        kd_kl_loss_from_probs(s, p, 2.0).item(), rel=1e-6)
    assert DeepSupervisionKD(2.0, dice_weight=0.5)([s], teacher_probs=p).item() == pytest.approx(
        kd_kl_loss_from_probs(s, p, 2.0).item() + 0.5 * kd_soft_dice_loss(s, p).item(), rel=1e-6)
    logits = torch.randn(1, 2, 8, 8)
    assert DeepSupervisionKD(2.0, dice_weight=1.0)([s], logits).item() == pytest.approx(
        kd_kl_loss(s, logits, 2.0).item() + kd_soft_dice_loss(s, torch.softmax(logits, 1)).item(), rel=1e-5)


def test_hard_labels_are_cross_entropy_plus_dice_on_the_teachers_argmax():
    """DistillTrainer_hard's loss: nnU-Net's CE + soft Dice with the teacher's argmax as the label (pseudo-labels),
    the same from cached probabilities and online logits; invalid pixels carry no loss."""
    torch.manual_seed(0)
    s, logits = torch.randn(2, 3, 8, 8), 3 * torch.randn(2, 3, 8, 8)
    p = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(p.argmax(1), 3).movedim(-1, 1).float()
    assert torch.equal(harden(p), onehot)
    expected = torch.nn.functional.cross_entropy(s, p.argmax(1)).item() + kd_soft_dice_loss(s, onehot).item()
    hard = DeepSupervisionKD(1.0, dice_weight=1.0, hard=True)
    assert hard([s], teacher_probs=p).item() == pytest.approx(expected, rel=1e-4)
    assert hard([s], logits).item() == pytest.approx(expected, rel=1e-4)
    assert DeepSupervisionKD(1.0, dice_weight=1.0)([s], teacher_probs=p).item() != pytest.approx(expected, rel=1e-2)
    valid = torch.ones(2, 1, 8, 8)
    valid[:, :, :4] = 0
    s2 = s.clone()
    s2[:, :, :4] = 50 * torch.randn(2, 3, 4, 8)
    assert hard([s2], teacher_probs=p, valid=valid).item() == pytest.approx(
        hard([s], teacher_probs=p, valid=valid).item(), rel=1e-6)
    # region (sigmoid) outputs: each channel thresholded at 0.5, at half the validity of a padded target
    q = torch.tensor([[[[0.3, 0.6]]]])
    assert harden(q, multilabel=True).tolist() == [[[[0.0, 1.0]]]]
    assert harden(q, multilabel=True, valid=torch.tensor([[[[0.5, 0.5]]]])).tolist() == [[[[1.0, 1.0]]]]
