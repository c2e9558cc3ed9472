"""Where a model or adapter comes from: a local folder, or a URI that a resolver turns into one.

`resolve("models:/cdiff-adapter-digits@champion", "adapter")` asks the resolver registered for the
URI's scheme (`models`) under the entry-point group `cdiff.uri_resolvers` for a local folder. A path
(any `os.PathLike`, or a string without `scheme:/`) is returned as it is. Either way the caller then
checks the folder exactly as a local one: its format, the fingerprints of its weights, and the base an
adapter belongs to. cdiff itself knows no scheme and imports no MLflow: this project's pipelines
package registers `models` and `runs` (pyproject.toml) with a resolver that downloads from MLflow.

A resolver is `resolve(uri: str, kind: str | None) -> Path`: the local folder of the model or adapter
(`kind`) that the URI names; kind None (`cdiff info`) means whichever it holds, the adapter first; kind
"base" the base model that comes with an adapter (an MLflow adapter model bundles the base it was trained
on), so that `cdiff sample models:/cdiff-adapter-digits@champion` needs nothing beside it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from cdiff.errors import CdiffError, shown

GROUP = "cdiff.uri_resolvers"
KINDS = ("model", "adapter", "base")

_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")  # two letters at least: C:/ is a Windows path
_origins: dict[Path, str] = {}  # resolved folder -> the URI it came from, for messages


def is_uri(source) -> bool:
    """A string of the form scheme:/...; a Path is always a path (give ./models:/x for such a folder)."""
    return isinstance(source, str) and _URI.match(source) is not None


def known_schemes() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def resolver_for(scheme: str) -> tuple[Callable, str]:
    """(the resolver of a scheme, where it came from: 'entry point NAME = VALUE'), found by entry point only."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == scheme]
    if not found:
        schemes = (
            ", ".join(s + ":/" for s in known_schemes())
            or "none is installed: pip install -e . registers models:/ and runs:/"
        )
        raise CdiffError(
            f"unknown URI scheme {scheme!r}: give a folder, or a URI of a scheme cdiff has a resolver for ({schemes})"
        )
    target, origin = found[0].value, f"entry point {scheme} = {found[0].value}"
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not module_name.startswith(e.name):  # the resolver is there, a dependency is not
            raise CdiffError(
                f"the resolver of {scheme}:/ URIs ({target}) needs {e.name}, which is not installed"
            ) from e
        raise CdiffError(
            f"the resolver of {scheme}:/ URIs ({target}) is registered but not importable: reinstall cdiff "
            "(pip install -e . in the cdiff repository), or give a local folder"
        ) from e
    return getattr(module, attr), origin


def resolve(source, kind: str | None = None) -> Path:
    """The local folder of a model or adapter: a path as given (`~` expanded), or a URI's resolved folder."""
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if not is_uri(source):
        return Path(source).expanduser()
    resolver, _ = resolver_for(_URI.match(source).group(1))
    folder = Path(resolver(source, kind)).absolute()
    if not folder.is_dir():
        raise CdiffError(f"the resolver of {shown(source)} gave {folder}, which is not a folder")
    _origins[folder] = source
    return folder


def origin(path) -> str | None:
    """The URI a resolved folder (or a file in it) came from, or None for a path of the user's own."""
    path = Path(path)
    for folder, uri in _origins.items():
        if path == folder or folder in path.parents:
            return uri
    return None
