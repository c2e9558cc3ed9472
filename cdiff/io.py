"""Atomic writes and weight fingerprints: every file cdiff writes goes through `atomic_write`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from cdiff.errors import CdiffError


def check_output_folder(path: Path) -> None:
    """Fail early, in one line, when `path` cannot be written because of its folder."""
    if not path.parent.is_dir():
        raise CdiffError(f"output folder {path.parent} does not exist: create it first")
    if not os.access(path.parent, os.W_OK):
        raise CdiffError(f"output folder {path.parent} is not writable: choose another output path")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one `os.replace`.

    A crash or exception leaves the old file (or nothing), never a half-written one.
    """
    path = Path(path)
    check_output_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CdiffError(f"{what} {path} is not valid JSON ({e.__class__.__name__}): the file is corrupt") from e
    if not isinstance(obj, dict):
        raise CdiffError(f"{what} {path} must hold a JSON object")
    return obj


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted name order: equal iff the weights are equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it takes `path`'s place (old content removed)."""
    path = Path(path)
    check_output_folder(path)
    if path.exists() and not path.is_dir():
        raise CdiffError(f"{path} exists and is not a folder: choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Load tensors only: safetensors never runs code, and a pickle or junk file is refused in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CdiffError(f"{what} {path} is not a valid safetensors file ({str(e).splitlines()[0]})") from e


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
