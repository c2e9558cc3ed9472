"""LoRA: low-rank adapters that wrap a frozen nn.Linear, as PEFT does.

y = base_layer(x) + dropout(x) @ lora_A @ lora_B * (lora_alpha / r) * scale
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cdiff.config import to_dict
from cdiff.errors import CdiffError
from cdiff.io import atomic_dir, fingerprint, load_safetensors, read_json, save_safetensors, write_json

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.r, self.lora_alpha = r, lora_alpha
        self.scale = 1.0  # run-time strength of the adapter; 0 turns it off
        like = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        a = torch.empty(r, base_layer.in_features, **like)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear(in, r) would be initialised
        self.lora_A = nn.Parameter(a.T.contiguous())  # (in, r)
        self.lora_B = nn.Parameter(
            torch.zeros(r, base_layer.out_features, **like)
        )  # (r, out): a fresh adapter is a no-op
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._unmerged_weight: torch.Tensor | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r * self.scale

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def get_delta_weight(self) -> torch.Tensor:
        return (self.lora_A @ self.lora_B).T * self.scaling  # (out, in), the shape of base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: zero overhead at inference."""
        if not self.merged:
            self._unmerged_weight = self.base_layer.weight.detach().clone()
            self.base_layer.weight += self.get_delta_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight (kept aside at merge, so swaps are bit-exact)."""
        if self.merged:
            self.base_layer.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.scale == 0:
            return out
        return out + (self.lora_dropout(x) @ self.lora_A @ self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}"


@dataclass
class _LoraState:
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


def inject_lora(model, targets=("w_q", "w_k", "w_v"), r=4, alpha=4.0, dropout=0.0, extra_trainable=()) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target ("w_q", "attn.feedforward.0"); freeze all but LoRA and extras.

    `extra_trainable` names whole modules (e.g. "prompt") that train too and are saved with the adapter.
    Returns the injected module names.
    """
    if getattr(model, "_cdiff_lora", None) is not None:
        raise CdiffError("this model already has a LoRA adapter: unload_lora(model) first")
    base_fp = fingerprint(model.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    injected = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], LoRALinear(module, r, alpha, dropout))
            injected.append(name)
    if not injected:
        raise CdiffError(f"no nn.Linear named {', '.join(targets)} in the model: check lora.targets")
    saved = {}
    modules = dict(model.named_modules())
    for extra in extra_trainable:
        if extra not in modules:
            raise CdiffError(f"lora.extra_trainable: the model has no module {extra!r}")
        saved[extra] = {k: v.detach().clone() for k, v in modules[extra].state_dict().items()}
        for p in modules[extra].parameters():
            p.requires_grad_(True)
    model._cdiff_lora = _LoraState(
        r,
        float(alpha),
        float(dropout),
        list(targets),
        list(extra_trainable),
        injected,
        base_fp,
        saved,
        list(model.prompt.class_names) if hasattr(model, "prompt") else [],
    )
    return injected


def lora_layers(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def set_lora_scale(model, scale: float) -> None:
    for layer in lora_layers(model):
        layer.scale = scale


def _state(model) -> _LoraState:
    state = getattr(model, "_cdiff_lora", None)
    if state is None:
        raise CdiffError("this model has no LoRA adapter: inject_lora or load_adapter first")
    return state


def unload_lora(model) -> None:
    """Remove the adapter: put back the exact base layers, extra modules and class names."""
    state = _state(model)
    for name in state.injected:
        layer = model.get_submodule(name)
        layer.unmerge()
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], layer.base_layer)
    for name, tensors in state.saved_modules.items():
        model.get_submodule(name).load_state_dict(tensors)
    if state.saved_class_names:
        model.prompt.class_names = list(state.saved_class_names)
    for p in model.parameters():
        p.requires_grad_(True)
    model._cdiff_lora = None


def merge_and_unload(model) -> None:
    """Fold the adapter in for good: the model becomes a plain standalone model with the adapted weights."""
    state = _state(model)
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
    state = _state(model)
    out = {}
    for name in state.injected:
        layer = model.get_submodule(name)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = layer.lora_A.detach(), layer.lora_B.detach()
    for extra in state.extra_trainable:
        for k, v in model.get_submodule(extra).state_dict().items():
            out[f"{extra}.{k}"] = v.detach()
    return out


def trainable_parameter_share(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, LoRA included."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_adapter(model, path, class_names: list[str] | None = None) -> None:
    """Write adapter.safetensors (adapter tensors only) and adapter_config.json, atomically as one folder."""
    state = _state(model)
    config = {
        "format": "cdiff-adapter",
        "version": 1,
        "r": state.r,
        "lora_alpha": state.lora_alpha,
        "lora_dropout": state.lora_dropout,
        "target_modules": state.targets,
        "extra_trainable": state.extra_trainable,
        "injected": state.injected,
        "class_names": list(class_names if class_names is not None else model.prompt.class_names),
        "base_fingerprint": state.base_fingerprint,
        "base_model": to_dict(model.config),
    }
    with atomic_dir(path) as tmp:
        save_safetensors(adapter_state_dict(model), tmp / ADAPTER_WEIGHTS)
        write_json(tmp / ADAPTER_CONFIG, config)


def read_adapter_config(path) -> dict:
    config = read_json(Path(path) / ADAPTER_CONFIG, "adapter config")
    if config.get("format") != "cdiff-adapter":
        raise CdiffError(f"{path} is not a cdiff adapter (adapter_config.json has no format: cdiff-adapter)")
    return config


def load_adapter(model, path) -> list[str]:
    """Load an adapter onto its base model (unloading any current one first); refuses a foreign base."""
    path = Path(path)
    if not path.is_dir():
        raise CdiffError(f"adapter folder not found: {path}")
    config = read_adapter_config(path)
    tensors = load_safetensors(path / ADAPTER_WEIGHTS, "adapter weights")
    if config.get("base_model") != to_dict(model.config):
        raise CdiffError(f"adapter {path} was made for another model architecture: use the base it was trained on")
    if getattr(model, "_cdiff_lora", None) is not None:
        unload_lora(model)
    if fingerprint(model.state_dict()) != config.get("base_fingerprint"):
        raise CdiffError(f"adapter {path} was trained on other base weights (fingerprint mismatch): use its own base")
    try:
        inject_lora(
            model,
            config["target_modules"],
            int(config["r"]),
            float(config["lora_alpha"]),
            float(config.get("lora_dropout", 0.0)),
            config.get("extra_trainable", []),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CdiffError(f"adapter config {path / ADAPTER_CONFIG} is incomplete or invalid ({e})") from e
    expected = adapter_state_dict(model)
    if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in expected):
        unload_lora(model)
        raise CdiffError(f"adapter weights in {path} do not match its config: the file is corrupt or foreign")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)
    names = config.get("class_names")
    if names:
        if len(names) > model.config.num_classes:
            unload_lora(model)
            raise CdiffError(
                f"adapter {path} has {len(names)} classes; the base has room for {model.config.num_classes}"
            )
        model.prompt.class_names = list(names)
    for p in model.parameters():
        p.requires_grad_(False)
    return config["injected"]
