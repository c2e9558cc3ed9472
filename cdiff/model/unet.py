"""The UNet: eps = unet(x_t, t, y). ConvBlocks with cross-attention on every down and up level."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdiff.config import ModelConfig
from cdiff.model.blocks import ConvBlock
from cdiff.model.embeddings import PromptEncoder, TimeEmbedding


class UNet(nn.Module):
    def __init__(self, config: ModelConfig, class_names: list[str] | None = None):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        chans = c.base_channels
        block = dict(time_dim=c.time_dim, ctx_dim=c.ctx_dim, attn_dim=c.attn_dim, n_heads=c.n_heads, ff_mult=c.ff_mult)
        self.time = TimeEmbedding(c.time_dim)
        self.prompt = PromptEncoder(c.num_classes, c.n_ctx, c.ctx_dim, class_names)
        self.stem = nn.Conv2d(c.channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = chans[0]
        for i, ch in enumerate(chans):
            self.down.append(ConvBlock(prev, ch, **block))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.mid = ConvBlock(prev, prev, **block)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            last = i == len(chans) - 1
            self.upsample.append(nn.Identity() if last else nn.ConvTranspose2d(prev, prev, 2, stride=2))
            self.up.append(ConvBlock(prev + chans[i], chans[i], **block))
            prev = chans[i]
        self.head = nn.Conv2d(prev, c.channels, 1)

    @property
    def class_names(self) -> list[str]:
        return self.prompt.class_names

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self._pad(x)  # sizes need not be powers of two: pad to a multiple of 2**(levels-1), crop at the end
        t_emb = self.time(t)  # (B, time_dim)
        ctx = self.prompt(y)  # (B, n_ctx, ctx_dim)
        x = self.stem(x)
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            x = block(x, t_emb, ctx)
            skips.append(x)
            x = down(x)  # (B, C, H/2, W/2) except on the last level
        x = self.mid(x, t_emb, ctx)
        for block, up in zip(self.up, self.upsample, strict=True):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1), t_emb, ctx)
        return self.head(x)[..., :h, :w]  # (B, channels, H, W)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        m = 2 ** (len(self.config.base_channels) - 1)
        h, w = x.shape[-2:]
        return F.pad(x, (0, (-w) % m, 0, (-h) % m))
