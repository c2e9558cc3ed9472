"""A training job: what trains, on which data, from which weights. One typed value, sent whole to Ray.

`build_model(job)` is the one way a job's model is made and `train_job` the one way it trains, by
Ray Train's workers and by Tune's trials; `run_name(job)` is deterministic, so a rerun resumes the
same Ray run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from cdiff.config import DiffusionConfig, LoraConfig, ModelConfig, TrainConfig, to_dict
from cdiff.data import ImageSet
from cdiff.io import fingerprint
from cdiff.lora import inject_lora
from cdiff.model import UNet
from cdiff.samplers import Sampler
from cdiff.schedule import NoiseSchedule
from cdiff.train import TrainState, train

KINDS = ("base", "lora", "full")  # fresh weights | an adapter on frozen base weights | every base weight trains


@dataclass(frozen=True)
class Weights:
    """Model weights and their sha256 fingerprint: what a fine-tune starts from."""

    state: dict[str, torch.Tensor]
    fingerprint: str

    @classmethod
    def of(cls, model) -> Weights:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(state, fingerprint(state))


@dataclass(frozen=True)
class TrainJob:
    kind: str  # one of KINDS
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    data: ImageSet  # the training split; its class names become the model's
    seed: int
    threads: int = 1  # torch threads per worker
    lora: LoraConfig | None = None  # for kind "lora"
    base: Weights | None = None  # for kinds "lora" and "full"
    grid: Sampler | None = None  # how the grids of train.sample_every are sampled

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}: one of {KINDS}")
        if (self.base is None) != (self.kind == "base") or (self.lora is None) != (self.kind != "lora"):
            raise ValueError(f"a {self.kind} job needs base weights iff it fine-tunes, a LoRA config iff it is lora")


def build_model(job: TrainJob) -> UNet:
    """The model a job trains: fresh (base), base weights + LoRA (lora), or base weights (full)."""
    torch.manual_seed(job.seed)
    model = UNet(job.model, job.data.class_names)
    if job.base is not None:
        model.load_state_dict(job.base.state)
        model.prompt.class_names = list(job.data.class_names)
    if job.lora is not None:
        lora = job.lora
        settings = (lora.targets, lora.r, lora.alpha, lora.dropout, lora.extra_trainable)
        patterns = {"rank_pattern": lora.rank_pattern, "alpha_pattern": lora.alpha_pattern}
        inject_lora(model, *settings, use_rslora=lora.use_rslora, use_dora=lora.use_dora, **patterns)
    return model


def train_job(model, job: TrainJob, **loop) -> TrainState:
    """cdiff.train.train on the job's data, config, schedule, seed and label dropout; `loop`: rank, callbacks, ..."""
    return train(
        model, NoiseSchedule(job.diffusion), job.data, job.train, seed=job.seed, p_uncond=job.diffusion.p_uncond, **loop
    )


def run_name(job: TrainJob) -> str:
    """kind-<digest of everything the job trains from>: the same job gets the same name, and Ray resumes it."""
    public = {
        "seed": job.seed,
        "model": to_dict(job.model),
        "diffusion": to_dict(job.diffusion),
        "train": {k: v for k, v in to_dict(job.train).items() if k != "sample_every"},  # grids train nothing
        "class_names": job.data.class_names,
        "lora": to_dict(job.lora) if job.lora else None,
        "threads": job.threads,
        "data": fingerprint({"images": job.data.images, "labels": job.data.labels}),
        "base": job.base.fingerprint if job.base else None,
    }
    digest = hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()[:12]
    return f"{job.kind}-{digest}"


def job_for(
    p, kind: str, data: ImageSet, train: TrainConfig, *, base=None, lora=None, threads=None, grid=None
) -> TrainJob:
    """A job with the run's model, diffusion and seed (p: pipelines.core.config.Params); threads from
    ray.cpus_per_worker; `grid`: the sampler of the grids train.sample_every draws (None: no grids)."""
    threads = threads or max(1, int(p.ray.cpus_per_worker))
    grid = grid if train.sample_every else None
    return TrainJob(kind, p.model, p.diffusion, train, data, p.seed, threads, lora, base, grid)
