"""ConvBlock: two convolutions with the time embedding mixed in, then cross-attention to the prompt."""

from __future__ import annotations

import torch
from torch import nn

from cdiff.model.attention import CrossAttention


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: per-sample statistics keep DDP, EMA and guidance batches independent
    return nn.GroupNorm(min(8, channels // 4), channels)


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, ctx_dim: int, attn_dim: int, n_heads: int, ff_mult: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), group_norm(out_ch), nn.SiLU())
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, padding=1), group_norm(out_ch), nn.SiLU())
        self.attn = CrossAttention(out_ch, ctx_dim, attn_dim, n_heads, ff_mult)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, out_ch, H, W)
        x = x + self.time_proj(t_emb)[:, :, None, None]  # time added per channel
        x = self.conv2(x)
        return self.attn(x, ctx)
