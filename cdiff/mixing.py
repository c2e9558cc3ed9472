"""Weighted mixes of LoRA adapters, merged into their base: W + sum_i w_i * delta_i.

Each adapter's delta is what its own merge would add to a weight: s_i·B_i A_i with its own scaling
(alpha / r, or alpha / sqrt(r) for rsLoRA), or for DoRA its merged weight less W. An extra trainable
module (a domain's prompt table) mixes the same way, as base + sum_i w_i * (t_i - base). Weights are
any finite numbers (a negative one subtracts an adapter, as PEFT allows); the class names are the first
adapter's. The mix is merged as it loads: the model has adapted weights and no LoRA layers,
`unload_lora` puts the base back exactly, and `merge_and_unload` keeps the mix for good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from cdiff.adapter_format import AdapterConfig, check_base, parse_adapter_config, read_adapter
from cdiff.errors import CdiffError, shown
from cdiff.lora import LoraState, dora_weight, lora_delta, lora_scaling, unload_lora
from cdiff.model import UNet
from cdiff.sources import resolve
from cdiff.weights import on_meta

_LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def check_weight(weight, source) -> float:
    """A mix weight as a float: any finite number; NaN, inf, a bool or text are refused in one line."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise CdiffError(f"adapter {source}: weight {shown(weight)} is not a finite number: give any finite weight")
    return float(weight)


def _deltas(model, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.Linear name -> the delta (out, in) that this adapter's merge adds to its weight."""
    out = {}
    for name in config.injected:
        scaling = lora_scaling(*config.layer(name), config.use_rslora)  # the layer's own rank and alpha
        delta = lora_delta(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], scaling)
        if config.use_dora:
            weight = model.get_submodule(name).weight.detach()
            delta = dora_weight(weight, delta, tensors[f"{name}.lora_magnitude_vector"]) - weight
        out[name] = delta
    return out


def load_adapters(model, mix: Sequence[tuple[str | Path, float]]) -> list[str]:
    """Merge the weighted sum of several adapters (folders or URIs, each with a weight) into their base model,
    unloading any adapter it carried first; returns the names of the nn.Linear layers changed.

    Every adapter and weight is checked before the model changes: a weight that is NaN or infinite, an
    adapter made for another architecture or trained on other base weights is refused in one line.
    """
    if not mix:
        raise CdiffError("load_adapters needs at least one (adapter, weight)")
    adapters = []
    for source, weight in mix:
        weight = check_weight(weight, source)
        path = resolve(source, "adapter")
        tensors, config = read_adapter(path)
        parsed = parse_adapter_config(config, path)
        base_fp = check_base(model, parsed, path)
        adapters.append((str(source), weight, parsed, tensors))
    with on_meta():
        base_keys = set(UNet(model.config).state_dict())
    extras: dict[str, list[tuple[float, torch.Tensor]]] = {}  # base state-dict key -> (weight, tensor) of each
    for source, weight, parsed, tensors in adapters:
        lora_keys = {f"{name}.{part}" for name in parsed.injected for part in _LORA_PARTS}
        for key in sorted(set(tensors) - lora_keys):
            if key not in base_keys:  # an extra module that holds a LoRA layer
                raise CdiffError(f"adapter {source}: its tensor {key} is not a base weight, so it cannot be mixed")
            extras.setdefault(key, []).append((weight, tensors[key]))

    if getattr(model, "_cdiff_lora", None) is not None:
        unload_lora(model)
    device = next(model.parameters()).device
    deltas: dict[str, torch.Tensor] = {}
    for _, weight, parsed, tensors in adapters:
        on_device = {k: v.to(device) for k, v in tensors.items()}
        for name, delta in _deltas(model, parsed, on_device).items():
            deltas[name] = weight * delta if name not in deltas else deltas[name] + weight * delta
    base = model.state_dict()
    modules = sorted({m for _, _, parsed, _ in adapters for m in parsed.extra_trainable})
    saved_modules = {m: {k: v.clone() for k, v in model.get_submodule(m).state_dict().items()} for m in modules}
    saved_weights = {name: model.get_submodule(name).weight.detach().clone() for name in deltas}
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight.add_(delta)
        for key, parts in extras.items():
            # (1 - sum w_i) * base + sum w_i * t_i: one adapter at weight 1 gives its own tensors exactly
            mixed = (1 - sum(w for w, _ in parts)) * base[key]
            for w, t in parts:
                mixed += w * t.to(mixed)
            base[key].copy_(mixed)
    class_names = list(model.class_names)
    model.prompt.class_names = list(adapters[0][2].class_names or class_names)
    for p in model.parameters():
        p.requires_grad_(False)
    model._cdiff_lora = LoraState(
        r=0,
        lora_alpha=0.0,
        lora_dropout=0.0,
        targets=[],
        extra_trainable=[],
        injected=[],
        base_fingerprint=base_fp,
        saved_modules=saved_modules,
        saved_class_names=class_names,
        mix=[(source, weight) for source, weight, *_ in adapters],
        saved_weights=saved_weights,
    )
    return sorted(deltas)
