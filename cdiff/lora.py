"""LoRA: low-rank adapters that wrap a frozen nn.Linear, as PEFT does.

y = base_layer(x) + dropout(x) @ lora_A @ lora_B * scaling,  scaling = lora_alpha / r
(or lora_alpha / sqrt(r) with `use_rslora`, rank-stabilised LoRA: Kalajdzievski 2023, PEFT's option)

An adapter folder is adapter.safetensors (adapter tensors only) + adapter_config.json (settings, the
base it belongs to, and fingerprints of both). `load_adapter` checks all of it before it touches the
model, so a refused adapter leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cdiff.config import LoraConfig, ModelConfig, from_dict, to_dict
from cdiff.errors import CdiffError
from cdiff.io import Artefact, display_path, fingerprint
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


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def pattern_value(name: str, pattern: dict, default):
    """A layer's own rank or alpha (PEFT's rank_pattern / alpha_pattern): the value of the first key k of
    `pattern` with re.match(rf"(.*\\.)?{k}$", name), PEFT's rule (a module-name suffix, or a regex such as
    "up\\..*\\.w_q" for the up path's queries); `default` where none matches."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·ΔW from cdiff's lora_A (in, r) and lora_B (r, out): (out, in), the shape of an nn.Linear weight."""
    return (lora_A @ lora_B).T * scaling


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight m * (W + s·ΔW) / ||W + s·ΔW||, the norm per output row (over the input dim)."""
    adapted = weight + delta  # (out, in)
    return (magnitude / adapted.norm(dim=1))[:, None] * adapted


class LoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.use_rslora, self.use_dora = r, lora_alpha, use_rslora, use_dora
        like = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        a = torch.empty(r, base_layer.in_features, **like)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear(in, r) would be initialised
        self.lora_A = nn.Parameter(a.T.contiguous())  # (in, r)
        self.lora_B = nn.Parameter(
            torch.zeros(r, base_layer.out_features, **like)
        )  # (r, out): a fresh adapter is a no-op
        if use_dora:  # m = ||W|| per output row: with B = 0, m / ||W + s·ΔW|| is exactly 1
            self.lora_magnitude_vector = nn.Parameter(base_layer.weight.detach().norm(dim=1))  # (out,)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._unmerged_weight: torch.Tensor | None = None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def get_delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    def _dora_factor(self) -> torch.Tensor:
        """m / ||W + s·ΔW||, per output row (out,); the norm is a constant for the gradient, as in PEFT
        (DoRA paper, section 4.3)."""
        weight = self.base_layer.weight + self.get_delta_weight()  # (out, in)
        return self.lora_magnitude_vector / weight.norm(dim=1).detach()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: zero overhead at inference."""
        if not self.merged:
            weight = self.base_layer.weight
            self._unmerged_weight = weight.detach().clone()
            if self.use_dora:  # the bias is not rescaled
                weight.copy_(dora_weight(weight, self.get_delta_weight(), self.lora_magnitude_vector))
            else:
                weight += self.get_delta_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight (kept aside at merge, so swaps are bit-exact)."""
        if self.merged:
            self.base_layer.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        x = self.lora_dropout(x)
        lora = (x @ self.lora_A @ self.lora_B) * self.scaling
        if not self.use_dora:
            return out + lora
        # (m/n) (W x + s·ΔW x) + b, written as PEFT does: the base output plus (m/n - 1) W x, which is
        # exactly 0 for a fresh adapter
        factor = self._dora_factor()
        return out + (factor - 1) * nn.functional.linear(x, self.base_layer.weight) + factor * lora

    def extra_repr(self) -> str:
        options = [name for name in ("use_rslora", "use_dora") if getattr(self, name)]
        return ", ".join([f"r={self.r}", f"lora_alpha={self.lora_alpha}", *(f"{o}=True" for o in options)])


