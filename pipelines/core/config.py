"""The pipeline's settings: the whole params.yaml as `Params`, and the sections only the pipeline reads.

The library's sections (model, diffusion, train, LoRA, data, sample, judge) are cdiff.config's;
Ray, Tune, MLflow and evaluation settings are here. Built once per stage by `load_params`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from cdiff.config import (
    DataConfig,
    DiffusionConfig,
    DomainConfig,
    JudgeConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    from_dict,
    read_yaml,
)
from cdiff.errors import CdiffError
from cdiff.samplers import Sampler
from pipelines.core.layout import paths

OBJECTIVES = ("val_loss", "fid", "gan_test")  # fid and gan_test: the domain's judge scores the trial's samples
SEARCHES = ("random", "tpe")
VARIANTS = ("lora", "rslora", "dora")  # plain LoRA, rank-stabilised (alpha / sqrt(r)), DoRA
UP_PATH = r"up\..*"  # the UNet's up path, as a rank_pattern key (module names up.0.attn.w_q, ...)


def with_variant(lora, variant: str, up_r: int | None):
    """A LoraConfig as a Tune trial (or the fine-tune of its best) trains it: the variant, the up path's rank."""
    pattern = {**lora.rank_pattern, UP_PATH: up_r} if up_r is not None else lora.rank_pattern
    return replace(lora, use_rslora=variant == "rslora", use_dora=variant == "dora", rank_pattern=pattern)


def variant_of(lora) -> str:
    return "dora" if lora.use_dora else "rslora" if lora.use_rslora else "lora"


PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies


