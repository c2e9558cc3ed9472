"""Typed config: dataclasses built once from params.yaml, validated with one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cdiff.errors import CdiffError


@dataclass
class ModelConfig:
    image_size: int = 28
    channels: int = 1  # 1 (grey) or 3 (RGB)
    num_classes: int = 10  # class ids 0..num_classes-1; id num_classes is the "null" prompt for guidance
    base_channels: list[int] = field(default_factory=lambda: [24, 48, 96])  # one entry per UNet level
    n_ctx: int = 4  # prompt tokens per class: several, so softmax attention is not constant
    ctx_dim: int = 64  # width of each prompt token
    attn_dim: int = 64  # width of q, k, v (split over n_heads)
    n_heads: int = 4
    ff_mult: int = 2  # feed-forward width = ff_mult * channels
    time_dim: int = 128

    def validate(self, key: str = "model") -> None:
        _check(self.image_size >= 8, f"{key}.image_size", "must be at least 8")
        _check(self.channels in (1, 3), f"{key}.channels", "must be 1 or 3")
        _check(self.num_classes >= 1, f"{key}.num_classes", "must be at least 1")
        _check(len(self.base_channels) >= 1, f"{key}.base_channels", "needs at least one level")
        for c in self.base_channels:
            _check(c >= 4 and c % 4 == 0, f"{key}.base_channels", "entries must be multiples of 4 (GroupNorm)")
        for name in ("n_ctx", "ctx_dim", "attn_dim", "n_heads", "ff_mult", "time_dim"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        _check(self.attn_dim % self.n_heads == 0, f"{key}.attn_dim", "must be divisible by n_heads")
        _check(self.time_dim % 2 == 0, f"{key}.time_dim", "must be even")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p_uncond: float = 0.1  # share of training labels replaced by the null prompt, for guidance
    prediction: str = "eps"  # what the network outputs: eps | v | x0 (saved with the model; older models: eps)
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5; 0: plain MSE

    def validate(self, key: str = "diffusion") -> None:
        _check(self.timesteps >= 2, f"{key}.timesteps", "must be at least 2")
        _check(self.beta_schedule in ("linear", "cosine"), f"{key}.beta_schedule", "must be linear or cosine")
        _check(0 < self.beta_start < self.beta_end < 1, f"{key}.beta_start", "need 0 < beta_start < beta_end < 1")
        _check(0 <= self.p_uncond < 1, f"{key}.p_uncond", "must be in [0, 1)")
        _check(self.prediction in PREDICTIONS, f"{key}.prediction", f"must be one of {', '.join(PREDICTIONS)}")
        _check(math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0, f"{key}.min_snr_gamma", "must be >= 0")


PREDICTIONS = ("eps", "v", "x0")
PRECISIONS = ("fp32", "bf16")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128  # the global batch, split over workers
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 50
    precision: str = "fp32"  # fp32 | bf16 (autocast; for GPUs: on a CPU without native bf16 it is far slower)
    channels_last: bool = False  # NHWC memory format (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model (falls back to eager if compiling fails); GPUs, long runs

    def validate(self, key: str) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        _check(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", "must be a positive number")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 turns clipping off)")
        _check(0 <= self.ema_decay < 1, f"{key}.ema_decay", "must be in [0, 1)")
        _check(self.precision in PRECISIONS, f"{key}.precision", f"must be one of {', '.join(PRECISIONS)}")


@dataclass
class LoraConfig:
    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["w_q", "w_k", "w_v"])
    extra_trainable: list[str] = field(default_factory=list)  # e.g. ["prompt"]: saved with the adapter

    def validate(self, key: str) -> None:
        _check(self.r >= 1, f"{key}.r", "LoRA rank must be at least 1")
        _check(self.alpha > 0, f"{key}.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)")
        _check(len(self.targets) >= 1, f"{key}.targets", "needs at least one module name")


@dataclass
class DomainConfig:
    source: str
    transforms: list[str]  # required, even if [] (dvc.yaml tracks it as a param)
    name: str = ""  # a domain's name is its key under data.domains
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, key: str) -> None:
        from cdiff.data import check_source, parse_transforms

        _check(_safe_name(self.name), f"{key}.name", "use letters, digits, '-' and '_' only")
        check_source(self.source, f"{key}.source")
        parse_transforms(self.transforms, f"{key}.transforms")
        self.lora.validate(f"{key}.lora")


@dataclass
class DataConfig:
    base: DomainConfig
    domains: dict[str, DomainConfig] = field(default_factory=dict)  # name -> domain; DVC's foreach key
    root: str = "data/raw"  # where torchvision-style datasets live or download to
    download: bool = False  # allow torchvision downloads
    val_fraction: float = 0.1  # held out of each training split for validation loss

    def validate(self, key: str = "data") -> None:
        self.base.validate(f"{key}.base")
        _check(0 < self.val_fraction < 0.5, f"{key}.val_fraction", "must be in (0, 0.5)")
        for name, d in self.domains.items():
            d.name = name
            d.validate(f"{key}.domains.{name}")
            _check(name != self.base.name, f"{key}.domains.{name}", "a domain must not share the base's name")
            _check(name != "base", f"{key}.domains.{name}", "'base' names the base dataset: choose another name")


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

    def validate(self, key: str = "tune") -> None:
        for name in ("num_samples", "max_concurrent", "steps_per_trial", "eval_every", "val_images", "batch_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        _check(self.ranks and all(r >= 1 for r in self.ranks), f"{key}.ranks", "LoRA ranks must be >= 1")
        _check(self.alpha_ratios and all(a > 0 for a in self.alpha_ratios), f"{key}.alpha_ratios", "must be > 0")
        _check(0 < self.lr_min <= self.lr_max, f"{key}.lr_min", "need 0 < lr_min <= lr_max")
        _check(1 <= self.grace_period <= self.steps_per_trial, f"{key}.grace_period", "must be in [1, steps]")
        _check(self.reduction_factor >= 2, f"{key}.reduction_factor", "must be at least 2")


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddpm | ddim | dpm++2m
    steps: int = 50  # model calls for ddim and dpm++2m (ddpm takes all T)
    eta: float = 0.0  # ddim only
    guidance_scale: float = 2.0
    per_class: int = 8
    batch_size: int = 250  # images per sampling batch (thousands fill a GPU)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the network; the sampler's update stays fp32)
    compile: bool = False  # torch.compile the network for sampling (falls back to eager if compiling fails)

    def validate(self, key: str = "sample") -> None:
        _check(self.sampler in SAMPLERS, f"{key}.sampler", f"must be one of {', '.join(SAMPLERS)}")
        _check(self.steps >= 1, f"{key}.steps", "must be at least 1")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _check(self.precision in PRECISIONS, f"{key}.precision", f"must be one of {', '.join(PRECISIONS)}")
        _check(self.eta >= 0, f"{key}.eta", "must be >= 0")
        _check(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, f"{key}.guidance_scale", ">= 0")
        _check(self.per_class >= 1, f"{key}.per_class", "must be at least 1")


@dataclass
class JudgeConfig:
    """The small CNN classifier that judges samples: GAN-test accuracy and FID in its feature space."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32  # channels of its first conv layer (then 2x)
    features: int = 64  # width of the penultimate layer: the FID feature space

    def validate(self, key: str = "judge") -> None:
        for name in ("steps", "batch_size", "width", "features"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        _check(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", "must be a positive number")


@dataclass
class EvaluateConfig:
    val_images: int = 512  # held-out images for the deterministic validation loss
    fid_per_class: int = 30  # generated (and real-train floor) images per class for FID and GAN-test accuracy
    sweep_per_class: int = 6  # images per class for each point of the base's guidance and sampler sweeps
    guidance_sweep: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    sampler_sweep: list[str] = field(default_factory=lambda: ["ddpm", "ddim-20", "ddim-50", "ddim-100"])
    full_finetune: list[str] = field(default_factory=list)  # domains that also get a full fine-tune reference

    def validate(self, key: str = "evaluate") -> None:
        for name in ("val_images", "fid_per_class", "sweep_per_class"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        for g in self.guidance_sweep:
            _check(math.isfinite(g) and g >= 0, f"{key}.guidance_sweep", "entries must be numbers >= 0")
        for spec in self.sampler_sweep:
            parse_sampler(spec, f"{key}.sampler_sweep")


def parse_sampler(spec: str, key: str = "sampler") -> tuple[str, int | None]:
    """'ddpm' -> ('ddpm', None) (all T steps); 'ddim-50' -> ('ddim', 50); 'dpm++2m-20' -> ('dpm++2m', 20)."""
    name, _, steps = spec.partition("-")
    if name == "ddpm" and not steps:
        return "ddpm", None
    if name in ("ddim", "dpm++2m") and steps.isdigit() and int(steps) >= 1:
        return name, int(steps)
    raise CdiffError(f"{key}: unknown sampler {spec!r}: use ddpm, ddim-N or dpm++2m-N (e.g. dpm++2m-20)")


@dataclass
class RayConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    num_cpus: int = 2  # size of the local Ray instance when RAY_ADDRESS is unset
    storage_path: str = "ray_results"
    max_failures: int = 2

    def validate(self, key: str = "ray") -> None:
        _check(self.num_workers >= 1, f"{key}.num_workers", "must be at least 1")
        _check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
        _check(self.num_cpus >= 1, f"{key}.num_cpus", "must be at least 1")
        _check(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1: retry forever)")


@dataclass
class MlflowConfig:
    experiment: str = "cdiff"
    base_model_name: str = "cdiff-base"
    adapter_model_prefix: str = "cdiff-adapter-"

    def validate(self, key: str = "mlflow") -> None:
        _check(bool(self.experiment), f"{key}.experiment", "must not be empty")


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
        self.train.full.validate("train.full")
        self.judge.validate()
        self.evaluate.validate()
        for name in self.evaluate.full_finetune:
            _check(name in self.data.domains, "evaluate.full_finetune", f"{name!r} is not a domain in data.domains")
        self.ray.validate()
        self.mlflow.validate()

    def domain(self, name: str) -> DomainConfig:
        if name not in self.data.domains:
            raise CdiffError(f"unknown domain {name!r}: params.yaml data.domains has {', '.join(self.data.domains)}")
        return self.data.domains[name]


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"params file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise CdiffError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    params = from_dict(Params, raw, "")
    params.validate()
    return params


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for k in keys:
            if keys.count(k) > 1:
                raise CdiffError(f"duplicate key {k!r} in params.yaml (line {node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, raw, key: str):
    """Build dataclass `cls` from plain data, checking types and refusing unknown keys."""
    if not isinstance(raw, dict):
        raise CdiffError(f"{key or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise CdiffError(f"{_join(key, k)}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], _join(key, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CdiffError(f"{_join(key, f.name)}: missing required key")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise CdiffError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise CdiffError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise CdiffError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CdiffError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CdiffError(f"{key}: expected a number, got {value!r}")
        if math.isnan(value):
            raise CdiffError(f"{key}: NaN is not allowed")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CdiffError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {key}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _check(ok, key: str, msg: str) -> None:
    if not ok:
        raise CdiffError(f"{key}: {msg}")


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name) and name.isascii()
