from pathlib import Path

import pytest
import yaml

from cdiff.errors import CdiffError
from pipelines.core.config import load_params
from pipelines.core.overlay import merge, read_overlay, set_args

ROOT = Path(__file__).resolve().parents[1]


def _apply(params: dict, pairs: list[str]) -> dict:
    """What `dvc exp run -S key=value ...` does to params.yaml, with DVC's own (Hydra's) override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = yaml.safe_load(yaml.safe_dump(params))
    for override in OverridesParser.create().parse_overrides(pairs):
        *path, leaf = override.key_or_group.split(".")
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = override.value()
    return out


def test_gpu_profile_is_valid_params_and_its_set_args_reproduce_it(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overlay = read_overlay(ROOT / "params-gpu.yaml")
    merged = merge(params, overlay)
    assert _apply(params, set_args(overlay)) == merged
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged))
    p = load_params(tmp_path / "params.yaml")
    assert p.ray.use_gpu and p.evaluate.fid_per_class == 1000 and p.train.base.precision == "bf16"
    assert set(p.evaluate.full_finetune) == set(p.data.domains)  # full fine-tunes of both domains


def test_merge_keeps_what_the_overlay_does_not_name():
    params = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert merge(params, {"a": {"c": [3]}}) == {"a": {"b": 1, "c": [3]}, "d": "x"}
    assert params == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}  # not changed in place
    assert set_args({"a": {"c": [3, 4], "e": "dpm++2m"}}) == ["a.c=[3,4]", 'a.e="dpm++2m"']


def test_values_with_spaces_are_refused():
    with pytest.raises(CdiffError, match="a.b"):
        set_args({"a": {"b": "two words"}})
