import pytest
import torch

from cdiff.config import DiffusionConfig
from cdiff.errors import CdiffError
from cdiff.samplers import Sampler, ddim_sample, ddim_timesteps, dpm_timesteps, dpmpp_2m_sample, guided_eps, sample
from cdiff.schedule import NoiseSchedule


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
    """The exact predictor for data that is one fixed image c: eps = (x_t - sqrt(abar) c) / sqrt(1 - abar),
    given as the schedule's prediction type (eps, v = alpha eps - sigma c, or x0 = c)."""

    def __init__(self, schedule, c):
        super().__init__()
        self.abar, self.c, self.prediction = schedule.alphas_cumprod, c, schedule.prediction
        self.prompt = type("Prompt", (), {"null_id": 3})()
        self.config = type("Config", (), {"channels": 1, "image_size": 4})()

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.c) / (1 - a).sqrt()
        return {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * self.c, "x0": self.c.expand_as(x)}[self.prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_samplers_land_on_the_data_with_an_exact_model(sampler, prediction):
    schedule = NoiseSchedule(DiffusionConfig(timesteps=50, prediction=prediction))
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    out = sample(_Oracle(schedule, c), schedule, [0, 1], Sampler.of(sampler, 10, guidance_scale=2.0), progress=False)
    assert torch.allclose(out, c.expand(2, -1, -1, -1), atol=1e-3)


class _GaussianOracle(torch.nn.Module):
    """The exact eps-predictor for data x0 ~ N(0, sd^2) per pixel: E[x0 | x_t] = alpha sd^2 / (abar sd^2 + 1 - abar) x_t."""

    def __init__(self, schedule, sd):
        super().__init__()
        self.abar, self.sd = schedule.alphas_cumprod, sd
        self.prompt = type("Prompt", (), {"null_id": 3})()

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        x0 = a.sqrt() * self.sd**2 / (a * self.sd**2 + 1 - a) * x
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def test_dpm_solver_is_second_order_on_the_probability_flow_ode():
    """For Gaussian data the ODE keeps x_t / sqrt(abar_t sd^2 + 1 - abar_t) fixed: its end point is known exactly.

    DDIM is the first-order solver of the same ODE; at equal model calls DPM++(2M) must be far closer.
    """
    schedule = NoiseSchedule(DiffusionConfig(timesteps=1000))
    sd, shape, y = 0.3, (64, 1, 4, 4), torch.zeros(64, dtype=torch.long)
    model = _GaussianOracle(schedule, sd)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a_T = schedule.alphas_cumprod[-1]
    exact = (sd * x_T / (a_T * sd**2 + 1 - a_T).sqrt()).clamp(-1, 1)

    def error(sampler, steps):
        out = sampler(model, schedule, y, shape, torch.Generator().manual_seed(0), steps, progress=False, clip=False)
        return (out - exact).abs().mean().item()

    for steps in (10, 20):
        assert error(dpmpp_2m_sample, steps) < 0.2 * error(ddim_sample, steps), steps
    assert error(dpmpp_2m_sample, 50) < 2e-3


def test_dpm_timesteps_are_distinct_and_span_the_schedule():
    schedule = NoiseSchedule(DiffusionConfig(timesteps=1000))
    for steps in (1, 2, 10, 50, 1000):
        ts = dpm_timesteps(schedule, steps)
        assert len(ts) == steps and ts[0] == 999 and ts == sorted(set(ts), reverse=True), steps
        assert steps == 1 or ts[-1] == 0
    ten = dpm_timesteps(schedule, 10)
    gaps = [a - b for a, b in zip(ten, ten[1:], strict=False)]
    assert gaps[-1] < 10 < gaps[0] < max(gaps)  # even in lambda: dense near t = 0, sparse in the middle
    with pytest.raises(CdiffError):
        dpm_timesteps(schedule, 1001)


def test_dpm_solver_is_seeded_and_in_range(tiny_model, schedule):
    a = sample(tiny_model, schedule, [0, 1], Sampler("dpm++2m", 5, guidance_scale=2.0), seed=3, progress=False)
    b = sample(tiny_model, schedule, [0, 1], Sampler("dpm++2m", 5, guidance_scale=2.0), seed=3, progress=False)
    assert torch.equal(a, b) and a.shape == (2, 1, 12, 12) and a.abs().max() <= 1


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


def test_the_cli_the_library_and_params_share_one_default_sampler():
    from pathlib import Path

    import yaml

    from cdiff.cli.parser import build_parser
    from cdiff.config import SampleConfig
    from cdiff.samplers import DEFAULT

    args = build_parser().parse_args(["sample", "models/base", "-o", "x.png"])
    cli = Sampler.of(args.sampler, args.steps, args.eta, args.guidance)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["sample"]
    pinned = Sampler.of(params["sampler"], params["steps"], params["eta"], params["guidance_scale"])
    assert DEFAULT == Sampler() == Sampler.from_config(SampleConfig()) == cli == pinned
    assert DEFAULT.label == "dpm++2m-20"
