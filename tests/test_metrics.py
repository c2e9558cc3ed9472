import numpy as np
import pytest
import scipy.linalg
import torch

from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.metrics import Stats, balanced_subset, class_accuracy, fid, frechet_distance, gaussian_stats


def _stats(mu, sigma) -> Stats:
    return Stats(torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64), 0)


def test_fid_of_diagonal_gaussians_has_its_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()  # = 5 + 4 + 1 + 0
    assert frechet_distance(_stats(mu_a, np.diag(var_a)), _stats(mu_b, np.diag(var_b))) == pytest.approx(expected)
    assert expected == pytest.approx(10.0)


def test_fid_matches_scipy_sqrtm_reference_on_full_covariances():
    rng = np.random.default_rng(0)
    for dim in (2, 8, 32):
        a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        sa, sb = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
        ma, mb = rng.normal(size=dim), rng.normal(size=dim)
        covmean = scipy.linalg.sqrtm(sa @ sb).real
        reference = ((ma - mb) ** 2).sum() + np.trace(sa + sb - 2 * covmean)
        assert frechet_distance(_stats(ma, sa), _stats(mb, sb)) == pytest.approx(reference, rel=1e-6)


def test_fid_from_samples_converges_to_the_distributions_distance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g)
    y = torch.randn(20000, 4, generator=g) * 2 + 1  # N(1, 4I): FID = 4*1 + 4*(1 + 4 - 2*2) = 8
    assert fid(x, y) == pytest.approx(8.0, rel=0.05)
    assert fid(x[:10000], x[10000:]) < 0.01  # same distribution: near zero, never negative
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)


def test_fid_needs_two_vectors():
    with pytest.raises(CdiffError, match="at least 2"):
        gaussian_stats(torch.zeros(1, 4))


def test_class_accuracy_overall_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 0])
    acc = class_accuracy(predicted, labels, ["a", "b", "c", "absent"])
    assert acc["accuracy"] == pytest.approx(0.5)
    assert acc["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_balanced_subset_takes_per_class_and_is_seeded():
    labels = torch.tensor([0] * 10 + [1] * 3)
    data = ImageSet(torch.arange(13, dtype=torch.uint8).view(13, 1, 1, 1), labels, ["a", "b"])
    sub = balanced_subset(data, 4, seed=1)
    assert sub.labels.tolist().count(0) == 4 and sub.labels.tolist().count(1) == 3
    assert torch.equal(sub.images, balanced_subset(data, 4, seed=1).images)
