"""The judge: a small CNN classifier trained on a domain's real images, offline.

It scores generated samples twice: its predicted class (GAN-test accuracy) and its penultimate
features (the space FID is measured in, instead of downloaded Inception weights).
Saved as judge.safetensors + config.json; loading never unpickles.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cdiff.batches import BatchPlan
from cdiff.config import JudgeConfig, from_dict, to_dict
from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.io import atomic_dir, fingerprint, load_safetensors, read_json, save_safetensors, write_json

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "config.json"


class Judge(nn.Module):
    def __init__(self, channels: int, num_classes: int, config: JudgeConfig):
        super().__init__()
        w = config.width
        self.channels, self.num_classes, self.config = channels, num_classes, config
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * w * 16, config.features),
            nn.ReLU(),
        )
        self.head = nn.Linear(config.features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [-1, 1] -> (N, features): the FID feature space."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations of up to `pixels` (padding with background): the judge sees position jitter."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dx, dy = (torch.randint(0, 2 * pixels + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h)[None]).clamp(max=h + 2 * pixels - 1)
    cols = (dx[:, None] + torch.arange(w)[None]).clamp(max=w + 2 * pixels - 1)
    idx = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_judge(data: ImageSet, config: JudgeConfig, seed: int = 0, progress: bool = True) -> Judge:
    """Train the judge on real images (seeded: the same data and seed give the same weights)."""
    if len(data) == 0:
        raise CdiffError("the judge needs training images: the split is empty")
    torch.manual_seed(seed)
    judge = Judge(data.images.shape[1], len(data.class_names), config)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    plan = BatchPlan(len(data), config.batch_size, seed + 17)
    images = data.as_float()
    g = torch.Generator().manual_seed(seed + 29)
    judge.train()
    bar = tqdm(range(config.steps), desc="judge", disable=not progress, leave=False)
    for step in bar:
        index = plan.global_batch(step)
        loss = F.cross_entropy(judge(_shift(images[index], g)), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted class) of images in [-1, 1]."""
    judge.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = judge.features(images[i : i + batch_size].float())
        feats.append(f)
        preds.append(judge.head(f).argmax(1))
    if not feats:
        return torch.empty(0, judge.config.features), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(preds)


def save_judge(judge: Judge, class_names: list[str], path, extra: dict | None = None) -> str:
    state = judge.state_dict()
    fp = fingerprint(state)
    config = {
        "format": "cdiff-judge",
        "version": 1,
        "channels": judge.channels,
        "class_names": list(class_names),
        "judge": to_dict(judge.config),
        "fingerprint": fp,
        **(extra or {}),
    }
    with atomic_dir(path) as tmp:
        save_safetensors(state, tmp / JUDGE_WEIGHTS)
        write_json(tmp / JUDGE_CONFIG, config)
    return fp


def load_judge(path) -> tuple[Judge, dict]:
    path = Path(path)
    config = read_json(path / JUDGE_CONFIG, "judge config")
    if config.get("format") != "cdiff-judge":
        raise CdiffError(f"{path} is not a cdiff judge folder (config.json has no format: cdiff-judge)")
    try:
        judge = Judge(config["channels"], len(config["class_names"]), from_dict(JudgeConfig, config["judge"], "judge"))
    except KeyError as e:
        raise CdiffError(f"{path / JUDGE_CONFIG} misses {e}: the file is corrupt") from e
    state = load_safetensors(path / JUDGE_WEIGHTS, "judge weights")
    if fingerprint(state) != config.get("fingerprint"):
        raise CdiffError(f"{path / JUDGE_WEIGHTS} does not match the fingerprint in config.json: the file is corrupt")
    judge.load_state_dict(state)
    return judge.eval(), config
