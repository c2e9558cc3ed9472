import pytest
import torch

from cdiff.errors import CdiffError
from cdiff.samplers import Sampler, ddim_timesteps, guided_eps, sample


def test_ddim_eta0_is_deterministic_for_a_seed(tiny_model, schedule):
    ddim = Sampler("ddim", 5, guidance_scale=2.0)
    a = sample(tiny_model, schedule, [0, 1], ddim, seed=3, progress=False)
    b = sample(tiny_model, schedule, [0, 1], ddim, seed=3, progress=False)
    c = sample(tiny_model, schedule, [0, 1], ddim, seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 1, 12, 12) and a.abs().max() <= 1


def test_ddpm_is_seeded(tiny_model, schedule):
    a = sample(tiny_model, schedule, [2], Sampler("ddpm", None), seed=1, progress=False)
    b = sample(tiny_model, schedule, [2], Sampler("ddpm", None), seed=1, progress=False)
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


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"guidance_scale": float("nan")}, "sampler.guidance_scale"),
        ({"guidance_scale": -1.0}, "sampler.guidance_scale"),
        ({"eta": float("inf")}, "sampler.eta"),
        ({"kind": "euler"}, "sampler.sampler: unknown sampler 'euler'"),
        ({"steps": 0}, "sampler.steps"),
        ({"kind": "ddpm", "steps": 50}, "ddpm takes no step count"),
    ],
)
def test_bad_sampler_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(CdiffError, match=message) as err:
        Sampler(**kwargs)
    assert "\n" not in str(err.value)


def test_sampler_labels_parse_back():
    for spec in ("ddpm", "ddim-1", "ddim-50"):
        s = Sampler.parse(spec, eta=0.5, guidance_scale=3.0)
        assert s.label == spec and Sampler.parse(s.label, s.eta, s.guidance_scale) == s
    assert Sampler.of("ddpm", 50) == Sampler("ddpm", None)  # a step count means nothing to ddpm
    assert str(Sampler("ddim", 20, 0.0, 2.0)) == "ddim-20, guidance 2"
    for bad in ("ddim", "ddim-0", "ddim-x", "ddpm-10", "dpm-3", ""):
        with pytest.raises(CdiffError, match="unknown sampler"):
            Sampler.parse(bad, key="evaluate.sampler_sweep")


def test_ddpm_and_ddim_differ_and_follow_the_setting(tiny_model, schedule):
    ddpm = sample(tiny_model, schedule, [0], Sampler("ddpm", None), seed=0, progress=False)
    ddim = sample(tiny_model, schedule, [0], Sampler("ddim", 5), seed=0, progress=False)
    ddim_guided = sample(tiny_model, schedule, [0], Sampler("ddim", 5, guidance_scale=1.0), seed=0, progress=False)
    assert not torch.equal(ddpm, ddim) and not torch.equal(ddim, ddim_guided)


class _Oracle(torch.nn.Module):
    """The exact eps-predictor for data that is one fixed image c: eps = (x_t - sqrt(abar) c) / sqrt(1 - abar)."""

    def __init__(self, schedule, c):
        super().__init__()
        self.abar, self.c = schedule.alphas_cumprod, c
        self.prompt = type("Prompt", (), {"null_id": 3})()
        self.config = type("Config", (), {"channels": 1, "image_size": 4})()

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.c) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_land_on_the_data_with_an_exact_model(schedule, sampler):
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    out = sample(_Oracle(schedule, c), schedule, [0, 1], Sampler.of(sampler, 10, guidance_scale=2.0), progress=False)
    assert torch.allclose(out, c.expand(2, -1, -1, -1), atol=1e-3)


def test_ddpm_posterior_mean_without_clip_matches_the_eps_form(schedule):
    """With clip=False the x0-form posterior mean equals Ho et al.'s eps form, step for step."""
    from cdiff.samplers import ddpm_sample

    torch.manual_seed(0)
    model = lambda x, t, y: torch.tanh(x) * 0.5 + 0.1 * t.view(-1, 1, 1, 1) / 50  # noqa: E731
    model.prompt = None
    y = torch.zeros(2, dtype=torch.long)
    ours = ddpm_sample(model, schedule, y, (2, 1, 4, 4), torch.Generator().manual_seed(0), progress=False, clip=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 4, 4), generator=g)
    b, a, abar = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    for i in range(schedule.timesteps - 1, -1, -1):
        eps = model(x, torch.full((2,), i), y)
        mean = (x - b[i] / (1 - abar[i]).sqrt() * eps) / a[i].sqrt()
        x = (
            mean + (b[i] * (1 - abar[i - 1]) / (1 - abar[i])).sqrt() * torch.randn((2, 1, 4, 4), generator=g)
            if i
            else mean
        )
    assert torch.allclose(ours, x.clamp(-1, 1), atol=1e-3)  # two float32 forms of one formula
