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
from cdiff.errors import CdiffError, shown
from cdiff.io import Artefact, display_path
from cdiff.names import check_class_names
from cdiff.weights import check_fits, load_weights_folder, on_meta, read_folder_config, save_weights_folder

JUDGE = Artefact("judge folder", folder=True, marker="config.json", format="cdiff-judge", weights="judge.safetensors")
JUDGE_WEIGHTS, JUDGE_CONFIG = JUDGE.weights, JUDGE.marker


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
        optimizer.zero_grad(set_to_none=True)
        loss = judge_backward(judge, _shift(images[index], g), data.labels[index], config.micro_batch)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return judge.eval()


def judge_backward(judge: Judge, x: torch.Tensor, y: torch.Tensor, micro_batch: int = 0) -> torch.Tensor:
    """The cross-entropy of a batch and its backward, whole or in micro-batches of `micro_batch` rows (0: whole).

    Each micro-batch adds its summed loss over the whole batch's rows: the gradient of the batch's mean, up
    to float rounding (the judge has no batch statistics), from a working set that fits a CPU's cache
    (bench/results/judge-microbatch.json: 1.15x at 64 of 128 on 2 cores)."""
    if not 0 < micro_batch < len(y):
        loss = F.cross_entropy(judge(x), y)
        loss.backward()
        return loss.detach()
    total = torch.zeros(())
    for xc, yc in zip(x.split(micro_batch), y.split(micro_batch), strict=True):
        part = F.cross_entropy(judge(xc), yc, reduction="sum") / len(y)
        part.backward()
        total += part.detach()
    return total


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


def save_judge(judge: Judge, class_names: list[str], path, extra: dict | None = None, *, overwrite=False) -> str:
    """Write the judge folder atomically (an existing judge folder only with `overwrite=True`); returns the fingerprint."""
    check_class_names(list(class_names), "judge class_names")
    config = {
        **(extra or {}),
        "channels": judge.channels,
        "class_names": list(class_names),
        "judge": to_dict(judge.config),
    }
    return save_weights_folder(JUDGE, path, judge.state_dict(), config, overwrite=overwrite)


def load_judge(path) -> tuple[Judge, dict]:
    """Load a judge folder: config checked field by field, weights against the architecture it describes."""
    path = Path(path).expanduser()
    config = read_folder_config(JUDGE, path)
    where = display_path(path / JUDGE_CONFIG)
    for key in ("channels", "class_names", "judge"):
        if key not in config:
            raise CdiffError(f"{where} misses {key!r}: the file is corrupt")
    if config["channels"] not in (1, 3) or isinstance(config["channels"], bool):
        raise CdiffError(f"{where}: channels must be 1 or 3, got {shown(config['channels'])}")
    names = check_class_names(config["class_names"], f"{where}: class_names")
    judge_config = from_dict(JudgeConfig, config["judge"], f"{where}: judge")
    judge_config.validate(f"{where}: judge")
    tensors, _ = load_weights_folder(JUDGE, path, config)
    with on_meta():
        check_fits(Judge(config["channels"], len(names), judge_config).state_dict(), tensors, path)
    judge = Judge(config["channels"], len(names), judge_config)
    judge.load_state_dict(tensors)
    return judge.eval(), config
