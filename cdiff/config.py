"""Typed config of the library (model, diffusion, training, LoRA, data, sampling, judge), and the typed loader.

Dataclasses built once from params.yaml, validated with one-line errors naming the key. The pipeline's
own settings (Ray, Tune, MLflow, evaluation) and the whole-file `Params` live in pipelines.core.config.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cdiff.errors import CdiffError, shown


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
        _range(self.image_size, 8, 1024, f"{key}.image_size")
        _check(self.channels in (1, 3), f"{key}.channels", "must be 1 or 3")
        _range(self.num_classes, 1, 100_000, f"{key}.num_classes")
        _check(1 <= len(self.base_channels) <= 8, f"{key}.base_channels", "needs 1 to 8 levels")
        for c in self.base_channels:
            _check(
                4 <= c <= 4096 and c % 4 == 0,
                f"{key}.base_channels",
                "entries must be multiples of 4 (GroupNorm) up to 4096",
            )
        for name, most in (
            ("n_ctx", 256),
            ("ctx_dim", 8192),
            ("attn_dim", 8192),
            ("n_heads", 256),
            ("ff_mult", 16),
            ("time_dim", 8192),
        ):
            _range(getattr(self, name), 1, most, f"{key}.{name}")
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
        _range(self.timesteps, 2, 100_000, f"{key}.timesteps")
        _check(self.beta_schedule in ("linear", "cosine"), f"{key}.beta_schedule", "must be linear or cosine")
        _check(0 < self.beta_start < self.beta_end < 1, f"{key}.beta_start", "need 0 < beta_start < beta_end < 1")
        _check(0 <= self.p_uncond < 1, f"{key}.p_uncond", "must be in [0, 1)")
        _check(self.prediction in PREDICTIONS, f"{key}.prediction", f"must be one of {', '.join(PREDICTIONS)}")
        _check(math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0, f"{key}.min_snr_gamma", "must be >= 0")


PREDICTIONS = ("eps", "v", "x0")
PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


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
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead: CUDA graphs of forward and backward
    noise_on_device: bool = (
        False  # draw t and noise on the training device (no host work; numbers then differ by device)
    )
    micro_batch: int = 0  # rows per forward/backward, gradients summed over them (0: a worker's whole batch at
    # once); the same gradient up to rounding, faster where a smaller working set fits a CPU's cache
    sample_every: int = 0  # the pipeline logs a seeded sample grid every this many steps (a multiple of
    # checkpoint_every; 0: none): MLflow's image slider shows the model learning

    def validate(self, key: str) -> None:
        for name in ("steps", "checkpoint_every", "log_every"):
            _range(getattr(self, name), 1, 10**8, f"{key}.{name}")
        _range(self.batch_size, 1, 65_536, f"{key}.batch_size")
        _check(0 < self.lr <= 1, f"{key}.lr", "must be a number in (0, 1]")
        _check(0 <= self.weight_decay <= 1, f"{key}.weight_decay", "must be in [0, 1]")
        _range(self.warmup_steps, 0, 10**8, f"{key}.warmup_steps")
        _range(self.micro_batch, 0, 65_536, f"{key}.micro_batch")
        _check(0 <= self.grad_clip <= 1e6, f"{key}.grad_clip", "must be in [0, 1e6] (0 turns clipping off)")
        _check(0 <= self.ema_decay < 1, f"{key}.ema_decay", "must be in [0, 1)")
        _check(self.precision in PRECISIONS, f"{key}.precision", f"must be one of {', '.join(PRECISIONS)}")
        _check_compile_mode(self.compile_mode, f"{key}.compile_mode")
        _range(self.sample_every, 0, 10**8, f"{key}.sample_every")
        _check(
            self.sample_every % self.checkpoint_every == 0,
            f"{key}.sample_every",
            f"must be a multiple of checkpoint_every ({self.checkpoint_every}): grids are drawn at checkpoints",
        )


@dataclass
class LoraConfig:
    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["w_q", "w_k", "w_v"])
    extra_trainable: list[str] = field(default_factory=list)  # e.g. ["prompt"]: saved with the adapter
    use_rslora: bool = False  # scale by alpha / sqrt(r), not alpha / r (rank-stabilised LoRA; PEFT's name)
    use_dora: bool = False  # DoRA: a trained magnitude per output row times the direction (PEFT's name)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT's: {module-name pattern: its own r}
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # {module-name pattern: its own alpha}

    def validate(self, key: str) -> None:
        _check(self.r >= 1, f"{key}.r", "LoRA rank must be at least 1")
        for name, pattern, low, high in (
            ("rank_pattern", self.rank_pattern, 0, 4096),
            ("alpha_pattern", self.alpha_pattern, 0, 4096),
        ):
            for k, v in pattern.items():
                try:
                    re.compile(rf"(.*\.)?{k}$")
                except re.error as e:
                    raise CdiffError(f"{key}.{name}: {k!r} is not a valid pattern ({e})") from None
                ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and low < v <= high
                ok = ok and (isinstance(v, int) or name == "alpha_pattern")
                _check(
                    ok,
                    f"{key}.{name}",
                    f"{k!r}: must be {'an integer rank' if name == 'rank_pattern' else 'an alpha'} in ({low}, {high}]",
                )
        _check(self.r <= 4096, f"{key}.r", "LoRA rank must be at most 4096")
        _check(0 < self.alpha <= 4096, f"{key}.alpha", "must be in (0, 4096]")
        _check(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)")
        _check(len(self.targets) >= 1, f"{key}.targets", "needs at least one module name")
        for name in [*self.targets, *self.extra_trainable]:
            _check(bool(name.strip()), f"{key}.targets", "module names must not be empty")


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
    background: str = "white"  # what image folders' transparent pixels are composited onto: white or black

    def validate(self, key: str = "data") -> None:
        from cdiff.data import BACKGROUNDS

        self.base.validate(f"{key}.base")
        _check(self.background in BACKGROUNDS, f"{key}.background", f"must be one of {', '.join(BACKGROUNDS)}")
        _check(0 < self.val_fraction < 0.5, f"{key}.val_fraction", "must be in (0, 0.5)")
        for name, d in self.domains.items():
            d.name = name
            d.validate(f"{key}.domains.{name}")
            _check(name != self.base.name, f"{key}.domains.{name}", "a domain must not share the base's name")
            _check(name != "base", f"{key}.domains.{name}", "'base' names the base dataset: choose another name")


@dataclass
class SampleConfig:
    sampler: str = "dpm++2m"  # a kind of cdiff.samplers.KINDS: ddpm | ddim | dpm++2m (cdiff.samplers.DEFAULT)
    steps: int = 20  # model calls for ddim and dpm++2m (ddpm takes all T)
    eta: float = 0.0  # ddim only
    guidance_scale: float = 2.0
    per_class: int = 8
    batch_size: int = 250  # images per sampling batch (thousands fill a GPU)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the network; the sampler's update stays fp32)
    compile: bool = False  # torch.compile the network for sampling (falls back to eager if compiling fails)
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead: the network's call as a CUDA graph
    call_batch: int = 0  # rows per network call (a guided batch of B is 2B rows); 0: the whole batch at once

    def validate(self, key: str = "sample") -> None:
        # sampler, steps, eta and guidance_scale are checked by cdiff.samplers.Sampler.from_config, beside the kinds
        _range(self.per_class, 1, 1024, f"{key}.per_class")
        _range(self.batch_size, 1, 1_000_000, f"{key}.batch_size")
        _range(self.call_batch, 0, 1_000_000, f"{key}.call_batch")
        _check(self.precision in PRECISIONS, f"{key}.precision", f"must be one of {', '.join(PRECISIONS)}")
        _check_compile_mode(self.compile_mode, f"{key}.compile_mode")


@dataclass
class JudgeConfig:
    """The small CNN classifier that judges samples: GAN-test accuracy and FID in its feature space."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32  # channels of its first conv layer (then 2x)
    features: int = 64  # width of the penultimate layer: the FID feature space
    micro_batch: int = 0  # rows per forward/backward, gradients summed over them (0: the whole batch at once)

    def validate(self, key: str = "judge") -> None:
        for name, most in (("steps", 10**7), ("batch_size", 65_536), ("width", 1024), ("features", 8192)):
            _range(getattr(self, name), 1, most, f"{key}.{name}")
        _check(0 < self.lr <= 1, f"{key}.lr", "must be a number in (0, 1]")
        _range(self.micro_batch, 0, 65_536, f"{key}.micro_batch")


