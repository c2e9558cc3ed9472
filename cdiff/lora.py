"""LoRA: low-rank adapters that wrap a frozen nn.Linear, as PEFT does.

y = base_layer(x) + dropout(x) @ lora_A @ lora_B * scaling,  scaling = lora_alpha / r
(or lora_alpha / sqrt(r) with `use_rslora`, rank-stabilised LoRA: Kalajdzievski 2023, PEFT's option)

The adapter folder on disk (save_adapter, load_adapter and its checks) is cdiff.adapter_format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from cdiff.config import LoraConfig
from cdiff.errors import CdiffError
from cdiff.io import fingerprint


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
