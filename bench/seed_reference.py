"""The original design's network, for side-by-side benchmarks only (not used by cdiff).

From the design note in shared/reference: BatchNorm conv blocks, the time embedding added per
channel, and a cross-attention whose prompt is a single vector: one key and one value, so the
softmax is always 1 (the weakness cdiff fixes with n_ctx prompt tokens). Attention by explicit
matmul and softmax, as written there. The UNet around the blocks mirrors cdiff's (max-pool down,
transposed-conv up, skip connections) so that only the blocks differ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cdiff.model.embeddings import TimeEmbedding


class SeedCrossAttention(nn.Module):
    def __init__(self, channel, qsize, vsize, fsize, cls_emb_size):
        super().__init__()
        self.w_q = nn.Linear(channel, qsize)
        self.w_k = nn.Linear(cls_emb_size, qsize)
        self.w_v = nn.Linear(cls_emb_size, vsize)
        self.z_linear = nn.Linear(vsize, channel)
        self.norm1 = nn.LayerNorm(channel)
        self.feedforward = nn.Sequential(nn.Linear(channel, fsize), nn.ReLU(), nn.Linear(fsize, channel))
        self.norm2 = nn.LayerNorm(channel)

    def forward(self, x, cls_emb):
        x = x.permute(0, 2, 3, 1)
        q = self.w_q(x).flatten(1, 2)  # (B, HW, q)
        k = self.w_k(cls_emb).unsqueeze(2)  # (B, q, 1): one key
        v = self.w_v(cls_emb).unsqueeze(1)  # (B, 1, v): one value
        attn = torch.softmax(q @ k / math.sqrt(q.size(2)), dim=-1)  # always 1
        z = self.z_linear(attn @ v).view(x.shape)
        z = self.norm1(z + x)
        return self.norm2(self.feedforward(z) + z).permute(0, 3, 1, 2)


class SeedConvBlock(nn.Module):
    def __init__(self, cin, cout, time_dim, qsize, vsize, fsize, cls_emb_size):
        super().__init__()
        self.seq1 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        self.time_emb_linear = nn.Linear(time_dim, cout)
        self.seq2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        self.crossattn = SeedCrossAttention(cout, qsize, vsize, fsize, cls_emb_size)

    def forward(self, x, t_emb, cls_emb):
        x = self.seq1(x)
        x = self.seq2(x + torch.relu(self.time_emb_linear(t_emb))[:, :, None, None])
        return self.crossattn(x, cls_emb)


class SeedUNet(nn.Module):
    def __init__(self, channels=(24, 48, 96), img_channels=1, num_classes=10, time_dim=128, cls_emb_size=64, attn=64):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        self.cls_emb = nn.Embedding(num_classes + 1, cls_emb_size)
        chans = [img_channels, *channels]
        self.down = nn.ModuleList(
            SeedConvBlock(chans[i], chans[i + 1], time_dim, attn, attn, 2 * chans[i + 1], cls_emb_size)
            for i in range(len(channels))
        )
        self.pool = nn.MaxPool2d(2)
        self.deconv = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i + 1], 2, stride=2) for i in range(len(channels) - 1, 0, -1)
        )
        self.up = nn.ModuleList(
            SeedConvBlock(chans[i + 1] + chans[i], chans[i], time_dim, attn, attn, 2 * chans[i], cls_emb_size)
            for i in range(len(channels) - 1, 0, -1)
        )
        self.out = nn.Conv2d(channels[0], img_channels, 1)
        self.levels = len(channels)

    def forward(self, x, t, y):
        h0, w0 = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        x = nn.functional.pad(x, (0, (-w0) % m, 0, (-h0) % m))
        t_emb, c = self.time(t), self.cls_emb(y)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x, t_emb, c)
            if i < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for deconv, block in zip(self.deconv, self.up, strict=True):
            x = block(torch.cat([deconv(x), skips.pop()], dim=1), t_emb, c)
        return self.out(x)[..., :h0, :w0]


def seed_unet_like(params: int, **kwargs) -> SeedUNet:
    """A SeedUNet whose width is scaled until its parameter count is closest to `params`."""
    best = None
    for width in range(8, 65, 2):
        chans = (width, 2 * width, 4 * width)
        model = SeedUNet(chans, **kwargs)
        n = sum(p.numel() for p in model.parameters())
        if best is None or abs(n - params) < abs(best[0] - params):
            best = (n, chans)
    return SeedUNet(best[1], **kwargs)
