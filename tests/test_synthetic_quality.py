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
