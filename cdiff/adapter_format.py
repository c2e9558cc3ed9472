"""cdiff's adapter folder: adapter.safetensors (adapter tensors only) + adapter_config.json (settings, the
base it belongs to, and fingerprints of both), written from a model carrying LoRA (cdiff.lora) and loaded
back onto its base. `load_adapter` checks all of it before it touches the model, so a refused adapter
leaves the model exactly as it was. PEFT's layout of the same adapter is cdiff.peft_format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdiff.config import LoraConfig, ModelConfig, from_dict, to_dict
from cdiff.errors import CdiffError
from cdiff.io import Artefact, display_path, fingerprint
from cdiff.lora import adapter_state_dict, inject_layers, lora_state, pattern_value, plan_injection, unload_lora
from cdiff.model import UNet
from cdiff.names import check_class_names
from cdiff.sources import resolve
from cdiff.weights import check_fits, load_weights_folder, on_meta, read_folder_config, save_weights_folder

# version 2: adapter_config.json carries a fingerprint of the adapter's own tensors
ADAPTER = Artefact(
    "adapter folder",
    folder=True,
    marker="adapter_config.json",
    format="cdiff-adapter",
    weights="adapter.safetensors",
    version=2,
)
ADAPTER_WEIGHTS, ADAPTER_CONFIG = ADAPTER.weights, ADAPTER.marker


@dataclass
class AdapterConfig:
    """adapter_config.json (less format, version and fingerprint): the LoRA settings and the base it belongs to."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    injected: list[str]
    base_fingerprint: str
    base_model: ModelConfig
    lora_dropout: float = 0.0
    extra_trainable: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    use_rslora: bool = False  # absent (adapters saved before it existed): plain alpha / r
    use_dora: bool = False  # absent: plain LoRA; with it, adapter.safetensors holds each layer's magnitude
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT's: layers with their own rank (absent: none)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def layer(self, name: str) -> tuple[int, float]:
        """(r, alpha) of one injected layer: its pattern's, else the adapter's."""
        return pattern_value(name, self.rank_pattern, self.r), pattern_value(name, self.alpha_pattern, self.lora_alpha)

    @property
    def lora(self) -> LoraConfig:
        """These settings in params.yaml's words (alpha, targets, dropout): the one place the file's PEFT
        vocabulary (lora_alpha, target_modules, lora_dropout) and the params' meet."""
        settings = (self.r, self.lora_alpha, self.lora_dropout, self.target_modules, self.extra_trainable)
        patterns = {"rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern)}
        return LoraConfig(*settings, use_rslora=self.use_rslora, use_dora=self.use_dora, **patterns)

    def validate(self, key: str) -> None:
        self.lora.validate(f"{key}: lora")
        self.base_model.validate(f"{key}: base_model")
        if self.class_names:
            check_class_names(self.class_names, f"{key}: class_names", limit=self.base_model.num_classes)


def save_adapter(model, path, class_names: list[str] | None = None, *, overwrite: bool = False) -> None:
    """Write adapter.safetensors (adapter tensors only) and adapter_config.json, atomically as one folder.

    An existing adapter folder at `path` is replaced only with `overwrite=True`; NaN/inf tensors are refused.
    """
    state = lora_state(model)
    adapter_state_dict(model)  # refuses a mix before its config is built
    config = AdapterConfig(
        r=state.r,
        lora_alpha=state.lora_alpha,
        target_modules=state.targets,
        injected=state.injected,
        base_fingerprint=state.base_fingerprint,
        base_model=model.config,
        lora_dropout=state.lora_dropout,
        extra_trainable=state.extra_trainable,
        class_names=list(class_names if class_names is not None else model.prompt.class_names),
        use_rslora=state.use_rslora,
        use_dora=state.use_dora,
        rank_pattern=state.rank_pattern,
        alpha_pattern=state.alpha_pattern,
    )
    config.validate("adapter")
    save_weights_folder(ADAPTER, path, adapter_state_dict(model), to_dict(config), overwrite=overwrite)


def parse_adapter_config(config: dict, path) -> AdapterConfig:
    """The typed, checked AdapterConfig of the adapter folder at `path`, from its adapter_config.json `config`."""
    where = display_path(Path(path) / ADAPTER_CONFIG)
    fields = {k: v for k, v in config.items() if k not in ("format", "version", "fingerprint")}
    parsed = from_dict(AdapterConfig, fields, f"{where}:")
    parsed.validate(where)
    return parsed


def read_adapter_config(path) -> AdapterConfig:
    """The typed adapter_config.json of an adapter folder (or URI), every field checked (one-line errors naming
    the field); of a PEFT folder that `cdiff export-peft` wrote, the cdiff config it keeps."""
    from cdiff.peft_format import is_peft_folder, read_peft_folder

    path = resolve(path, "adapter")
    config = read_peft_folder(path)[1] if is_peft_folder(path) else read_folder_config(ADAPTER, path)
    return parse_adapter_config(config, path)


def read_adapter(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of an adapter folder, checked without a model: the config's fields, the tensors'
    fingerprint and finiteness, and that they fit the base architecture the config names (on the meta device).
    A PEFT folder that `cdiff export-peft` wrote reads as the adapter it came from (cdiff.peft_format)."""
    from cdiff.peft_format import is_peft_folder, read_peft_folder

    path = resolve(path, "adapter")
    if is_peft_folder(path):
        tensors, config = read_peft_folder(path)
        parsed = parse_adapter_config(config, path)
    else:
        config = read_folder_config(ADAPTER, path)
        parsed = parse_adapter_config(config, path)
        tensors, _ = load_weights_folder(ADAPTER, path, config)
    with on_meta():
        skeleton = UNet(parsed.base_model)
        try:
            names = plan_injection(skeleton, parsed.target_modules, parsed.extra_trainable)
        except CdiffError as e:
            raise CdiffError(f"adapter {display_path(path)} does not fit its base model: {e}") from e
        _inject_as(skeleton, parsed, names, base_fp="", dropout=0.0)
        expected = adapter_state_dict(skeleton)
    if names != parsed.injected:
        raise CdiffError(f"{display_path(path / ADAPTER_CONFIG)}: 'injected' does not match target_modules")
    check_fits(expected, tensors, path)
    return tensors, config


def _inject_as(model, config: AdapterConfig, names: list[str], base_fp: str, dropout: float) -> None:
    """Wrap `names` as the adapter `config` describes (`dropout` for training on)."""
    inject_layers(model, names, dataclasses.replace(config.lora, dropout=dropout), base_fp)


def check_base(model, config: AdapterConfig, path) -> str:
    """The model's base fingerprint, once it is the base `config` (of the adapter at `path`) was trained on."""
    if to_dict(config.base_model) != to_dict(model.config):
        raise CdiffError(
            f"adapter {display_path(path)} was made for another model architecture: use the base it was trained on"
        )
    current = getattr(model, "_cdiff_lora", None)
    base_fp = current.base_fingerprint if current is not None else fingerprint(model.state_dict())
    if base_fp != config.base_fingerprint:
        raise CdiffError(
            f"adapter {display_path(path)} was trained on other base weights (fingerprint mismatch): use its own base"
        )
    return base_fp


def load_adapter(model, path) -> list[str]:
    """Load an adapter folder, or an adapter URI (cdiff.sources: `models:/cdiff-adapter-digits@champion`),
    onto its base model (unloading any current one first); refuses a foreign base.

    Every check runs before the model is changed: a refused adapter leaves the model exactly as it was
    (weights, modules, class names and any adapter it carried).
    """
    path = resolve(path, "adapter")
    tensors, config = read_adapter(path)
    parsed = parse_adapter_config(config, path)
    base_fp = check_base(model, parsed, path)
    if getattr(model, "_cdiff_lora", None) is not None:
        unload_lora(model)
    _inject_as(model, parsed, parsed.injected, base_fp, parsed.lora_dropout)
    own = adapter_state_dict(model)
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    if parsed.class_names:
        model.prompt.class_names = list(parsed.class_names)
    for p in model.parameters():
        p.requires_grad_(False)
    return list(parsed.injected)
