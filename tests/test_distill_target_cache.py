"""Cached teacher targets: alignment through nnU-Net's real augmentation, keys that never reuse a stale cache,
no KD on padding, softened targets equal to online KD's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tskd_nnunet.distill.losses import DeepSupervisionKD, kd_kl_loss, kd_kl_loss_from_probs


def _smooth_field(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, *shape), generator=g)
    for _ in range(4):
        x = F.avg_pool2d(x, 5, stride=1, padding=2)
    return ((x - x.mean()) / x.std())[0]


def _nnunet_training_transforms(patch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return nnUNetTrainer.get_training_transforms(
        patch, (-np.pi, np.pi), [[1, 1], [0.5, 0.5]], (0, 1), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)


def test_cached_target_stays_aligned_with_the_augmented_image():
    """Target = a copy of the image: after nnU-Net's rotation/scaling/mirroring (and intensity transforms on
    the image only) the two still correlate pixel by pixel; an un-transformed target would not."""
    from tskd_nnunet.distill.target_cache import wrap_transforms
    patch = (48, 48)
    transforms = wrap_transforms(_nnunet_training_transforms(patch), num_image_channels=1)
    corr_aligned, corr_static = [], []
    for seed in range(12):
        torch.manual_seed(seed)
        np.random.seed(seed)
        image = _smooth_field((64, 64), seed)
        target = image.clone()
        ones = torch.ones_like(image)
        out = transforms(image=torch.cat([image, target, ones]), segmentation=torch.zeros((1, 64, 64), dtype=torch.int16))
        x, t, valid = out["image"][0], out["image"][1], out["image"][2]
        assert out["image"].shape == (3, *patch) and "regression_target" not in out
        m = valid > 0.99
        assert m.sum() > 100

        def corr(a, b):
            a, b = a[m] - a[m].mean(), b[m] - b[m].mean()
            return float((a * b).sum() / (a.norm() * b.norm() + 1e-8))
        corr_aligned.append(corr(x, t))
        corr_static.append(corr(x, image[0, 8:56, 8:56]))  # what a target that skipped the augmentation would give
    assert np.median(corr_aligned) > 0.9
    assert np.median(corr_static) < 0.6


def test_padding_and_rotated_in_corners_carry_no_kd_loss():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 16, 16)
    probs = torch.softmax(torch.randn(2, 3, 16, 16), 1)
    valid = torch.ones(2, 1, 16, 16)
    valid[:, :, :, 10:] = 0
    base = kd_kl_loss_from_probs(student, probs, 2.0, valid)
    changed = student.clone()
    changed[:, :, :, 10:] = torch.randn(2, 3, 16, 6) * 10  # anything outside the image
    assert torch.allclose(base, kd_kl_loss_from_probs(changed, probs * valid, 2.0, valid))
    changed[:, :, :, :10] += 1.0 * torch.randn(2, 3, 16, 10)
    assert not torch.allclose(base, kd_kl_loss_from_probs(changed, probs, 2.0, valid))
    # deep supervision: the validity is pooled with the target, coarse pixels mostly outside get no loss
    ds = DeepSupervisionKD(2.0)
    outs = [student, student[:, :, ::2, ::2]]
    a = ds(outs, teacher_probs=probs, valid=valid)
    outs2 = [changed.clone(), changed[:, :, ::2, ::2].clone()]
    outs2[0][:, :, :, :10], outs2[1][:, :, :, :5] = student[:, :, :, :10], student[:, :, ::2, :10:2]
    assert torch.allclose(a, ds(outs2, teacher_probs=probs, valid=valid))


@pytest.mark.parametrize("multilabel", [False, True])
def test_cached_probabilities_give_the_same_kd_loss_as_online_logits(multilabel):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8) * 3
    probs = torch.sigmoid(teacher) if multilabel else torch.softmax(teacher, 1)
    for t in (1.0, 2.0, 4.0):
        online = kd_kl_loss(student, teacher, t, multilabel)
        cached = kd_kl_loss_from_probs(student, probs, t, None, multilabel)
        assert torch.allclose(online, cached, rtol=1e-3, atol=1e-5)


def test_another_teacher_plans_fold_or_tta_never_reads_the_same_cache(tmp_path):
    from tskd_nnunet.distill.target_cache import (CachedTargetDataset, TeacherForCache, cache_folder, cache_key,
                                                  read_target, target_file)
    from tskd_nnunet.distill.teacher_io import TeacherError

    def teacher(sha, name="T"):
        return TeacherForCache(None, name, "/x/checkpoint_final.pth", sha, (0, 1), None, None, {})
    plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": {"patch_size": [64, 64], "spacing": [1, 1]}}}
    base = cache_key([teacher("a" * 64)], plans, "2d", 0, True)
    other_plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": {"patch_size": [64, 64], "spacing": [2, 2]}}}
    keys = {base, cache_key([teacher("b" * 64)], plans, "2d", 0, True), cache_key([teacher("a" * 64, "U")], plans, "2d", 0, True),
            cache_key([teacher("a" * 64)], other_plans, "2d", 0, True), cache_key([teacher("a" * 64)], plans, "2d", 1, True),
            cache_key([teacher("a" * 64)], plans, "2d", 0, False),
            cache_key([teacher("a" * 64), teacher("c" * 64, "U")], plans, "2d", 0, True)}
    assert len(keys) == 7
    assert cache_key([teacher("a" * 64)], plans, "2d", 0, True) == base  # deterministic
    folders = {cache_folder("/p", "nnUNetPlans", "2d", f, k) for k in keys for f in (0,)}
    assert len(folders) == 7

    # a target of the wrong shape (built for other data) is refused with the fix
    folder = str(tmp_path)
    np.save(target_file(folder, "case_1"), np.zeros((2, 1, 8, 8), dtype=np.float16))
    with pytest.raises(TeacherError, match="delete"):
        read_target(folder, "case_1", (1, 9, 8))

    data = CachedTargetDataset(OneCase(), folder).load_case("case_1")[0]
    assert data.shape == (4, 1, 8, 8) and np.all(data[-1] == 1)  # image, 2 target channels, validity
    # nnU-Net's data-augmentation workers receive the dataset pickled
    import pickle
    copy = pickle.loads(pickle.dumps(CachedTargetDataset(OneCase(), folder)))
    assert copy.load_case("case_1")[0].shape == (4, 1, 8, 8) and copy.source == "one-case"


class OneCase:
    """A one-case stand-in for nnU-Net's dataset classes (module level: picklable)."""
    identifiers = ["case_1"]
    source = "one-case"

    def load_case(self, identifier):
        return np.ones((1, 1, 8, 8), np.float32), np.zeros((1, 1, 8, 8), np.int16), None, {}


def test_a_case_written_after_its_target_is_stale(tmp_path):
    """Cases re-written under their old names (re-sampled synthetic images, a re-run preprocessing) get their
    target computed again; untouched cases keep theirs."""
    import os

    from tskd_nnunet.distill.target_cache import missing_cases, target_file

    cases, folder = tmp_path / "cases", tmp_path / "targets"
    cases.mkdir()
    folder.mkdir()
    for i in ("a", "b", "c"):
        (cases / f"{i}.pkl").write_bytes(b"x")
    for i in ("a", "b"):
        np.save(target_file(str(folder), i), np.zeros(2))
    case_file = lambda i: str(cases / f"{i}.pkl")  # noqa: E731
    assert missing_cases(str(folder), "abc", case_file) == ["c"]
    t = os.stat(target_file(str(folder), "b")).st_mtime_ns
    os.utime(case_file("b"), ns=(t + 10 ** 9, t + 10 ** 9))  # b written again, 1 s after its target
    assert missing_cases(str(folder), "abc", case_file) == ["b", "c"]
    assert missing_cases(str(folder), "abc") == ["c"]  # without case files: presence only
