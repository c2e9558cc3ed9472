"""Fuzzing the params dataclasses: mutated params dicts through `from_dict` + `validate`, and the same
as YAML text through `load_params`. Either every float that comes out is finite, or one short line."""

import dataclasses
import math
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cdiff.config import from_dict
from cdiff.errors import CdiffError
from pipelines.core.config import Params, load_params
from tests.fuzzing import FUZZ, NASTY_VALUES

TINY = yaml.safe_load((Path(__file__).parent / "tiny_params.yaml").read_text())
TRANSFORMS = ["rotate:nan", "rotate:1e999", "rotate:-90", "invert:1", "limit_per_class:0", "subset_classes:[1, 1]"]
TRANSFORMS += ["subset_classes:[]", "subset_classes:[[1]]", "subset_classes:[0, '0']", "blur", "rotate:"]


def _paths(obj, prefix=()) -> list[tuple]:
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


PATHS = _paths(TINY)


def _mutated(mutations) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(TINY))  # a deep copy
    for op, i, value in mutations:
        *parents, last = PATHS[i % len(PATHS)]
        target = raw
        for k in parents:
            try:
                target = target[k]
            except (KeyError, IndexError, TypeError):
                target = None
                break
        if isinstance(target, dict) and op == "add":
            target[f"unknown_{last}"] = value
        elif isinstance(target, dict) and op == "delete":
            target.pop(last, None)
        elif isinstance(target, dict | list) and op == "replace":
            try:
                target[last] = value
            except (IndexError, TypeError):
                pass
    return raw


def _floats(obj):
    """Every float in a built dataclass tree."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)
    elif isinstance(obj, float):
        yield obj


mutations = st.lists(
    st.tuples(
        st.sampled_from(["replace", "replace", "replace", "delete", "add"]),
        st.integers(0, len(PATHS) * 4),
        st.sampled_from(NASTY_VALUES + TRANSFORMS),
    ),
    min_size=1,
    max_size=4,
)


def _check(build) -> None:
    try:
        params = build()
    except CdiffError as e:
        assert "\n" not in str(e) and len(str(e)) < 600, str(e)[:1000]
        return
    assert all(math.isfinite(v) for v in _floats(params))


@settings(FUZZ, max_examples=400)
@given(mutations=mutations)
def test_fuzzed_params_dicts_build_finite_configs_or_one_line(mutations):
    raw = _mutated(mutations)

    def build():
        params = from_dict(Params, raw, "")
        params.validate()
        return params

    _check(build)


@settings(FUZZ, max_examples=100)
@given(mutations=mutations)
def test_fuzzed_params_yaml_files_load_or_one_line(tmp_path_factory, mutations):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.dump(_mutated(mutations), allow_unicode=False))
    _check(lambda: load_params(path))
