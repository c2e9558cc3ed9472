"""Fuzzing the files a user may be handed: a model's config.json and an adapter's adapter_config.json
(fields replaced, deleted or added; tensors poisoned behind a matching fingerprint), then read by
`load_model`, `load_adapter`, `cdiff info`, `cdiff sample` and `cdiff merge`."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from cdiff.adapter_format import load_adapter
from cdiff.checkpoint import load_model
from cdiff.errors import CdiffError
from cdiff.io import fingerprint
from tests.fuzzing import FUZZ, NASTY_VALUES, assert_contract, copy_of, make_workspace, run_cli, tree
from tests.test_lora import _same, _snapshot


def _paths(obj, prefix=()) -> list[tuple]:
    """Every key path in a JSON object, nested ones included."""
    out = []
    for k, v in obj.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


def _mutate_config(path, mutations) -> None:
    config = json.loads(path.read_text())
    keys = _paths(config)
    for op, i, value in mutations:
        *parents, last = keys[i % len(keys)]
        target = config
        for k in parents:
            target = target.get(k) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if op == "replace":
            target[last] = value
        elif op == "delete":
            target.pop(last, None)
        else:
            target[f"unknown_{last}"] = value
    path.write_text(json.dumps(config, allow_nan=True))


def _poison(weights, i: int, value: float) -> None:
    """A broken tensor behind a fingerprint that matches: only the finite check can catch it."""
    tensors = load_file(str(weights))
    name = sorted(tensors)[i % len(tensors)]
    tensors[name] = tensors[name].clone().view(-1)
    tensors[name][0] = value
    tensors[name] = tensors[name].view(load_file(str(weights))[name].shape)
    save_file(tensors, str(weights))
    config = weights.parent / ("config.json" if weights.name == "model.safetensors" else "adapter_config.json")
    raw = json.loads(config.read_text())
    raw["fingerprint"] = fingerprint(tensors)
    config.write_text(json.dumps(raw))


mutations = st.lists(
    st.tuples(
        st.sampled_from(["replace", "replace", "delete", "add"]), st.integers(0, 50), st.sampled_from(NASTY_VALUES)
    ),
    min_size=1,
    max_size=3,
)
poison = st.none() | st.tuples(st.integers(0, 50), st.sampled_from([float("nan"), float("inf"), -float("inf")]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("config-workspace"))


FILES = {"model": ("config.json", "model.safetensors"), "adapter": ("adapter_config.json", "adapter.safetensors")}


def _mutate(work, folder: str, mutations, poison) -> None:
    config, weights = FILES[folder]
    _mutate_config(work / folder / config, mutations)
    if poison:
        _poison(work / folder / weights, *poison)


def _one_line(error: CdiffError) -> None:
    assert "\n" not in str(error) and len(str(error)) < 600, str(error)[:1000]


def _commands_keep_the_contract(work, folder: str) -> None:
    model = "model" if folder == "adapter" else folder
    adapter = ["--adapter", "adapter"] if folder == "adapter" else []
    for argv in (
        ["info", folder],
        ["sample", model, *adapter, "--n", "1", "--steps", "1", "-o", "out.png"],
        ["merge", model, "adapter", "-o", "merged"],
    ):
        before = tree(work)
        code, _, err = run_cli(argv)
        assert_contract(code, err, work, before, argv[-1] if argv[0] != "info" else None)


@settings(FUZZ, max_examples=50)
@given(mutations=mutations, poison=poison)
def test_fuzzed_model_configs_load_or_are_refused_in_one_line(workspace, mutations, poison):
    with copy_of(workspace) as work:
        _mutate(work, "model", mutations, poison)
        try:
            model, _, _ = load_model(work / "model")
            assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        except CdiffError as e:
            _one_line(e)
        _commands_keep_the_contract(work, "model")


@settings(FUZZ, max_examples=50)
@given(mutations=mutations, poison=poison)
def test_fuzzed_adapter_configs_load_or_leave_the_model_untouched(workspace, mutations, poison):
    with copy_of(workspace) as work:
        _mutate(work, "adapter", mutations, poison)
        model, _, _ = load_model(work / "model")
        before = _snapshot(model)
        try:
            load_adapter(model, work / "adapter")
            assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        except CdiffError as e:
            _one_line(e)
            assert _same(_snapshot(model), before)
        _commands_keep_the_contract(work, "adapter")
