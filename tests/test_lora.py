import pytest
import torch
from torch import nn

from cdiff.errors import CdiffError
from cdiff.lora import (
    LoRALinear,
    inject_lora,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    trainable_parameter_share,
    unload_lora,
    unmerge_lora,
)
from cdiff.model import UNet
from tests.conftest import tiny_config

X, T, Y = torch.randn(2, 1, 12, 12), torch.tensor([3, 30]), torch.tensor([0, 2])


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), r=0, lora_alpha=1)


def test_fresh_lora_reproduces_base_exactly(tiny_model):
    tiny_model.eval()
    before = tiny_model(X, T, Y)
    names = inject_lora(tiny_model, r=2, alpha=4)
    assert len(names) == 3 * 5 and all(n.split(".")[-1] in ("w_q", "w_k", "w_v") for n in names)
    assert torch.equal(tiny_model(X, T, Y), before)


def test_only_lora_trains_and_share_is_small(tiny_model):
    inject_lora(tiny_model, r=2, alpha=2)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    n_train, n_total = trainable_parameter_share(tiny_model)
    assert 0 < n_train / n_total < 0.1


def test_merge_unmerge_round_trip(tiny_model):
    tiny_model.eval()
    base = tiny_model(X, T, Y)
    inject_lora(tiny_model, r=2, alpha=4)
    _randomize_lora(tiny_model)
    unmerged = tiny_model(X, T, Y)
    assert (unmerged - base).abs().max() > 1e-3
    merge_lora(tiny_model)
    assert (tiny_model(X, T, Y) - unmerged).abs().max() < 1e-5
    unmerge_lora(tiny_model)
    assert (tiny_model(X, T, Y) - unmerged).abs().max() < 1e-5
    unload_lora(tiny_model)
    assert torch.equal(tiny_model(X, T, Y), base)


def test_adapter_save_load_round_trip_with_extra_module(tiny_model, tmp_path):
    tiny_model.eval()
    inject_lora(tiny_model, r=2, alpha=4, extra_trainable=["prompt"])
    _randomize_lora(tiny_model)
    expected = tiny_model(X, T, Y)
    save_adapter(tiny_model, tmp_path / "a", class_names=["x", "y", "z"])
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    unload_lora(tiny_model)
    assert tiny_model.class_names == ["cat", "dog", "bird"]
    load_adapter(tiny_model, tmp_path / "a")
    assert torch.equal(tiny_model(X, T, Y), expected)
    assert tiny_model.class_names == ["x", "y", "z"]


def test_swapping_adapters_is_bit_identical_to_a_fresh_load(tiny_model, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for i, name in enumerate("ab"):
        inject_lora(tiny_model, r=2, alpha=2, extra_trainable=["prompt"])
        _randomize_lora(tiny_model, seed=i)
        save_adapter(tiny_model, tmp_path / name)
        unload_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "a")
    merge_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "b")  # swap: unloads a (merged) first
    swapped = tiny_model.eval()(X, T, Y)
    fresh = UNet(tiny_config(), ["cat", "dog", "bird"])
    fresh.load_state_dict(state)
    load_adapter(fresh, tmp_path / "b")
    assert torch.equal(swapped, fresh.eval()(X, T, Y))


def test_adapter_for_other_base_or_architecture_is_refused(tiny_model, tmp_path):
    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "a")
    other = UNet(tiny_config())  # same architecture, other weights
    with pytest.raises(CdiffError, match="fingerprint mismatch"):
        load_adapter(other, tmp_path / "a")
    wider = UNet(tiny_config(n_ctx=2))
    with pytest.raises(CdiffError, match="another model architecture"):
        load_adapter(wider, tmp_path / "a")


def test_merge_and_unload_gives_plain_model(tiny_model):
    tiny_model.eval()
    inject_lora(tiny_model, r=2, alpha=4)
    _randomize_lora(tiny_model)
    expected = tiny_model(X, T, Y)
    merge_and_unload(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    assert (tiny_model(X, T, Y) - expected).abs().max() < 1e-5


def test_lora_follows_the_base_layers_device_and_dtype():
    layer = LoRALinear(nn.Linear(4, 3).double(), r=2, lora_alpha=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.lora_A.device == layer.base_layer.weight.device
    assert layer(torch.randn(5, 4, dtype=torch.float64)).shape == (5, 3)


def test_targets_match_module_name_suffixes(tiny_model):
    names = inject_lora(tiny_model, targets=("w_o", "attn.feedforward.0"), r=1, alpha=1)
    assert len(names) == 2 * 5
    assert all(n.endswith(("attn.w_o", "attn.feedforward.0")) for n in names)


def test_corrupt_or_pickled_adapter_files_are_refused(tiny_model, tmp_path):
    import pickle

    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "a")
    unload_lora(tiny_model)
    weights = tmp_path / "a" / "adapter.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CdiffError, match="not a valid safetensors file"):
        load_adapter(tiny_model, tmp_path / "a")
    weights.write_bytes(pickle.dumps({"lora_A": [1, 2, 3]}))
    with pytest.raises(CdiffError, match="not a valid safetensors file"):
        load_adapter(tiny_model, tmp_path / "a")
    assert getattr(tiny_model, "_cdiff_lora", None) is None  # nothing half-loaded
