"""Model folders: model.safetensors + config.json (model config, schedule, class names, fingerprint).

Loading reads tensors and JSON only; nothing is ever unpickled. config.json is checked field by field,
and the weights against the architecture it describes (built on the meta device, so a forged size
allocates nothing) before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdiff.adapter_format import ADAPTER, read_adapter
from cdiff.config import DiffusionConfig, ModelConfig, from_dict, to_dict
from cdiff.errors import CdiffError, shown
from cdiff.io import Artefact, display_path
from cdiff.model import UNet
from cdiff.names import check_class_names
from cdiff.schedule import NoiseSchedule
from cdiff.sources import is_uri, resolve
from cdiff.weights import check_fits, load_weights_folder, on_meta, read_folder_config, save_weights_folder

MODEL = Artefact("model folder", folder=True, marker="config.json", format="cdiff-model", weights="model.safetensors")
MODEL_WEIGHTS, MODEL_CONFIG = MODEL.weights, MODEL.marker


def save_model(model: UNet, diffusion: DiffusionConfig, path, extra: dict | None = None, *, overwrite=False) -> str:
    """Write the model folder atomically; returns the weights' sha256 fingerprint.

    An existing model folder at `path` is replaced only with `overwrite=True`; NaN/inf weights are refused.
    """
    if getattr(model, "_cdiff_lora", None) is not None:
        raise CdiffError("the model carries a LoRA adapter: save_adapter it, or merge_and_unload it first")
    config = {
        **(extra or {}),
        "model": to_dict(model.config),
        "diffusion": to_dict(diffusion),
        "class_names": list(model.class_names),
    }
    return save_weights_folder(MODEL, path, model.state_dict(), config, overwrite=overwrite)


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder's config.json says, typed: the architecture, the schedule, the class names, the
    sha256 fingerprint of its weights, and any other fields its writer added (e.g. `merged_from`)."""

    model: ModelConfig
    diffusion: DiffusionConfig
    class_names: list[str] | None
    fingerprint: str
    extra: dict = field(default_factory=dict)


def read_model_config(path) -> ModelFolder:
    """config.json of a model folder (or URI), every field cdiff reads checked (one-line errors naming the field)."""
    path = resolve(path, "model")
    config = read_folder_config(MODEL, path)
    return _folder(config, *_parse(config, path), path)


def _folder(config: dict, model_config, diffusion, names, path) -> ModelFolder:
    if not isinstance(config.get("fingerprint"), str):
        raise CdiffError(f"{display_path(Path(path) / MODEL_CONFIG)} has no fingerprint of its weights: save it again")
    extra = {k: v for k, v in config.items() if k not in {"model", "diffusion", "class_names", "fingerprint"}}
    return ModelFolder(model_config, diffusion, names, config["fingerprint"], extra)


def _parse(config: dict, path) -> tuple[ModelConfig, DiffusionConfig, list[str] | None]:
    where = display_path(Path(path) / MODEL_CONFIG)
    for key in ("model", "diffusion"):
        if key not in config:
            raise CdiffError(f"{where} misses {key!r}: the file is corrupt or from another tool")
    model_config = from_dict(ModelConfig, config["model"], f"{where}: model")
    model_config.validate(f"{where}: model")
    diffusion = from_dict(DiffusionConfig, config["diffusion"], f"{where}: diffusion")
    diffusion.validate(f"{where}: diffusion")
    names = config.get("class_names")
    if names is not None:
        check_class_names(names, f"{where}: class_names", limit=model_config.num_classes)
    return model_config, diffusion, names


def _load_checked(path) -> tuple[dict[str, torch.Tensor], dict, ModelConfig, DiffusionConfig, list[str] | None]:
    config = read_folder_config(MODEL, path)
    model_config, diffusion, names = _parse(config, path)
    tensors, _ = load_weights_folder(MODEL, path, config)
    with on_meta():
        check_fits(UNet(model_config).state_dict(), tensors, path)
    return tensors, config, model_config, diffusion, names


def check_device(name) -> torch.device:
    """A torch device this machine has, or a one-line error (e.g. --device cuda without a GPU)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CdiffError(f"unknown device {shown(name)}: use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CdiffError(f"device {shown(name)}: CUDA is not available on this machine: use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CdiffError(f"device {shown(name)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CdiffError(f"device {shown(name)}: MPS is not available on this machine: use cpu")
    elif device.type != "cpu":
        raise CdiffError(f"device {shown(name)}: cdiff runs on cpu, cuda or mps")
    return device


def load_model(path, device="cpu") -> tuple[UNet, NoiseSchedule, ModelFolder]:
    """Load a model folder, or a model URI (cdiff.sources: `models:/cdiff-base@adapters`): (unet in eval mode,
    its noise schedule, its config.json as a typed `ModelFolder`)."""
    device = check_device(device)
    path = resolve(path, "model")
    tensors, config, model_config, diffusion, names = _load_checked(path)
    model = UNet(model_config, names)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), NoiseSchedule(diffusion), _folder(config, model_config, diffusion, names, path)


def describe(path) -> dict:
    """Metadata of a model or adapter folder (or URI), for `cdiff info`: checked as thoroughly as a load."""
    source = {"source": path} if is_uri(path) else {}
    path = resolve(path)
    if not path.exists():
        raise CdiffError(f"path not found: {display_path(path)}")
    if not path.is_dir():
        raise CdiffError(f"{display_path(path)} is a file: give a model or adapter folder")
    if (path / ADAPTER.marker).exists():
        tensors, config = read_adapter(path)
        kind = "adapter"
    else:
        kind, (tensors, config, *_) = "model", _load_checked(path)
    return {"kind": kind, **source, "path": str(path), "parameters": sum(t.numel() for t in tensors.values()), **config}
