import pytest
import torch

from cdiff.errors import CdiffError
from cdiff.samplers import ddim_timesteps, guided_eps, sample


def test_ddim_eta0_is_deterministic_for_a_seed(tiny_model, schedule):
    a = sample(tiny_model, schedule, [0, 1], sampler="ddim", steps=5, seed=3, guidance_scale=2.0, progress=False)
    b = sample(tiny_model, schedule, [0, 1], sampler="ddim", steps=5, seed=3, guidance_scale=2.0, progress=False)
    c = sample(tiny_model, schedule, [0, 1], sampler="ddim", steps=5, seed=4, guidance_scale=2.0, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 1, 12, 12) and a.abs().max() <= 1


def test_ddpm_is_seeded(tiny_model, schedule):
    a = sample(tiny_model, schedule, [2], sampler="ddpm", seed=1, progress=False)
    b = sample(tiny_model, schedule, [2], sampler="ddpm", seed=1, progress=False)
    assert torch.equal(a, b)


def test_guidance_one_equals_conditional_prediction(tiny_model):
    tiny_model.eval()
    x, t, y = torch.randn(3, 1, 12, 12), torch.tensor([5, 10, 20]), torch.tensor([0, 1, 2])
    assert torch.equal(guided_eps(tiny_model, x, t, y, 1.0), tiny_model(x, t, y))
    cond, uncond = tiny_model(x, t, y), tiny_model(x, t, torch.full_like(y, 3))
    assert torch.allclose(guided_eps(tiny_model, x, t, y, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_ddim_timesteps_span_the_schedule():
    assert ddim_timesteps(1000, 1) == [999]
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and ts == sorted(ts, reverse=True)
    with pytest.raises(CdiffError):
        ddim_timesteps(10, 11)


def test_bad_guidance_is_refused(tiny_model, schedule):
    with pytest.raises(CdiffError):
        sample(tiny_model, schedule, [0], guidance_scale=float("nan"), progress=False)
