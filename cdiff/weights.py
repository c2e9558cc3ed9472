"""Weights folders: tensors (safetensors) + a JSON config carrying their fingerprint, written and read with checks.

Models (cdiff.checkpoint), adapters (cdiff.adapter_format) and judges (cdiff.judge) are such folders. Saving
goes through the output-path policy and refuses NaN/inf; loading checks the format, the fingerprint,
that every value is finite and (`check_fits`) that the tensors fit the module the config describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from cdiff.errors import CdiffError
from cdiff.io import (
    Artefact,
    atomic_dir,
    check_finite,
    display_path,
    fingerprint,
    load_safetensors,
    read_json,
    save_safetensors,
    write_json,
)


def save_weights_folder(
    artefact: Artefact, path, tensors: dict[str, torch.Tensor], config: dict, *, overwrite: bool = False
) -> str:
    """Write `tensors` and `config` (plus format, version, fingerprint) as one folder, atomically; returns the fingerprint."""
    check_finite(tensors, f"refusing to save {display_path(path)}")
    fp = fingerprint(tensors)
    body = {**config, "format": artefact.format, "version": artefact.version, "fingerprint": fp}
    with atomic_dir(path, artefact, overwrite=overwrite) as tmp:
        save_safetensors(tensors, tmp / artefact.weights)
        write_json(tmp / artefact.marker, body)
    return fp


def read_folder_config(artefact: Artefact, path) -> dict:
    """The folder's JSON config, once its format and version are checked."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CdiffError(f"{artefact.name} not found: {display_path(path)}")
    config = read_json(path / artefact.marker, f"{_kind(artefact)} config")
    if config.get("format") != artefact.format:
        raise CdiffError(
            f"{display_path(path)} is not a cdiff {artefact.name} ({artefact.marker} has no format: {artefact.format})"
        )
    version = config.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= artefact.version:
        raise CdiffError(
            f"{display_path(path / artefact.marker)}: version {version!r} is not one this cdiff reads "
            f"(1..{artefact.version}): use the cdiff that made it"
        )
    return config


def load_weights_folder(artefact: Artefact, path, config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a weights folder whose tensors match their fingerprint and are all finite.

    `config`: the folder's config when the caller has already read (and checked) it.
    """
    path = Path(path).expanduser()
    config = read_folder_config(artefact, path) if config is None else config
    if not isinstance(config.get("fingerprint"), str):
        raise CdiffError(
            f"{display_path(path / artefact.marker)} has no fingerprint of its weights (saved by an older cdiff, "
            "or edited): save or train it again with this cdiff"
        )
    tensors = load_safetensors(path / artefact.weights, f"{_kind(artefact)} weights")
    if fingerprint(tensors) != config["fingerprint"]:
        raise CdiffError(
            f"{display_path(path / artefact.weights)} does not match the fingerprint in {artefact.marker}: "
            "the file is corrupt"
        )
    check_finite(tensors, f"{_kind(artefact)} weights {display_path(path / artefact.weights)}")
    return tensors, config


class _SkipRandomInit(TorchFunctionMode):
    """Random initialisers have nothing to draw on the meta device: skip them (PyTorch's meta `normal_`
    and `randn` import torch._dynamo, seconds per process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.normal_, torch.nn.init.normal_, torch.nn.init.trunc_normal_):
            return args[0] if args else kwargs["tensor"]
        if func is torch.randn:
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules built within have their shapes but no memory or values: check a config before allocating."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def check_fits(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where) -> None:
    """Refuse tensors whose names or shapes differ from `expected` (e.g. the state dict of a module built on
    the meta device: a forged config then allocates nothing)."""
    expected = {k: tuple(v.shape) for k, v in expected.items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected == found:
        return
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    detail = (
        f"missing {missing[0]}"
        if missing
        else f"unexpected {unexpected[0]}"
        if unexpected
        else f"{wrong[0]} has shape {found[wrong[0]]}, expected {expected[wrong[0]]}"
    )
    raise CdiffError(f"the weights in {display_path(where)} do not fit its config ({detail}): the folder is corrupt")


def _kind(artefact: Artefact) -> str:
    return artefact.name.removesuffix(" folder")
