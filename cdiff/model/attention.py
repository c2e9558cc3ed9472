"""Cross-attention transformer block: pixels are queries, prompt tokens are keys and values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head cross-attention, then residual + LayerNorm + feed-forward + residual + LayerNorm.

    The module names w_q, w_k, w_v follow the original design and are LoRA's default targets.
    """

    def __init__(self, channels: int, ctx_dim: int, attn_dim: int, n_heads: int, ff_mult: int):
        super().__init__()
        self.n_heads = n_heads
        self.w_q = nn.Linear(channels, attn_dim)
        self.w_k = nn.Linear(ctx_dim, attn_dim)
        self.w_v = nn.Linear(ctx_dim, attn_dim)
        self.w_o = nn.Linear(attn_dim, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.feedforward = nn.Sequential(
            nn.Linear(channels, ff_mult * channels), nn.GELU(), nn.Linear(ff_mult * channels, channels)
        )
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = x.flatten(2).transpose(1, 2)  # (B, HW, C): every pixel is a query
        q = self._heads(self.w_q(pixels))  # (B, heads, HW, d)
        k = self._heads(self.w_k(ctx))  # (B, heads, n_ctx, d)
        v = self._heads(self.w_v(ctx))  # (B, heads, n_ctx, d)
        z = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        z = z.transpose(1, 2).reshape(b, h * w, -1)  # (B, HW, attn_dim)
        z = self.norm1(pixels + self.w_o(z))  # (B, HW, C)
        out = self.norm2(z + self.feedforward(z))
        return out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
