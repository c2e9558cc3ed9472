"""Sample quality in a judge's eyes: FID in its feature space and GAN-test class accuracy.

FID (Heusel et al. 2017) between Gaussians fitted to two feature sets:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
tr((S_a S_b)^(1/2)) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix
S_a^(1/2) S_b S_a^(1/2) (same eigenvalues), in float64: stable where scipy's sqrtm of a
non-symmetric product can turn complex.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cdiff.data import ImageSet
from cdiff.errors import CdiffError

if TYPE_CHECKING:
    from cdiff.samplers import Sampler


@dataclass
class Stats:
    """A Gaussian fitted to features: what FID compares."""

    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    count: int


def gaussian_stats(features: torch.Tensor) -> Stats:
    if features.ndim != 2 or len(features) < 2:
        raise CdiffError(f"FID needs at least 2 feature vectors, got {tuple(features.shape)}")
    f = features.double()
    return Stats(f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1]), len(f))


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: Stats, b: Stats) -> float:
    root_a = _sqrt_psd(a.sigma)
    cross = torch.linalg.eigvalsh(root_a @ b.sigma @ root_a).clamp(min=0).sqrt().sum()
    value = (a.mu - b.mu).pow(2).sum() + a.sigma.trace() + b.sigma.trace() - 2 * cross
    return max(float(value), 0.0)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Overall accuracy and accuracy per class name (classes absent from `labels` are left out)."""
    if len(labels) == 0:
        raise CdiffError("accuracy of an empty set is undefined")
    correct = (predicted == labels).double()
    per_class = {
        name: float(correct[labels == k].mean()) for k, name in enumerate(class_names) if bool((labels == k).any())
    }
    return {"accuracy": float(correct.mean()), "per_class": per_class}


def balanced_subset(data: ImageSet, per_class: int, seed: int = 0) -> ImageSet:
    """Up to `per_class` images of every class, chosen with a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    chosen = []
    for k in range(len(data.class_names)):
        chosen.append(order[data.labels[order] == k][:per_class])
    return data.subset(torch.cat(chosen).sort().values)


def generate(
    model,
    schedule,
    num_classes: int,
    per_class: int,
    sampler: Sampler,
    *,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of each class, in seeded batches: (images in [-1, 1], their class ids)."""
    from tqdm.auto import tqdm

    from cdiff.samplers import sample

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    device = next(model.parameters()).device
    chunks = []
    for i in tqdm(
        range(0, len(labels), batch_size), desc=f"generate {sampler.label}", disable=not progress, leave=False
    ):
        ids = labels[i : i + batch_size].tolist()
        chunks.append(sample(model, schedule, ids, sampler, seed=seed + i, device=device, progress=progress).cpu())
    return torch.cat(chunks), labels


def judge_images(judge, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], reference: Stats) -> dict:
    """FID of `images` against the reference statistics, and the judge's accuracy on them (GAN-test)."""
    from cdiff.judge import predict

    features, predicted = predict(judge, images)
    accuracy = class_accuracy(predicted, labels, class_names)
    return {
        "fid": frechet_distance(gaussian_stats(features), reference),
        "gan_test": accuracy["accuracy"],
        "gan_test_per_class": accuracy["per_class"],
        "count": len(images),
    }


def reference_stats(judge, data: ImageSet) -> Stats:
    """The real held-out split in the judge's feature space: what generated samples are compared to."""
    from cdiff.judge import predict

    return gaussian_stats(predict(judge, data.as_float())[0])
