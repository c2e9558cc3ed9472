"""Per-layer rank and alpha (PEFT's rank_pattern / alpha_pattern): injected, saved, loaded, mixed, exported."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from cdiff.adapter_format import load_adapter, save_adapter
from cdiff.config import LoraConfig
from cdiff.errors import CdiffError
from cdiff.lora import inject_lora, lora_layers, pattern_value, unload_lora
from cdiff.mixing import load_adapters
from cdiff.model import UNet
from cdiff.peft_format import export_peft
from tests.conftest import tiny_config
from tests.test_lora import _randomize_lora

UP = {r"up\..*": 6, "w_v": 3}  # the up path's layers rank 6, the other value projections 3, the rest r=2
ALPHA = {"w_q": 8.0}


def _ranks(model) -> dict[str, int]:
    return {name: m.r for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def test_patterns_pick_each_layers_rank_and_alpha_first_match_first():
    assert pattern_value("up.0.attn.w_v", UP, 2) == 6  # the up path's key comes first
    assert pattern_value("down.1.attn.w_v", UP, 2) == 3 and pattern_value("mid.attn.w_q", UP, 2) == 2
    assert pattern_value("xw_v", UP, 2) == 2  # a suffix is a whole module name, not any ending
    torch.manual_seed(0)
    model = UNet(tiny_config(), ["a", "b", "c"])
    inject_lora(model, r=2, alpha=2.0, rank_pattern=UP, alpha_pattern=ALPHA)
    ranks = _ranks(model)
    assert ranks["up.0.attn.w_q"] == 6 and ranks["up.1.attn.w_v"] == 6
    assert ranks["down.0.attn.w_v"] == 3 and ranks["down.0.attn.w_k"] == 2 and ranks["mid.attn.w_q"] == 2
    layers = dict(model.named_modules())
    assert layers["down.0.attn.w_q"].scaling == pytest.approx(8.0 / 2)  # alpha_pattern's alpha over its own r
    assert layers["up.0.attn.w_q"].scaling == pytest.approx(8.0 / 6)
    assert layers["down.0.attn.w_k"].scaling == pytest.approx(2.0 / 2)
    assert layers["up.0.attn.w_q"].lora_A.shape[1] == 6 and layers["down.0.attn.w_v"].lora_B.shape[0] == 3


def test_a_patterned_adapter_saves_loads_mixes_and_exports_with_its_ranks(tmp_path, tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    inject_lora(tiny_model, r=2, alpha=2.0, rank_pattern=UP, alpha_pattern=ALPHA)
    _randomize_lora(tiny_model, seed=0)
    deltas = {
        n: (m.lora_A @ m.lora_B).T.detach() * m.scaling
        for n, m in tiny_model.named_modules()
        if hasattr(m, "base_layer")
    }
    save_adapter(tiny_model, tmp_path / "a")
    unload_lora(tiny_model)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == UP and saved["alpha_pattern"] == ALPHA
    fresh = UNet(tiny_config(), ["cat", "dog", "bird"])
    fresh.load_state_dict(base)
    load_adapter(fresh, tmp_path / "a")
    assert _ranks(fresh) == {name: pattern_value(name, UP, 2) for name in deltas}  # each layer its own rank
    mixed = UNet(tiny_config(), ["cat", "dog", "bird"])
    mixed.load_state_dict(base)
    load_adapters(mixed, [(tmp_path / "a", 0.5)])  # each layer's delta with its own scaling, by hand below
    for name, delta in deltas.items():
        got = mixed.get_submodule(name).weight - base[f"{name}.weight"]
        assert torch.allclose(got, 0.5 * delta, atol=1e-6), name
    export_peft(tmp_path / "a", tmp_path / "peft")
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft["rank_pattern"] == UP and peft["alpha_pattern"] == ALPHA
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors["base_model.model.up.0.attn.w_q.lora_A.weight"].shape[0] == 6  # (r, in), the layer's own r
    back = UNet(tiny_config(), ["cat", "dog", "bird"])
    back.load_state_dict(base)
    load_adapter(back, tmp_path / "peft")
    assert _ranks(back) == _ranks(fresh)


def test_bad_patterns_are_refused_in_one_line():
    for pattern, message in [
        ({"w_q(": 4}, "rank_pattern: 'w_q(' is not a valid pattern"),
        ({"w_q": 0}, "rank_pattern: 'w_q': must be an integer rank in (0, 4096]"),
        ({"w_q": 2.5}, "rank_pattern: 'w_q': must be an integer rank"),
        ({"w_q": True}, "rank_pattern: 'w_q': must be an integer rank"),
    ]:
        with pytest.raises(CdiffError, match="^" + re.escape(f"lora.{message}")):
            LoraConfig(rank_pattern=pattern).validate("lora")
    with pytest.raises(CdiffError, match="alpha_pattern: 'w_q': must be an alpha"):
        LoraConfig(alpha_pattern={"w_q": float("nan")}).validate("lora")
    model = UNet(tiny_config(), ["a", "b", "c"])
    with pytest.raises(CdiffError, match="rank_pattern"):
        inject_lora(model, rank_pattern={"w_q": -1})
    assert not lora_layers(model)  # refused before the model changed
