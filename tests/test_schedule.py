import math

import torch

from cdiff.config import DiffusionConfig
from cdiff.schedule import NoiseSchedule, cosine_beta_schedule, drop_labels, linear_beta_schedule


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
