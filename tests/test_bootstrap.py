"""The judge metrics' estimates: the bias-corrected FID against known Gaussians (its bias, its interval's
coverage), paired differences, stratified resampling, KID against a hand computation and torchmetrics."""

import math

import pytest
import torch

from cdiff.bootstrap import (
    Difference,
    accuracy_difference,
    fid_difference,
    fid_estimate,
    stratified_index,
)
from cdiff.metrics import _frechet, fid, kid, mmd2_unbiased

D = 16


def _gaussians(seed: int = 0):
    """A known pair of Gaussians in D dimensions: (a's sampler, b's sampler, their exact FID)."""
    g = torch.Generator().manual_seed(seed)
    lb = torch.eye(D, dtype=torch.float64) * 1.2 + 0.05 * torch.randn(D, D, generator=g, dtype=torch.float64)
    mu_b = torch.full((D,), 0.15, dtype=torch.float64)
    true = float(_frechet(torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64), mu_b, lb @ lb.T))

    def a(n, g):
        return torch.randn(n, D, generator=g, dtype=torch.float64)

    def b(n, g):
        return mu_b + torch.randn(n, D, generator=g, dtype=torch.float64) @ lb.T

    return a, b, true


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bias_corrected_fid_is_far_less_biased_and_its_interval_covers_the_truth(one_thread):
    # 300 generated vs 1,000 real, as a CPU run scores: the raw FID's bias is several times its noise
    a, b, true = _gaussians()
    g = torch.Generator().manual_seed(1)
    raw, corrected, covered, draws = [], [], 0, 80
    for seed in range(draws):
        est = fid_estimate(a(300, g), b(1000, g), n_boot=200, seed=seed)
        assert est.low <= est.value <= est.high  # the headline lies inside its own interval, always
        raw.append(est.raw)
        corrected.append(est.value)
        covered += est.low <= true <= est.high
    raw_bias = sum(raw) / draws - true
    corrected_bias = sum(corrected) / draws - true
    print(f"true {true:.3f}: raw bias {raw_bias:+.3f}, corrected {corrected_bias:+.3f}, coverage {covered / draws}")
    assert raw_bias > 0.3 and abs(corrected_bias) < 0.25 * raw_bias
    assert 0.88 <= covered / draws <= 1.0


def test_the_raw_value_is_the_plain_fid():
    a, b, _ = _gaussians()
    g = torch.Generator().manual_seed(2)
    fa, fb = a(100, g), b(200, g)
    est = fid_estimate(fa, fb, n_boot=50)
    assert est.raw == pytest.approx(fid(fa, fb)) and est.value < est.raw  # the correction is downwards here


def test_stratified_resamples_draw_each_class_from_itself():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    index = stratified_index(labels, 6, 500, torch.Generator().manual_seed(0))
    assert (labels[index] == labels).all()  # position k always holds a member of k's class
    assert set(index[:, 5].tolist()) == {5} and set(index[:, 0].tolist()) == {0, 1, 2}
    plain = stratified_index(None, 6, 500, torch.Generator().manual_seed(0))
    assert not (labels[plain] == labels).all()


def test_stratified_fid_interval_is_narrower_when_classes_differ():
    # two well-separated classes at fixed counts: an unstratified resample mixes their shares, and widens the interval
    g = torch.Generator().manual_seed(3)
    shift = torch.zeros(4, dtype=torch.float64)
    shift[0] = 6.0
    labels = torch.arange(200) % 2
    gen = torch.randn(200, 4, generator=g, dtype=torch.float64) + labels[:, None] * shift
    real_labels = torch.arange(400) % 2
    real = torch.randn(400, 4, generator=g, dtype=torch.float64) + real_labels[:, None] * shift + 0.3
    by_class = fid_estimate(gen, real, labels, real_labels, n_boot=400)
    mixed = fid_estimate(gen, real, n_boot=400)
    assert by_class.high - by_class.low < 0.8 * (mixed.high - mixed.low)


def test_paired_difference_covers_the_true_difference_and_calls_ties(one_thread):
    a, b, true = _gaussians()
    g = torch.Generator().manual_seed(4)
    covered = ties = 0
    draws = 40
    for seed in range(draws):
        real = (b(1000, g), None)
        diff = fid_difference((a(300, g), None), (b(300, g), None), real, n_boot=200, seed=seed)
        covered += diff.low <= true - 0.0 <= diff.high  # FID(b, b) = 0: the true difference is `true`
        same = fid_difference((a(300, g), None), (a(300, g), None), real, n_boot=200, seed=seed)
        ties += same.verdict == "tie"
    assert 0.85 <= covered / draws <= 1.0, covered / draws
    assert ties / draws >= 0.85, ties / draws


def test_paired_difference_sees_what_overlapping_intervals_miss():
    # a small real improvement: the two FIDs' own intervals overlap, the paired difference excludes 0
    a, b, _ = _gaussians()
    g = torch.Generator().manual_seed(5)
    real = b(1000, g)
    close = a(300, g)  # a model some way from the real images (FID 1.34)
    off = a(300, g) - 0.1  # and one a little further: every feature shifted
    better, worse = fid_estimate(close, real, n_boot=300), fid_estimate(off, real, n_boot=300)
    assert better.high > worse.low  # the old test calls this a tie
    diff = fid_difference((close, None), (off, None), (real, None), n_boot=300)
    assert diff.high < 0 and diff.verdict == "better"
    assert fid_difference((off, None), (close, None), (real, None), n_boot=300).verdict == "worse"


def test_accuracy_difference_and_verdicts():
    labels = torch.arange(300) % 10
    g = torch.Generator().manual_seed(6)
    good, poor = torch.rand(300, generator=g) < 0.9, torch.rand(300, generator=g) < 0.6
    diff = accuracy_difference((good, labels), (poor, labels), n_boot=500)
    assert diff.low > 0 and diff.verdict == "better"  # higher accuracy is better
    assert accuracy_difference((poor, labels), (good, labels), n_boot=500).verdict == "worse"
    assert Difference(0.01, -0.02, 0.04).verdict == "tie"
    assert Difference(-3.0, -5.0, -1.0).verdict == "better" and Difference(3.0, 1.0, 5.0).verdict == "worse"


def test_kid_matches_a_hand_computation_and_torchmetrics():
    x = torch.tensor([[0.0, 1.0], [1.0, 0.5], [2.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)

    def k(u, v):  # (u.v / d + 1)^3
        return (sum(a * b for a, b in zip(u, v, strict=True)) / 2 + 1) ** 3

    m = 3
    xs, ys = x.tolist(), y.tolist()
    same = sum(k(xs[i], xs[j]) + k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m)) / m**2
    assert mmd2_unbiased(x, y) == pytest.approx(same - 2 * cross)
    mean, std = kid(x, y, subsets=1, subset_size=3)  # one subset of all: a permutation, the same MMD
    assert mean == pytest.approx(same - 2 * cross) and std == 0.0

    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(7)
    fa, fb = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    assert mmd2_unbiased(fa, fb) == pytest.approx(float(poly_mmd(fa, fb)))


def test_kid_is_unbiased_where_fid_is_not():
    g = torch.Generator().manual_seed(8)
    values = [kid(torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g), subsets=1)[0] for _ in range(200)]
    mean = sum(values) / len(values)
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    assert abs(mean) < 3 * se  # one distribution twice: KID's expectation is 0
    assert fid(torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)) > 0.05  # FID's is not
