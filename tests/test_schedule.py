import math

import pytest
import torch

from cdiff.config import DiffusionConfig
from cdiff.schedule import NoiseSchedule, cosine_beta_schedule, diffusion_loss, drop_labels, linear_beta_schedule


def test_linear_schedule_hand_checked_values():
    betas = linear_beta_schedule(1000)
    assert betas[0].item() == 1e-4 and abs(betas[-1].item() - 0.02) < 1e-12
    abar = torch.cumprod(1 - betas, 0)
    assert abs(abar[0].item() - 0.9999) < 1e-12
    assert abar[-1].item() < 1e-4  # the last step is (almost) pure noise


def test_cosine_schedule_invariants():
    betas = cosine_beta_schedule(1000)
    assert (betas > 0).all() and (betas <= 0.999).all()
    abar = torch.cumprod(1 - betas, 0)
    assert (abar[1:] < abar[:-1]).all()
    expected_first = (math.cos((1 / 1000 + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)) ** 2
    assert abs(abar[0].item() - expected_first) < 1e-9


def test_q_sample_mixes_signal_and_noise_by_alpha_bar():
    s = NoiseSchedule(DiffusionConfig(timesteps=100))
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 99])
    x_t = s.q_sample(x0, t, noise)
    for i, ti in enumerate(t):
        a = s.alphas_cumprod[ti]
        assert torch.allclose(x_t[i], a.sqrt() * 1 + (1 - a).sqrt() * 2)


def test_label_dropout_uses_null_id():
    y = torch.tensor([0, 1, 2, 1])
    out = drop_labels(y, 0.1, 3, torch.tensor([0.05, 0.5, 0.09, 0.99]))
    assert out.tolist() == [3, 1, 3, 1]


def _hand_schedule(prediction="eps", gamma=5.0) -> NoiseSchedule:
    # betas 0.1, 0.3, 0.5, 0.7: alpha_bar = 0.9, 0.63, 0.315, 0.0945 and SNR = 9, 1.7027, 0.45985, 0.10436
    return NoiseSchedule(
        DiffusionConfig(timesteps=4, beta_start=0.1, beta_end=0.7, prediction=prediction, min_snr_gamma=gamma)
    )


def test_min_snr_weights_hand_computed():
    t = torch.tensor([0, 2])
    snr2 = 0.315 / 0.685
    assert torch.allclose(_hand_schedule().snr(t), torch.tensor([9.0, snr2]), rtol=1e-5)
    # eps: min(SNR, 5) / SNR; v: min(SNR, 5) / (SNR + 1); x0: min(SNR, 5)
    assert torch.allclose(_hand_schedule("eps").loss_weight(t), torch.tensor([5 / 9, 1.0]), rtol=1e-5)
    assert torch.allclose(_hand_schedule("v").loss_weight(t), torch.tensor([0.5, 0.315]), rtol=1e-5)
    assert torch.allclose(_hand_schedule("x0").loss_weight(t), torch.tensor([5.0, snr2]), rtol=1e-5)
    assert torch.equal(_hand_schedule("v", gamma=0.0).loss_weight(t), torch.ones(2))


class _Zero(torch.nn.Module):
    def forward(self, x, t, y):
        return torch.zeros_like(x)


def test_weighted_loss_hand_computed_case():
    """A network that outputs 0: the loss is the weighted mean of each sample's squared target."""
    x0 = torch.zeros(2, 1, 2, 2)
    noise = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    t, y, u = torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long), torch.ones(2)
    # eps: (5/9 * 1^2 + 1 * 2^2) / 2
    loss = diffusion_loss(_Zero(), _hand_schedule("eps"), x0, y, t, noise, u, 0.1, 3)
    assert loss.item() == pytest.approx((5 / 9 + 4) / 2, rel=1e-5)
    # v = alpha eps (x0 = 0): v^2 = 0.9 * 1 and 0.315 * 4, weights 0.5 and 0.315
    loss = diffusion_loss(_Zero(), _hand_schedule("v"), x0, y, t, noise, u, 0.1, 3)
    assert loss.item() == pytest.approx((0.5 * 0.9 + 0.315 * 0.315 * 4) / 2, rel=1e-5)
    # gamma = 0: the plain MSE against eps
    loss = diffusion_loss(_Zero(), _hand_schedule("eps", gamma=0.0), x0, y, t, noise, u, 0.1, 3)
    assert loss.item() == pytest.approx((1 + 4) / 2, rel=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_are_identities(prediction):
    s = NoiseSchedule(DiffusionConfig(timesteps=100, prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    x_t = s.q_sample(x0, t, noise)
    alpha, sigma = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    v = s.velocity(x0, t, noise)
    assert torch.allclose(v, alpha * noise - sigma * x0)
    # v <-> eps <-> x0, given x_t
    assert torch.allclose(sigma * x_t + alpha * v, noise, atol=1e-5)
    assert torch.allclose(alpha * x_t - sigma * v, x0, atol=1e-5)
    assert torch.allclose(s.predict_start_from_noise(x_t, t, noise), x0, atol=1e-4)
    assert torch.allclose(s.predict_noise_from_start(x_t, t, x0), noise, atol=1e-3)  # 1/sigma_0 = 100
    # the network's exact output in its own type gives back (x0, eps)
    start, eps = s.predict_start_and_noise(x_t, t, s.target(x0, t, noise))
    assert torch.allclose(start, x0, atol=1e-4) and torch.allclose(eps, noise, atol=1e-3)