@dataclass
class LoraState:
    """What inject_lora changed on a model, so that unload_lora can put it back exactly."""

    r: int
    lora_alpha: float
    lora_dropout: float
    targets: list[str]
    extra_trainable: list[str]
    injected: list[str]
    base_fingerprint: str
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    saved_class_names: list[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    mix: list[tuple[str, float]] = field(default_factory=list)  # (adapter, weight): cdiff.mixing merged them in
    saved_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # nn.Linear name -> its base weight


def plan_injection(model, targets, extra_trainable) -> list[str]:
    """The nn.Linear names to wrap; checks every target and extra module before anything is changed."""
    modules = dict(model.named_modules())
    names = [
        name
        for name, module in modules.items()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise CdiffError(f"no nn.Linear named {', '.join(targets)} in the model: check lora.targets")
    for extra in extra_trainable:
        if extra not in modules:
            raise CdiffError(f"lora.extra_trainable: the model has no module {extra!r}")
    return names


def inject_lora(
    model,
    targets=("w_q", "w_k", "w_v"),
    r=4,
    alpha=4.0,
    dropout=0.0,
    extra_trainable=(),
    *,
    use_rslora=False,
    use_dora=False,
    rank_pattern=None,
    alpha_pattern=None,
) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target ("w_q", "attn.feedforward.0"); freeze all but LoRA and extras.

    `extra_trainable` names whole modules (e.g. "prompt") that train too and are saved with the adapter.
    `use_rslora`: scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA, PEFT's name).
    `use_dora`: DoRA, a trainable magnitude per output row times the direction of W + s·ΔW (PEFT's name).
    `rank_pattern` / `alpha_pattern` (PEFT's names): {module-name pattern: r or alpha} for the layers that
    take their own (see `pattern_value`), e.g. {"up\\..*": 8} for a higher rank on the up path.
    Returns the injected module names. A bad target or module is refused before the model is changed.
    """
    if getattr(model, "_cdiff_lora", None) is not None:
        raise CdiffError("this model already has a LoRA adapter: unload_lora(model) first")
    patterns = {"rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    options = {"use_rslora": use_rslora, "use_dora": use_dora, **patterns}
    lora = LoraConfig(r, alpha, dropout, list(targets), list(extra_trainable), **options)
    lora.validate("lora")
    names = plan_injection(model, targets, extra_trainable)
    is_meta = any(t.is_meta for t in model.state_dict().values())
    inject_layers(model, names, lora, "" if is_meta else fingerprint(model.state_dict()))
    return names


def inject_layers(model, names: list[str], lora: LoraConfig, base_fp: str) -> None:
    """Wrap `names` with LoRA layers as `lora` says (each layer's own rank and alpha from its patterns)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        r, alpha = pattern_value(name, lora.rank_pattern, lora.r), pattern_value(name, lora.alpha_pattern, lora.alpha)
        layer = LoRALinear(model.get_submodule(name), r, alpha, lora.dropout, lora.use_rslora, lora.use_dora)
        setattr(parent, name.rpartition(".")[2], layer)
    saved = {}
    for extra in lora.extra_trainable:
        module = model.get_submodule(extra)
        saved[extra] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for p in module.parameters():
            p.requires_grad_(True)
    model._cdiff_lora = LoraState(
        lora.r,
        float(lora.alpha),
        float(lora.dropout),
        list(lora.targets),
        list(lora.extra_trainable),
        list(names),
        base_fp,
        saved,
        list(model.prompt.class_names) if hasattr(model, "prompt") else [],
        lora.use_rslora,
        lora.use_dora,
        dict(lora.rank_pattern),
        dict(lora.alpha_pattern),
    )


def lora_layers(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def lora_state(model) -> LoraState:
    """What inject_lora (or load_adapter) left on the model; a CdiffError where it carries no adapter."""
    state = getattr(model, "_cdiff_lora", None)
    if state is None:
        raise CdiffError("this model has no LoRA adapter: inject_lora or load_adapter first")
    return state


def unload_lora(model) -> None:
    """Remove the adapter: put back the exact base layers, extra modules and class names."""
    state = lora_state(model)
    for name in state.injected:
        layer = model.get_submodule(name)
        layer.unmerge()
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], layer.base_layer)
    for name, tensors in state.saved_modules.items():
        model.get_submodule(name).load_state_dict(tensors)
    with torch.no_grad():
        for name, weight in state.saved_weights.items():
            model.get_submodule(name).weight.copy_(weight)
    if state.saved_class_names:
        model.prompt.class_names = list(state.saved_class_names)
    for p in model.parameters():
        p.requires_grad_(True)
    model._cdiff_lora = None


def merge_and_unload(model) -> None:
    """Fold the adapter in for good: the model becomes a plain standalone model with the adapted weights."""
    state = lora_state(model)
    for name in state.injected:
        layer = model.get_submodule(name)
        layer.merge()
        layer._unmerged_weight = None
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], layer.base_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    model._cdiff_lora = None


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Only what the adapter owns: lora_A/lora_B of each wrapped layer, plus the extra trainable modules."""
    state = lora_state(model)
    if state.mix:
        raise CdiffError("this model carries a weighted mix of adapters, not one adapter: merge_and_unload it instead")
    out = {}
    for name in state.injected:
        layer = model.get_submodule(name)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = layer.lora_A.detach(), layer.lora_B.detach()
        if layer.use_dora:
            out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    for extra in state.extra_trainable:
        for k, v in model.get_submodule(extra).state_dict().items():
            out[f"{extra}.{k}"] = v.detach()
    return out


def trainable_parameter_share(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, LoRA included."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


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
