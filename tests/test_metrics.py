import numpy as np
import pytest
import scipy.linalg
import torch

from cdiff.bootstrap import accuracy_interval, fid_estimate
from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.metrics import (
    NotComputable,
    Stats,
    balanced_subset,
    class_accuracy,
    fid,
    frechet_distance,
    gaussian_stats,
    judge_images,
)


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
    assert acc.accuracy == pytest.approx(0.5)
    assert acc.per_class == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_balanced_subset_takes_per_class_and_is_seeded():
    labels = torch.tensor([0] * 10 + [1] * 3)
    data = ImageSet(torch.arange(13, dtype=torch.uint8).view(13, 1, 1, 1), labels, ["a", "b"])
    sub = balanced_subset(data, 4, seed=1)
    assert sub.labels.tolist().count(0) == 4 and sub.labels.tolist().count(1) == 3
    assert torch.equal(sub.images, balanced_subset(data, 4, seed=1).images)


def _gaussian_pair(dim: int, g: torch.Generator):
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    b = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    sa, sb = a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    return (torch.zeros(dim, dtype=torch.float64), sa), (torch.full((dim,), 0.3, dtype=torch.float64), sb)


@pytest.fixture
def one_thread():
    """Many tiny matrices: one thread is several times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fid_interval_covers_the_true_distance_at_the_stated_rate(one_thread):
    """Two known Gaussians (closed-form FID), 150 seeded draws of 200 + 200 samples in 16 dimensions.

    At this size the sample FID is biased well above the truth (the percentile interval covers it about
    a fifth of the time); the basic bootstrap interval must cover it about 95% of the time, with the
    bias-corrected value inside it.
    """
    g = torch.Generator().manual_seed(0)
    (mu_a, sa), (mu_b, sb) = _gaussian_pair(16, g)
    true = frechet_distance(_stats(mu_a, sa), _stats(mu_b, sb))
    la, lb = torch.linalg.cholesky(sa), torch.linalg.cholesky(sb)
    covered, below = 0, 0
    draws = 150
    for seed in range(draws):
        fa = mu_a + torch.randn(200, 16, generator=g, dtype=torch.float64) @ la.T
        fb = mu_b + torch.randn(200, 16, generator=g, dtype=torch.float64) @ lb.T
        interval = fid_estimate(fa, fb, n_boot=200, seed=seed)
        assert interval.low <= interval.value <= interval.high and interval.raw == pytest.approx(fid(fa, fb))
        covered += interval.low <= true <= interval.high
        below += interval.raw > true
    print(f"FID interval coverage {covered / draws:.3f}")
    assert 0.89 <= covered / draws <= 0.99, covered / draws
    assert below / draws > 0.9  # the raw value is biased upwards: what the estimate corrects


def test_accuracy_interval_covers_a_known_rate(one_thread):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 10  # 30 per class, as the default evaluation
    covered, draws = 0, 300
    for seed in range(draws):
        correct = torch.rand(300, generator=g) < 0.8
        interval = accuracy_interval(correct, labels, n_boot=500, seed=seed)
        assert interval.low <= interval.value <= interval.high
        covered += interval.low <= 0.8 <= interval.high
    print(f"accuracy interval coverage {covered / draws:.3f}")
    assert 0.91 <= covered / draws <= 0.98, covered / draws


def test_intervals_are_seeded():
    g = torch.Generator().manual_seed(1)
    fa, fb = torch.randn(50, 4, generator=g), torch.randn(60, 4, generator=g) + 0.5
    assert fid_estimate(fa, fb, n_boot=100, seed=3) == fid_estimate(fa, fb, n_boot=100, seed=3)
    assert fid_estimate(fa, fb, n_boot=100, seed=3) != fid_estimate(fa, fb, n_boot=100, seed=4)


class _TwoClassJudge(torch.nn.Module):
    """Features are the mean pixel and its square; class 1 when the mean is positive."""

    config = type("Config", (), {"features": 2})()

    def features(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([m, m**2], 1)

    def head(self, f):
        return torch.cat([-f[:, :1], f[:, :1]], 1)


def test_judge_images_with_intervals_and_one_class_refused():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 1, 4, 4, generator=g)
    labels = (images.flatten(1).mean(1) > 0).long()
    real = torch.randn(80, 1, 4, 4, generator=g)
    judge = _TwoClassJudge()
    reference = judge.features(real)
    judged = judge_images(judge, images, labels, ["a", "b"], reference, n_boot=100)
    score = judged.score
    assert score.gan_test == 1.0 and score.gan_test_interval == [1.0, 1.0] and judged.correct.all()
    low, high = score.fid_interval
    assert 0 <= low <= score.fid <= high and score.fid_raw == pytest.approx(fid(judge.features(images), reference))
    assert score.kid is not None and score.kid_std >= 0 and score.images == 40
    assert judged.features.shape == (40, 2) and (judged.labels == labels).all()
    with pytest.raises(NotComputable, match="at least two classes"):
        judge_images(judge, images, torch.zeros(40, dtype=torch.long), ["only"], reference)
    assert issubclass(NotComputable, CdiffError)  # one line, exit 2, like every user-facing error


def test_cas_punishes_missing_diversity_where_gan_test_does_not():
    # a "model" that returns real images of each class, and one that returns one image per class 20 times over:
    # the real judge recognises both (GAN-test), but a classifier trained on the copies fails on the real variety
    from cdiff.config import JudgeConfig
    from cdiff.data import load_source
    from cdiff.judge import predict, train_judge
    from cdiff.metrics import classification_accuracy_score

    train, test = load_source("sklearn-digits", "train", 12, 1), load_source("sklearn-digits", "test", 12, 1)
    config = JudgeConfig(steps=150, batch_size=64, lr=0.005, width=8, features=16)
    diverse = balanced_subset(train, 20, seed=0)
    judge = train_judge(train, config, seed=0, progress=False)
    right = predict(judge, diverse.as_float())[1] == diverse.labels  # each class's copy: one the judge recognises
    collapsed_index = torch.cat(
        [torch.nonzero((diverse.labels == c) & right).flatten()[:1].repeat(20) for c in range(10)]
    )
    collapsed = diverse.subset(collapsed_index)
    gan_test = {
        name: float((predict(judge, s.as_float())[1] == s.labels).double().mean())
        for name, s in (("diverse", diverse), ("collapsed", collapsed))
    }
    cas = {
        name: classification_accuracy_score(s.as_float(), s.labels, s.class_names, test, config, n_boot=200)
        for name, s in (("diverse", diverse), ("collapsed", collapsed))
    }
    assert gan_test["collapsed"] == 1.0 > gan_test["diverse"]  # GAN-test even prefers the copies
    assert cas["diverse"].low > cas["collapsed"].high, cas  # beyond both intervals
    assert cas["diverse"].low <= cas["diverse"].value <= cas["diverse"].high
    with pytest.raises(NotComputable):
        classification_accuracy_score(diverse.as_float(), torch.zeros(200, dtype=torch.long), ["x"], test, config)
