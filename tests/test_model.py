import pytest
import torch

from cdiff.errors import CdiffError
from cdiff.model import CrossAttention, UNet
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    "size,channels,levels", [(28, 1, [8, 16, 32]), (32, 3, [8, 16, 32]), (48, 1, [8, 16]), (20, 3, [8, 16, 32])]
)
def test_unet_output_shape_matches_input(size, channels, levels):
    model = UNet(tiny_config(image_size=size, channels=channels, base_channels=levels))
    x = torch.randn(2, channels, size, size)
    eps = model(x, torch.tensor([0, 7]), torch.tensor([0, 3]))  # 3 is the null class
    assert eps.shape == x.shape


def test_attention_gradients_reach_w_q_and_w_k(tiny_model):
    x = torch.randn(4, 1, 12, 12)
    tiny_model(x, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])).pow(2).mean().backward()
    attns = [m for m in tiny_model.modules() if isinstance(m, CrossAttention)]
    assert len(attns) == 2 + 1 + 2  # down levels, middle, up levels
    for attn in attns:
        for layer in (attn.w_q, attn.w_k, attn.w_v):
            assert layer.weight.grad is not None and layer.weight.grad.abs().max() > 0


def test_single_token_attention_gives_w_q_and_w_k_no_gradient():
    # why n_ctx > 1 matters: softmax over one key is constant 1, so neither queries nor keys reach the output
    attn = CrossAttention(8, 16, 16, 2, 2)
    x, w = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)  # loss = <out, w>: .sum() after LayerNorm is ~constant
    (attn(x, torch.randn(2, 1, 16)) * w).sum().backward()
    for layer in (attn.w_q, attn.w_k):
        assert layer.weight.grad.abs().max() < 1e-6  # zero up to float rounding
    assert attn.w_v.weight.grad.abs().max() > 1e-3  # the value still carries the prompt
    attn.zero_grad()
    (attn(x, torch.randn(2, 4, 16)) * w).sum().backward()
    for layer in (attn.w_q, attn.w_k, attn.w_v):
        assert layer.weight.grad.abs().max() > 1e-3


def test_prompt_tokens_differ_and_null_class_exists(tiny_model):
    ctx = tiny_model.prompt(torch.tensor([0, tiny_model.prompt.null_id]))
    assert ctx.shape == (2, 4, 16)
    assert not torch.allclose(ctx[0, 0], ctx[0, 1])


def test_class_names_resolve_and_unknown_names_fail(tiny_model):
    assert tiny_model.prompt.class_ids(["dog", "BIRD", "0"]) == [1, 2, 0]
    with pytest.raises(CdiffError, match="unknown class 'horse'"):
        tiny_model.prompt.class_ids(["horse"])
