"""Params overlays: a YAML file of changes to params.yaml (e.g. params-gpu.yaml, the GPU profile).

`merge` applies an overlay to the params as data; `set_args` turns it into `key=value` pairs with
dotted keys, the form of `dvc exp run -S` (values in compact JSON, which YAML reads back unchanged):

    python -m pipelines.core.overlay params-gpu.yaml     # prints -S 'ray.use_gpu=true' -S ...
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml

from cdiff.errors import CdiffError


def read_overlay(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"overlay not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise CdiffError(f"{path}: an overlay is a mapping of params to change")
    return raw


def merge(params: dict, overlay: dict, key: str = "") -> dict:
    """A copy of `params` with the overlay's values; mappings merge key by key, anything else replaces.

    A key new to `params` is added, as `dvc exp run -S` adds it: cdiff.config.load_params refuses typos.
    """
    out = copy.deepcopy(params)
    for k, v in overlay.items():
        here = f"{key}.{k}" if key else str(k)
        old = out.get(k)
        out[k] = merge(old, v, here) if isinstance(v, dict) and isinstance(old, dict) else copy.deepcopy(v)
    return out


def set_args(overlay: dict, key: str = "") -> list[str]:
    """['ray.use_gpu=true', 'model.base_channels=[64,128,256]', ...]: one pair per leaf of the overlay."""
    pairs = []
    for k, v in overlay.items():
        here = f"{key}.{k}" if key else str(k)
        if isinstance(v, dict):
            pairs += set_args(v, here)
        else:
            value = json.dumps(v, separators=(",", ":"))
            if any(c.isspace() for c in value) or "'" in value:
                raise CdiffError(f"overlay value of {here} has a space or quote: {value}")
            pairs.append(f"{here}={value}")
    return pairs


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(
            "usage: python -m pipelines.core.overlay OVERLAY.yaml   (prints dvc exp run -S arguments)", file=sys.stderr
        )
        return 2
    try:
        print(" ".join(f"-S '{pair}'" for pair in set_args(read_overlay(argv[0]))))
    except CdiffError as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