def read_yaml(path: str | Path) -> dict:
    """A params file as plain data (a key given twice is an error); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"params file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise CdiffError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e


def load_sections(path: str | Path, sections: dict[str, type]) -> dict:
    """Only the named sections of a params file ('model', 'train.base', ...), typed and validated.

    `cdiff train --params params.yaml` reads the library's sections this way; the pipeline's own
    sections (ray, tune, mlflow, ...) are neither read nor checked here.
    """
    raw, out = read_yaml(path), {}
    for key, cls in sections.items():
        value = raw
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise CdiffError(f"{key}: missing from {path}")
            value = value[part]
        out[key] = from_dict(cls, value, key)
        out[key].validate(key)
    return out


MAX_YAML_NODES = 100_000  # values in params.yaml once aliases are expanded: the real file has about 300


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (YAML would keep the last silently),
    and aliases may not expand the document past MAX_YAML_NODES values (a "billion laughs" bomb)."""

    def get_single_data(self):
        try:
            node = self.get_single_node()
        except RecursionError:
            raise CdiffError("params.yaml is nested too deeply to be a params file") from None
        if node is None:
            return None
        _expanded_size(node)
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # unhashable: PyYAML refuses it below
                continue
            if twice:
                raise CdiffError(f"duplicate key {shown(key)} in params.yaml (line {node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """How many values the YAML node graph holds with every alias expanded; refuses a bomb or a cycle."""
    sizes: dict[int, int | None] = {}

    def size(node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise CdiffError(f"params.yaml: an alias refers to itself (line {node.start_mark.line + 1})")
            return sizes[id(node)]
        sizes[id(node)] = None
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        if total > MAX_YAML_NODES:
            raise CdiffError(
                f"params.yaml: aliases expand it past {MAX_YAML_NODES} values (line {node.start_mark.line + 1}): "
                "write the values out"
            )
        sizes[id(node)] = total
        return total

    return size(root)


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
            raise CdiffError(f"{_join(key, _name(k))}: unknown key (known: {', '.join(sorted(names))})")
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
        return {str(k): _coerce(item, v, f"{key}.{_name(k)}") for k, v in value.items()}
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
            raise CdiffError(f"{key}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CdiffError(f"{key}: expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CdiffError(f"{key}: expected a number, got {shown(value)}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):
            raise CdiffError(
                f"{key}: {'NaN' if math.isnan(number) else shown(value)} is not allowed: give a finite number"
            )
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CdiffError(f"{key}: expected a string, got {shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CdiffError(f"{key}: expected a string, got {shown(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {key}")


def _name(k) -> str:
    """A key as it appears in a message: itself when it is short text, else a bounded repr."""
    return k if isinstance(k, str) and len(k) <= 60 and k.isprintable() else shown(k)


def _join(key: str, name: str) -> str:
    """'model' + 'n_ctx' -> 'model.n_ctx'; a key ending in ':' (a file) is followed by a space instead."""
    return f"{key} {name}" if key.endswith(":") else f"{key}.{name}" if key else name


def _check(ok, key: str, msg: str) -> None:
    if not ok:
        raise CdiffError(f"{key}: {msg}")


def _check_compile_mode(mode: str, key: str) -> None:
    _check(mode in COMPILE_MODES, key, f"must be one of {', '.join(COMPILE_MODES)}")


def _range(value: int, least: int, most: int, key: str) -> None:
    _check(least <= value <= most, key, f"must be at least {least}" if value < least else f"must be at most {most}")


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name) and name.isascii()
