"""PEFT's adapter folder layout, written from a cdiff adapter and read back by `load_adapter`.

A PEFT LoRA folder is adapter_model.safetensors + adapter_config.json (`peft_type: "LORA"`, `r`,
`lora_alpha`, `target_modules`, `use_rslora`, `use_dora`, `modules_to_save`, ...). Its tensors are named
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), PEFT's orientation (cdiff
keeps their transposes), `base_model.model.<module>.lora_magnitude_vector` (out,) for DoRA, and
`base_model.model.<module>.<tensor>` for each module to save (cdiff's extra trainable modules).

PEFT's files say nothing of the base a cdiff adapter needs checking against, so the export keeps the
cdiff adapter_config.json, with the fingerprint of its tensors, in the safetensors metadata (`cdiff`),
where PEFT does not look; `load_adapter` checks it and the PEFT fields against each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cdiff.errors import CdiffError, shown
from cdiff.io import (
    Artefact,
    atomic_dir,
    check_finite,
    display_path,
    fingerprint,
    load_safetensors,
    parse_json,
    read_json,
    save_safetensors,
    write_json,
)

PEFT_ADAPTER = Artefact(
    "PEFT adapter folder", folder=True, marker="adapter_config.json", format="LORA", format_key="peft_type"
)
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_RENAMES = ((".lora_A", ".lora_A.weight"), (".lora_B", ".lora_B.weight"))  # cdiff's -> PEFT's, transposed
# the PEFT fields of adapter_config.json and the cdiff adapter_config.json fields they must agree with
_SAME = {
    "r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "target_modules",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
    "modules_to_save": "extra_trainable",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
}


def is_peft_folder(path) -> bool:
    config = Path(path) / PEFT_ADAPTER.marker
    return config.is_file() and read_json(config, "adapter config").get("peft_type") is not None


def to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cdiff adapter tensors under PEFT's names and in PEFT's orientation."""
    out = {}
    for key, t in tensors.items():
        for ours, theirs in _RENAMES:
            if key.endswith(ours):
                key, t = key.removesuffix(ours) + theirs, t.T.contiguous()
                break
        out[PREFIX + key] = t
    return out


def from_peft(tensors: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise CdiffError(f"{where}: tensor {key} does not start with {PREFIX}: not a PEFT LoRA adapter of a model")
        key = key.removeprefix(PREFIX)
        for ours, theirs in _RENAMES:
            if key.endswith(theirs):
                key, t = key.removesuffix(theirs) + ours, t.T.contiguous()
                break
        out[key] = t
    return out


def export_peft(adapter, path, *, overwrite: bool = False) -> None:
    """Write the cdiff adapter (folder or URI) `adapter` as a PEFT LoRA folder at `path`, atomically.

    An existing PEFT adapter folder at `path` is replaced only with `overwrite=True`; anything else never.
    """
    from cdiff.adapter_format import parse_adapter_config, read_adapter
    from cdiff.sources import resolve

    source = resolve(adapter, "adapter")
    tensors, config = read_adapter(source)
    parsed = parse_adapter_config(config, source)
    peft_config = {
        "peft_type": "LORA",
        "r": parsed.r,
        "lora_alpha": parsed.lora_alpha,
        "lora_dropout": parsed.lora_dropout,
        "target_modules": parsed.target_modules,
        "use_rslora": parsed.use_rslora,
        "use_dora": parsed.use_dora,
        "modules_to_save": parsed.extra_trainable or None,
        "rank_pattern": parsed.rank_pattern,
        "alpha_pattern": parsed.alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,  # weights are nn.Linear's (out, in)
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "task_type": None,
    }
    theirs = to_peft(tensors)
    check_finite(theirs, f"refusing to save {display_path(path)}")
    with atomic_dir(path, PEFT_ADAPTER, overwrite=overwrite) as tmp:
        metadata = {"format": "pt", "cdiff": json.dumps(config, sort_keys=True, allow_nan=False)}
        save_safetensors(theirs, tmp / PEFT_WEIGHTS, metadata=metadata)
        write_json(tmp / PEFT_ADAPTER.marker, peft_config)


def read_peft_folder(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(cdiff tensors, cdiff adapter config) of a PEFT folder that `export_peft` wrote, its tensors matching
    the fingerprint kept in its metadata and its PEFT fields matching that config."""
    path = Path(path)
    peft_config = read_json(path / PEFT_ADAPTER.marker, "adapter config")
    where = display_path(path / PEFT_ADAPTER.marker)
    if peft_config.get("peft_type") != "LORA":
        raise CdiffError(f"{where}: peft_type {peft_config.get('peft_type')!r}: cdiff reads LoRA adapters only")
    weights = path / PEFT_WEIGHTS
    tensors, metadata = load_safetensors(weights, "PEFT adapter weights", metadata=True)
    if "cdiff" not in metadata:
        raise CdiffError(
            f"{display_path(weights)} has no cdiff metadata (the base model and its fingerprint): cdiff loads "
            "the PEFT folders that `cdiff export-peft` writes"
        )
    from cdiff.adapter_format import ADAPTER

    config = parse_json(metadata["cdiff"], f"the cdiff metadata of {display_path(weights)}")
    version = config.get("version")
    if config.get("format") != ADAPTER.format or version not in range(2, ADAPTER.version + 1):
        raise CdiffError(
            f"the cdiff metadata of {display_path(weights)} is not that of a cdiff adapter this cdiff reads "
            f"(format {shown(config.get('format'))}, version {shown(version)}): export it again with this cdiff"
        )
    for theirs, ours in _SAME.items():
        expected = config.get(ours, [] if ours == "extra_trainable" else None)
        found = peft_config.get(theirs)
        found = [] if theirs == "modules_to_save" and found is None else found
        if found != expected:
            raise CdiffError(f"{where}: {theirs} is {shown(found)}, but the adapter was saved with {shown(expected)}")
    tensors = from_peft(tensors, display_path(weights))
    if fingerprint(tensors) != config.get("fingerprint"):
        raise CdiffError(f"{display_path(weights)} does not match the fingerprint in its metadata: the file is corrupt")
    check_finite(tensors, f"PEFT adapter weights {display_path(weights)}")
    return tensors, config
