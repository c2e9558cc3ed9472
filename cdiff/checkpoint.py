"""Model folders: model.safetensors + config.json (model config, schedule, class names, fingerprint).

Loading reads tensors and JSON only; nothing is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

from cdiff.config import DiffusionConfig, ModelConfig, from_dict, to_dict
from cdiff.errors import CdiffError
from cdiff.io import atomic_dir, fingerprint, load_safetensors, read_json, save_safetensors, write_json
from cdiff.lora import ADAPTER_CONFIG, read_adapter_config
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


def save_model(model: UNet, diffusion: DiffusionConfig, path, extra: dict | None = None) -> str:
    """Write the model folder atomically; returns the weights' sha256 fingerprint."""
    if getattr(model, "_cdiff_lora", None) is not None:
        raise CdiffError("the model carries a LoRA adapter: save_adapter it, or merge_and_unload it first")
    state = model.state_dict()
    fp = fingerprint(state)
    config = {
        "format": "cdiff-model",
        "version": 1,
        "model": to_dict(model.config),
        "diffusion": to_dict(diffusion),
        "class_names": list(model.class_names),
        "fingerprint": fp,
        **(extra or {}),
    }
    with atomic_dir(path) as tmp:
        save_safetensors(state, tmp / MODEL_WEIGHTS)
        write_json(tmp / MODEL_CONFIG, config)
    return fp


def read_model_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CdiffError(f"model folder not found: {path}")
    config = read_json(path / MODEL_CONFIG, "model config")
    if config.get("format") != "cdiff-model":
        raise CdiffError(f"{path} is not a cdiff model folder (config.json has no format: cdiff-model)")
    return config


def load_model(path, device="cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """Load a model folder: (unet in eval mode, its noise schedule, its config.json as a dict)."""
    path = Path(path)
    config = read_model_config(path)
    try:
        model_config = from_dict(ModelConfig, config["model"], "config.json model")
        diffusion = from_dict(DiffusionConfig, config["diffusion"], "config.json diffusion")
        model = UNet(model_config, config.get("class_names"))
    except KeyError as e:
        raise CdiffError(f"{path / MODEL_CONFIG} misses {e}: the file is corrupt or from another tool") from e
    state = load_safetensors(path / MODEL_WEIGHTS, "model weights")
    if fingerprint(state) != config.get("fingerprint"):
        raise CdiffError(f"{path / MODEL_WEIGHTS} does not match the fingerprint in config.json: the file is corrupt")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CdiffError(f"weights in {path} do not fit its config.json: the folder is corrupt") from e
    return model.to(device).eval(), NoiseSchedule(diffusion), config


def describe(path) -> dict:
    """Metadata of a model or adapter folder, for `cdiff info`."""
    path = Path(path)
    if not path.exists():
        raise CdiffError(f"path not found: {path}")
    if (path / ADAPTER_CONFIG).is_file():
        config = read_adapter_config(path)
        tensors = load_safetensors(path / "adapter.safetensors", "adapter weights")
        return {"kind": "adapter", "path": str(path), "parameters": sum(t.numel() for t in tensors.values()), **config}
    config = read_model_config(path)
    tensors = load_safetensors(path / MODEL_WEIGHTS, "model weights")
    return {"kind": "model", "path": str(path), "parameters": sum(t.numel() for t in tensors.values()), **config}
