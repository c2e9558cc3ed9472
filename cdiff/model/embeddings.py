"""Time-step embedding and the prompt encoder (class id -> several context tokens)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cdiff.errors import CdiffError


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) integer time steps -> (B, dim) sin/cos features, as in "Attention is all you need"."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))  # (B, dim)


class PromptEncoder(nn.Module):
    """Maps a class id to `n_ctx` context tokens of width `ctx_dim`.

    Id `num_classes` is the null prompt used for classifier-free guidance. Each class owns its
    own `n_ctx` tokens plus a shared positional embedding, so the tokens differ and attention
    over them is not constant (with one token, softmax over one key is always 1).
    """

    def __init__(self, num_classes: int, n_ctx: int, ctx_dim: int, class_names: list[str] | None = None):
        super().__init__()
        self.num_classes, self.n_ctx, self.ctx_dim = num_classes, n_ctx, ctx_dim
        self.embedding = nn.Embedding(num_classes + 1, n_ctx * ctx_dim)
        self.position = nn.Parameter(torch.randn(n_ctx, ctx_dim).mul_(0.02))  # in place: cheap on the meta device too
        self.norm = nn.LayerNorm(ctx_dim)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        ctx = self.embedding(y).view(y.shape[0], self.n_ctx, self.ctx_dim)  # (B, n_ctx, ctx_dim)
        return self.norm(ctx + self.position)

    def class_ids(self, names_or_ids: list[str | int]) -> list[int]:
        """Resolve class names (exact, then case-insensitive) or integer ids to ids; one-line error if unknown."""
        lookup = {n: i for i, n in enumerate(self.class_names)}
        folded = {n.casefold(): i for i, n in enumerate(self.class_names)}
        ids = []
        for item in names_or_ids:
            s = str(item)
            if s in lookup:
                ids.append(lookup[s])
            elif s.casefold() in folded:
                ids.append(folded[s.casefold()])
            elif s.lstrip("-").isdigit() and 0 <= int(s) < len(self.class_names):
                ids.append(int(s))
            else:
                known = ", ".join(self.class_names)
                raise CdiffError(f"unknown class {s!r}: this model knows {known} (or ids 0..{len(lookup) - 1})")
        return ids
