"""Training jobs: one typed value; build_model makes the same model for Ray Train and Tune; stable run names."""

import dataclasses

import pytest
import torch

from cdiff.config import DiffusionConfig, LoraConfig, TrainConfig
from cdiff.data import ImageSet
from cdiff.lora import lora_layers
from cdiff.model import UNet
from pipelines.core.jobs import TrainJob, Weights, build_model, run_name, train_job
from tests.conftest import tiny_config


def _data(n=12) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8), torch.arange(n) % 3,
                    ["a", "b", "c"])  # fmt: skip


def _job(kind="base", **overrides) -> TrainJob:
    torch.manual_seed(1)
    base = Weights.of(UNet(tiny_config(), ["x", "y", "z"])) if kind != "base" else None
    lora = LoraConfig(r=2, alpha=2.0) if kind == "lora" else None
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2)
    job = TrainJob(kind, tiny_config(), DiffusionConfig(timesteps=20), cfg, _data(), 0, 1, lora, base)
    return dataclasses.replace(job, **overrides)


def test_a_job_says_what_trains_and_refuses_a_mixture():
    assert [_job(k).kind for k in ("base", "lora", "full")] == ["base", "lora", "full"]
    with pytest.raises(ValueError):
        _job("base", base=Weights.of(UNet(tiny_config())))  # a fresh model has no base weights
    with pytest.raises(ValueError):
        _job("full", lora=LoraConfig())  # a full fine-tune has no adapter
    with pytest.raises(ValueError):
        _job("lora", lora=None)


def test_build_model_is_the_same_model_each_time_and_takes_the_jobs_classes():
    job = _job("lora")
    a, b = build_model(job), build_model(job)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.class_names == ["a", "b", "c"] and [layer.r for layer in lora_layers(a)] == [2] * len(lora_layers(a))
    base = build_model(_job("full"))
    assert all(torch.equal(base.state_dict()[k], v) for k, v in _job("full").base.state.items())


def test_run_names_follow_the_job_and_nothing_else():
    job = _job("lora")
    assert run_name(job) == run_name(_job("lora")) and run_name(job).startswith("lora-")
    assert run_name(dataclasses.replace(job, seed=1)) != run_name(job)
    assert run_name(dataclasses.replace(job, train=dataclasses.replace(job.train, lr=1e-4))) != run_name(job)
    assert run_name(dataclasses.replace(job, data=_data(9))) != run_name(job)


def test_train_job_trains_what_the_job_says():
    job = _job("lora")
    model = build_model(job)
    state = train_job(model, job, progress=False)
    assert state.step == 2 and [s for s, _ in state.losses] == [1, 2]


def test_a_domains_lora_variant_reaches_the_layers_it_trains():
    # data.domains.D.lora.use_rslora / use_dora (params) -> the job's layers, and a new Ray run name
    plain = build_model(_job("lora"))
    for variant in ("use_rslora", "use_dora"):
        job = _job("lora", lora=LoraConfig(r=2, alpha=2.0, **{variant: True}))
        layers = lora_layers(build_model(job))
        assert layers and all(getattr(layer, variant) for layer in layers)
        assert not any(getattr(layer, variant) for layer in lora_layers(plain))
        assert run_name(job) != run_name(_job("lora"))
    rs = lora_layers(build_model(_job("lora", lora=LoraConfig(r=4, alpha=2.0, use_rslora=True))))[0]
    assert rs.scaling == pytest.approx(2.0 / 2)  # alpha / sqrt(r), not alpha / r
