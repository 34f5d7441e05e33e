"""KID and the fallback feature extractor of the synthetic quality check (no dataset needed)."""
import numpy as np
import pytest
import torch


def test_kid_is_zero_for_identical_sets_and_grows_with_a_shift():
    from tskd_nnunet.synthetic.quality import kid
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    same, _ = kid(real, real.copy(), num_subsets=10, subset_size=50)
    resampled, _ = kid(real, rng.normal(size=(200, 16)), num_subsets=10, subset_size=50)
    shifted, _ = kid(real, rng.normal(size=(200, 16)) + 1.0, num_subsets=10, subset_size=50)
    assert abs(resampled) < 0.1 * shifted and shifted > 0.1
    assert abs(same) < 0.05 * shifted


def test_unbiased_mmd_matches_a_direct_computation():
    from tskd_nnunet.synthetic.quality import polynomial_mmd2_unbiased
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_random_features_are_fixed_and_separate_shifted_images():
    from tskd_nnunet.synthetic.quality import RandomConvFeatures, kid
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 2, 32, 32, generator=g)
    b = torch.randn(40, 2, 32, 32, generator=g)
    f1, f2 = RandomConvFeatures(2), RandomConvFeatures(2)
    torch.testing.assert_close(f1(a), f2(a))  # same seed, same extractor
    close, _ = kid(f1(a).numpy(), f1(b).numpy(), 10, 30)
    far, _ = kid(f1(a).numpy(), f1(b * 2 + 1).numpy(), 10, 30)
    assert far > 10 * abs(close)


def test_kid_needs_two_images():
    from tskd_nnunet.data.extension import ExtensionError
    from tskd_nnunet.synthetic.quality import kid
    with pytest.raises(ExtensionError, match="at least 2"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_frechet_distance_zero_for_identical_sets_and_matches_the_gaussian_formula():
    from tskd_nnunet.synthetic.quality import frechet_distance
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, s² I) in d dims: |m|² + d (1 - s)²
    b = rng.normal(size=(4000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])
    assert frechet_distance(a, b) == pytest.approx(2.0 + 3 * (1 - 2.0) ** 2, rel=0.08)


def _blobs(n, seed, shift=0.0):
    """Smooth bright ellipses on a dark background (an ultrasound-like toy), batch (n, 1, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx, ry, rx = (torch.rand(4, generator=g) * torch.tensor([0.6, 0.6, 0.3, 0.3])
                          + torch.tensor([-0.3, -0.3, 0.3, 0.3])).tolist()
        ring = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 - 1).abs() < 0.15
        out.append(ring.float() + 0.05 * torch.randn(64, 64, generator=g) + shift)
    return torch.stack(out)[:, None]


def test_litemedsam_features_are_fixed_intensity_invariant_and_tell_images_from_noise():
    """The default feature space: the packaged encoder, so the same images give the same features in every run;
    per-image min-max makes nnU-Net's normalisation irrelevant; noise is far from images, images close to images."""
    from tskd_nnunet.synthetic.quality import LiteMedSAMFeatures, frechet_distance
    f = LiteMedSAMFeatures(size=64)
    a, b = _blobs(12, 0), _blobs(12, 1)
    noise = torch.randn(12, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    fa = f(a)
    assert fa.shape == (12, 256)
    torch.testing.assert_close(LiteMedSAMFeatures(size=64)(a[:3]), fa[:3])
    torch.testing.assert_close(f(3.0 * a[:3] - 7.0), fa[:3], atol=1e-4, rtol=1e-4)
    near = frechet_distance(fa.numpy(), f(b).numpy())
    far = frechet_distance(fa.numpy(), f(noise).numpy())
    assert far > 3 * near, (near, far)


def test_unipc_sampler_is_deterministic_for_a_seed():
    from tskd_nnunet.synthetic.model import build_sampling_scheduler, build_train_scheduler, build_unet
    from tskd_nnunet.synthetic.train import sample_model_space
    torch.manual_seed(0)
    unet = build_unet(1, (16, 16), (8, 16), attention=False).eval()
    cfg = build_train_scheduler().config
    assert type(build_sampling_scheduler("unipc", cfg)).__name__ == "UniPCMultistepScheduler"
    x1 = sample_model_space(unet, cfg, 2, seed=3, inference_steps=5, sampler="unipc")
    x2 = sample_model_space(unet, cfg, 2, seed=3, inference_steps=5, sampler="unipc")
    x3 = sample_model_space(unet, cfg, 2, seed=4, inference_steps=5, sampler="unipc")
    torch.testing.assert_close(x1, x2)
    assert not torch.allclose(x1, x3)
