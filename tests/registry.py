"""A tiny MLflow registry for tests, logged and registered as the pretrain, finetune and evaluate stages do.

Two bases (seeds 0 and 1), and adapters on them, in a temp sqlite store (registry.log_servable,
set_base_alias, set_champion): seconds, not the minutes of a `dvc repro`.

- cdiff-base v1 (alias adapters), v2 (other weights)
- cdiff-adapter-digits v1, v2 (champion: the lower FID) on base v1
- cdiff-adapter-letters v1 (champion) on base v1, with its own class names (prompt trained)
- cdiff-adapter-foreign v1 (champion) on base v2
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cdiff import results
from cdiff.adapter_format import save_adapter
from cdiff.checkpoint import save_model
from cdiff.config import DiffusionConfig
from cdiff.lora import inject_lora, lora_layers
from cdiff.model import UNet
from cdiff.samplers import Sampler
from tests.conftest import tiny_config
from tests.helpers import ROOT

SAMPLER = Sampler("ddim", 4, 0.0, 2.0)
CLASSES = ["zero", "one", "two"]


@dataclass
class Registry:
    root: Path
    uri: str  # the tracking URI (sqlite)
    env: dict  # for subprocesses: the tracking URI, its own cache, this checkout on PYTHONPATH
    folders: dict[str, Path]  # the local folders that were registered, by name ("base", "digits-v2", ...)


def _base(folder: Path, seed: int) -> UNet:
    torch.manual_seed(seed)
    model = UNet(tiny_config(), CLASSES)
    save_model(model, DiffusionConfig(timesteps=20), folder)
    return model


def _adapter(base: UNet, folder: Path, seed: int, class_names=None) -> None:
    """A trained-looking adapter: random lora_B (a fresh one is the base exactly)."""
    inject_lora(base, r=2, alpha=2.0, extra_trainable=["prompt"] if class_names else [])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(base):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
        if class_names:
            base.prompt.embedding.weight.add_(torch.randn(base.prompt.embedding.weight.shape, generator=generator))
    save_adapter(base, folder, class_names=class_names)
    from cdiff.lora import unload_lora

    unload_lora(base)


def make_registry(root: Path) -> Registry:
    import mlflow

    from cdiff.checkpoint import read_model_config
    from pipelines.core import registry, tracking

    uri = f"sqlite:///{root}/mlflow.db"
    folders = {"base": root / "base", "base2": root / "base2"}
    bases = {"base": _base(folders["base"], 0), "base2": _base(folders["base2"], 1)}
    adapters = {  # name -> (base, seed, class names, fid)
        "digits-v1": ("base", 10, None, 5.0),
        "digits-v2": ("base", 11, None, 3.0),
        "letters-v1": ("base", 12, ["a", "b", "c"], 4.0),
        "foreign-v1": ("base2", 13, None, 6.0),
    }
    (root / "adapters").mkdir()
    for name, (base, seed, names, _) in adapters.items():
        folders[name] = root / "adapters" / name
        _adapter(bases[base], folders[name], seed, names)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("cdiff-test", artifact_location=(root / "mlartifacts").as_uri())
            fingerprints = {}
            for base in ("base", "base2"):
                with mlflow.start_run(experiment_id=experiment, tags={"stage": "pretrain"}):
                    fp = read_model_config(folders[base]).fingerprint
                    fingerprints[base] = fp
                    tracking.log_files(folders[base], "model")
                    registry.log_servable(
                        "cdiff-base", folders[base], None, SAMPLER, registry.VersionTags(fingerprint=fp)
                    )
            tracking.client().set_registered_model_alias("cdiff-base", "adapters", "1")
            for name, (base, _, _, fid) in adapters.items():
                domain = name.split("-")[0]
                with mlflow.start_run(experiment_id=experiment, tags={"stage": "finetune", "domain": domain}):
                    tracking.log_files(folders[name], "adapter")
                    tags = registry.VersionTags(r=2, alpha=2.0, val_loss=fid / 10, base_fingerprint=fingerprints[base])
                    model = f"cdiff-adapter-{domain}"
                    version = registry.log_servable(model, folders[base], folders[name], SAMPLER, tags)
                registry.set_champion(model, version, results.Score(fid, 0.9, 30, [fid - 0.5, fid + 0.5]))
        finally:
            mlflow.set_tracking_uri(None)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "CDIFF_CACHE": str(root / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    return Registry(root, uri, env, folders)