@dataclass
class TuneConfig:
    num_samples: int = 4
    max_concurrent: int = 2
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    alpha_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # alpha = ratio * r
    lr_min: float = 5e-4
    lr_max: float = 1e-2
    steps_per_trial: int = 300  # the budget of one trial (ASHA's max_t)
    eval_every: int = 50  # a validation loss every this many steps: ASHA's rungs
    grace_period: int = 100
    reduction_factor: int = 2
    val_images: int = 256
    batch_size: int = 64
    objective: str = "val_loss"  # what the search minimises (val_loss, fid) or maximises (gan_test)
    objective_per_class: int = 10  # generated images per class for a judge objective, at each ASHA rung
    objective_sampler: str = "dpm++2m-10"  # how those images are sampled (a label: ddpm, ddim-N, dpm++2m-N)
    objective_guidance: float = 2.0
    search: str = "random"  # random sampling, or Optuna's TPE ("tpe"); both with ASHA
    variants: list[str] = field(default_factory=lambda: ["lora"])  # searched among lora, rslora and dora
    up_ranks: list[int] = field(default_factory=list)  # the up path's own rank, searched ([]: the trial's r)
    trials_per_gpu: int = 1  # with ray.use_gpu: trials that share one GPU (each takes 1/n of it), run side by side

    @property
    def mode(self) -> str:
        return "max" if self.objective == "gan_test" else "min"

    @property
    def sampler(self) -> Sampler:
        """How a judge objective samples each trial's images."""
        return Sampler.parse(
            self.objective_sampler, guidance_scale=self.objective_guidance, key="tune.objective_sampler"
        )

    def validate(self, key: str = "tune") -> None:
        for name in ("num_samples", "max_concurrent", "steps_per_trial", "eval_every", "val_images", "batch_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        _check(self.ranks and all(r >= 1 for r in self.ranks), f"{key}.ranks", "LoRA ranks must be >= 1")
        _check(self.alpha_ratios and all(a > 0 for a in self.alpha_ratios), f"{key}.alpha_ratios", "must be > 0")
        _check(0 < self.lr_min <= self.lr_max, f"{key}.lr_min", "need 0 < lr_min <= lr_max")
        _check(1 <= self.grace_period <= self.steps_per_trial, f"{key}.grace_period", "must be in [1, steps]")
        _check(self.reduction_factor >= 2, f"{key}.reduction_factor", "must be at least 2")
        _check(self.objective in OBJECTIVES, f"{key}.objective", f"must be one of {', '.join(OBJECTIVES)}")
        judged = self.objective != "val_loss"  # fid and gan_test score generated images; fid fits a covariance
        _check(
            self.objective_per_class >= (2 if judged else 1),
            f"{key}.objective_per_class",
            f"must be at least {'2 for a judge objective' if judged else 1}",
        )
        _check(
            math.isfinite(self.objective_guidance) and self.objective_guidance >= 0,
            f"{key}.objective_guidance",
            "must be a number >= 0",
        )
        Sampler.parse(self.objective_sampler, guidance_scale=self.objective_guidance, key=f"{key}.objective_sampler")
        _check(self.search in SEARCHES, f"{key}.search", f"must be one of {', '.join(SEARCHES)}")
        _check(
            bool(self.variants)
            and set(self.variants) <= set(VARIANTS)
            and len(set(self.variants)) == len(self.variants),
            f"{key}.variants",
            f"must list each of {', '.join(VARIANTS)} at most once, at least one",
        )
        _check(all(1 <= r <= 4096 for r in self.up_ranks), f"{key}.up_ranks", "LoRA ranks must be in [1, 4096]")
        _check(1 <= self.trials_per_gpu <= 64, f"{key}.trials_per_gpu", "must be in [1, 64]")


@dataclass
class EvaluateConfig:
    val_images: int = 512  # held-out images for the deterministic validation loss
    fid_per_class: int = 30  # generated (and real-train floor) images per class for FID and GAN-test accuracy
    sweep_per_class: int = 6  # images per class for each point of the base's guidance and sampler sweeps
    guidance_sweep: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    sampler_sweep: list[str] = field(default_factory=lambda: ["ddpm", "ddim-20", "ddim-50", "ddim-100"])
    full_finetune: list[str] = field(default_factory=list)  # domains that also get a full fine-tune reference
    cas_steps: int = 300  # the classification accuracy score's classifier: the judge's, trained this long (0: none)

    def cas(self, judge: JudgeConfig) -> JudgeConfig | None:
        """The classifier the CAS trains on each generated set: the judge's architecture, `cas_steps` long."""
        return replace(judge, steps=self.cas_steps) if self.cas_steps else None

    def validate(self, key: str = "evaluate") -> None:
        _check(self.val_images >= 1, f"{key}.val_images", "must be at least 1")
        _check(0 <= self.cas_steps <= 10**6, f"{key}.cas_steps", "must be in [0, 1000000] (0: no CAS)")
        for name in ("fid_per_class", "sweep_per_class"):  # an FID fits a covariance to each model's features
            _check(getattr(self, name) >= 2, f"{key}.{name}", "FID needs at least 2 images per class")
        for g in self.guidance_sweep:
            _check(math.isfinite(g) and g >= 0, f"{key}.guidance_sweep", "entries must be numbers >= 0")
        for spec in self.sampler_sweep:
            Sampler.parse(spec, key=f"{key}.sampler_sweep")


@dataclass
class RayConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    num_cpus: int = 2  # size of the local Ray instance when RAY_ADDRESS is unset
    num_gpus: int | None = None  # GPUs of that local instance (None: the ones Ray finds)
    storage_path: str = "ray_results"
    max_failures: int = 2
    placement_strategy: str = "PACK"  # of Ray Train's workers: SPREAD puts them on different nodes where it can

    def validate(self, key: str = "ray") -> None:
        _check(self.num_workers >= 1, f"{key}.num_workers", "must be at least 1")
        _check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
        _check(self.num_cpus >= 1, f"{key}.num_cpus", "must be at least 1")
        _check(self.num_gpus is None or 0 <= self.num_gpus <= 1024, f"{key}.num_gpus", "must be in [0, 1024] or null")
        _check(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1: retry forever)")
        _check(
            self.placement_strategy in PLACEMENTS,
            f"{key}.placement_strategy",
            f"must be one of {', '.join(PLACEMENTS)}",
        )


@dataclass
class MlflowConfig:
    experiment: str = "cdiff"
    base_model_name: str = "cdiff-base"
    adapter_model_prefix: str = "cdiff-adapter-"

    def validate(self, key: str = "mlflow", domains: tuple[str, ...] = ()) -> None:
        _check_mlflow_name(self.experiment, f"{key}.experiment")
        _check_mlflow_name(self.base_model_name, f"{key}.base_model_name")
        _check(
            isinstance(self.adapter_model_prefix, str) and len(self.adapter_model_prefix) <= 60,
            f"{key}.adapter_model_prefix",
            "must be text of at most 60 characters",
        )
        for name in domains:
            adapter = self.adapter_model_prefix + name
            _check_mlflow_name(adapter, f"{key}.adapter_model_prefix", f"{adapter[:60]!r} (the model of domain {name})")
            _check(adapter != self.base_model_name, f"{key}.adapter_model_prefix", f"gives {name!r} the base's name")


@dataclass
class TrainSection:
    base: TrainConfig = field(default_factory=TrainConfig)
    lora: TrainConfig = field(default_factory=TrainConfig)
    full: TrainConfig = field(default_factory=TrainConfig)  # the full fine-tune reference (evaluate.full_finetune)


@dataclass
class Params:
    data: DataConfig
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainSection = field(default_factory=TrainSection)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.diffusion.validate()
        self.train.base.validate("train.base")
        self.train.lora.validate("train.lora")
        self.tune.validate()
        self.sample.validate()
        Sampler.from_config(self.sample)  # its kind, steps, eta and guidance, checked where the samplers live
        self.train.full.validate("train.full")
        self.judge.validate()
        self.evaluate.validate()
        for name in self.evaluate.full_finetune:
            _check(name in self.data.domains, "evaluate.full_finetune", f"{name!r} is not a domain in data.domains")
        self.ray.validate()
        self.mlflow.validate(domains=tuple(self.data.domains))
        for key, d in [
            ("data.base", self.data.base),
            *((f"data.domains.{n}", d) for n, d in self.data.domains.items()),
        ]:
            _check_image_folder(d.source, f"{key}.source")
        self._check_sampler_steps()  # each section on its own is checked above

    def _check_sampler_steps(self) -> None:
        """Every sampler the pipeline runs takes at most diffusion.timesteps steps: refused now, not after training."""
        T = self.diffusion.timesteps
        runs = [("sample.steps", self.sampler), ("tune.objective_sampler", self.tune.sampler)]
        runs += [
            ("evaluate.sampler_sweep", Sampler.parse(s, key="evaluate.sampler_sweep"))
            for s in self.evaluate.sampler_sweep
        ]
        for key, sampler in runs:
            steps = sampler.steps
            _check(steps is None or steps <= T, key, f"{sampler.label} takes {steps} steps; diffusion.timesteps is {T}")

    @property
    def sampler(self) -> Sampler:
        """The pipeline's sampling setting (`sample:`), as one value."""
        return Sampler.from_config(self.sample)

    def dataset(self, name: str) -> DomainConfig:
        """'base' -> the base dataset; a domain's name -> that domain."""
        return self.data.base if name == "base" else self.domain(name)

    def tuned(self, name: str, r: int, alpha: float, lr: float, variant: str | None = None, up_r=None) -> Params:
        """These params with a domain's LoRA rank, alpha and lr (and variant and up-path rank, where Tune searched
        them) replaced by tuned ones: what its fine-tune ran with."""
        d = self.domain(name)
        lora = replace(d.lora, r=r, alpha=alpha)
        lora = with_variant(lora, variant or variant_of(lora), up_r)
        domains = {**self.data.domains, name: replace(d, lora=lora)}
        train = replace(self.train, lora=replace(self.train.lora, lr=lr))
        return replace(self, data=replace(self.data, domains=domains), train=train)

    def domain(self, name: str) -> DomainConfig:
        if name not in self.data.domains:
            raise CdiffError(f"unknown domain {name!r}: params.yaml data.domains has {', '.join(self.data.domains)}")
        return self.data.domains[name]


def params() -> Params:
    """The stage's params: params.yaml at the repository root."""
    return load_params(paths.params_file)


def load_params(path: str | Path = "params.yaml") -> Params:
    params = from_dict(Params, read_yaml(path), "")
    params.validate()
    return params


def _check(ok, key: str, msg: str) -> None:
    if not ok:
        raise CdiffError(f"{key}: {msg}")


MLFLOW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_mlflow_name(name, key: str, named: str = "") -> None:
    """Experiment and registered model names: MLflow refuses '/' and ':' (after training, at registration),
    and the registry's searches quote names in filter strings: letters, digits, '.', '-' and '_' only."""
    ok = isinstance(name, str) and MLFLOW_NAME.fullmatch(name) and ".." not in name
    shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
    _check(ok, key, f"{named or shown} is not a name MLflow takes: use 1 to 100 letters, digits, '.', '-' or '_'")


def _check_image_folder(source: str, key: str) -> None:
    """An image folder must be a folder inside data/images/ (its own prepare stage depends on it in dvc.yaml)."""
    folder = source.removeprefix("imagefolder:")
    resolved, images = (paths.root / folder).resolve(), paths.images.resolve()
    inside = folder == source or (resolved != images and resolved.is_relative_to(images))
    where = paths.show(paths.images)
    _check(inside, key, f"image folders live under {where}/ (so DVC sees their changes): move or link {folder} there")
