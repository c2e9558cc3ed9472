"""Sample quality in a judge's eyes: FID in its feature space and GAN-test class accuracy.

FID (Heusel et al. 2017) between Gaussians fitted to two feature sets:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
tr((S_a S_b)^(1/2)) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix
S_a^(1/2) S_b S_a^(1/2) (same eigenvalues), in float64: stable where scipy's sqrtm of a
non-symmetric product can turn complex.

KID (Binkowski et al. 2018): the unbiased squared MMD under a cubic polynomial kernel, in the same space.
Every value comes with a seeded stratified bootstrap 95% interval (cdiff.bootstrap; KID with its std over
subsets): at 30 images per class, FID and accuracy move by a quarter between equally good runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from cdiff.bootstrap import Interval, accuracy_interval, fid_estimate  # noqa: F401 (Interval: re-exported)
from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.io import check_finite, display_path, load_safetensors, save_safetensors
from cdiff.results import Score

if TYPE_CHECKING:
    from cdiff.samplers import Sampler


class NotComputable(CdiffError):
    """A judge metric that cannot be computed for this data (e.g. a domain with fewer than two classes)."""


def check_judgeable(class_names: list[str]) -> None:
    """A judge of one class learns nothing and scores everything perfectly: refuse to report its metrics."""
    if len(class_names) < 2:
        raise NotComputable(
            f"judge metrics need at least two classes, this domain has {len(class_names)}: "
            "FID in a one-class judge's features and its GAN-test accuracy mean nothing"
        )


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
    """Square root of symmetric PSD matrices (..., D, D)."""
    w, v = torch.linalg.eigh((m + m.mT) / 2)
    return (v * w.clamp(min=0).sqrt().unsqueeze(-2)) @ v.mT


def _frechet(mu_a, sigma_a, mu_b, sigma_b) -> torch.Tensor:
    """The Fréchet distance of (batches of) Gaussians: mu (..., D), sigma (..., D, D) -> (...)."""
    root_a = _sqrt_psd(sigma_a)
    cross = torch.linalg.eigvalsh(root_a @ sigma_b @ root_a).clamp(min=0).sqrt().sum(-1)
    trace = sigma_a.diagonal(dim1=-2, dim2=-1).sum(-1) + sigma_b.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((mu_a - mu_b).pow(2).sum(-1) + trace - 2 * cross).clamp(min=0)


def frechet_distance(a: Stats, b: Stats) -> float:
    return float(_frechet(a.mu, a.sigma, b.mu, b.sigma))


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel: (x.y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased squared MMD of two equal-sized sets under the cubic polynomial kernel (KID of one subset)."""
    m = len(x)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    same = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(same - 2 * k_xy.sum() / m**2)


def kid(
    features: torch.Tensor, real: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance in the judge's feature space: the mean and std of the unbiased MMD^2 over
    `subsets` seeded random subsets of `subset_size` of each set (drawn without replacement; fewer where a set
    is smaller), as torchmetrics' KernelInceptionDistance computes it. Unbiased at any count, unlike FID."""
    n = min(subset_size, len(features), len(real))
    if n < 2:
        raise CdiffError(f"KID needs at least 2 feature vectors per set, got {len(features)} and {len(real)}")
    a, b = features.double(), real.double()
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:n]], b[torch.randperm(len(b), generator=g)[:n]])
            for _ in range(subsets)
        ],
        dtype=torch.float64,
    )
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


class ClassAccuracy(NamedTuple):
    accuracy: float
    per_class: dict[str, float]  # by class name; classes absent from the labels are left out


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> ClassAccuracy:
    """Overall accuracy and accuracy per class name (classes absent from `labels` are left out)."""
    if len(labels) == 0:
        raise CdiffError("accuracy of an empty set is undefined")
    correct = (predicted == labels).double()
    per_class = {
        name: float(correct[labels == k].mean()) for k, name in enumerate(class_names) if bool((labels == k).any())
    }
    return ClassAccuracy(float(correct.mean()), per_class)


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
    precision: str = "fp32",
    compile: bool = False,
    compile_mode: str = "default",
    call_batch: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of each class, in seeded batches: (images in [-1, 1], their class ids).

    `precision` 'bf16' runs the network under autocast and `compile` compiles it once for all batches
    (for GPUs; the sampler's update stays float32), in torch.compile's `compile_mode`. `call_batch` > 0
    runs each network call that many rows at a time (a CPU's cache; the seeds stay those of `batch_size`).
    """
    from tqdm.auto import tqdm

    from cdiff.performance import InferenceModel
    from cdiff.samplers import sample

    if precision != "fp32" or compile or call_batch:
        model = InferenceModel(model, precision, compile, compile_mode, call_batch)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    device = next(model.parameters()).device
    chunks = []
    for i in tqdm(
        range(0, len(labels), batch_size), desc=f"generate {sampler.label}", disable=not progress, leave=False
    ):
        ids = labels[i : i + batch_size].tolist()
        chunks.append(sample(model, schedule, ids, sampler, seed=seed + i, device=device, progress=progress).cpu())
    return torch.cat(chunks), labels


@dataclass(frozen=True)
class Judgement:
    """A set of generated images in the eyes of its dataset's judge: the scores and what they were made from."""

    score: Score
    per_class: dict[str, float]  # GAN-test accuracy per class name (classes absent from the labels left out)
    features: torch.Tensor  # (N, D) the images' judge features: what a paired comparison resamples
    labels: torch.Tensor  # (N,) the class each image was generated for
    correct: torch.Tensor  # (N,) bool: the judge classified it as that class

    def kept(self, reference: str) -> JudgedFeatures:
        return JudgedFeatures(self.features, self.labels, self.correct, reference)


@dataclass(frozen=True)
class JudgedFeatures:
    """What a paired comparison needs of a judged image set, kept on disk: the judge features, the class of each
    image and whether the judge recognised it; `reference` names the judge and real split they were judged
    against (sets compare, paired, only under one reference)."""

    features: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)
    correct: torch.Tensor  # (N,) bool (all True for a real split: unused)
    reference: str = ""

    def save(self, path) -> None:
        """One safetensors file, written atomically (NaN/inf refused)."""
        tensors = {"features": self.features.float(), "labels": self.labels.long(), "correct": self.correct.bool()}
        check_finite({"features": tensors["features"]}, f"refusing to write {display_path(path)}")
        save_safetensors(tensors, path, metadata={"reference": self.reference})

    @classmethod
    def load(cls, path) -> JudgedFeatures:
        from safetensors import safe_open

        tensors = load_safetensors(path, "judged features")
        if set(tensors) != {"features", "labels", "correct"}:
            raise CdiffError(f"{display_path(path)} is not a judged-features file: rerun its stage")
        with safe_open(str(path), "pt") as f:
            reference = (f.metadata() or {}).get("reference", "")
        return cls(tensors["features"], tensors["labels"], tensors["correct"], reference)


def judge_images(
    judge,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    reference_features: torch.Tensor,
    reference_labels: torch.Tensor | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> Judgement:
    """FID and KID of `images` against the real split's judge features (`reference_features()`), and the
    judge's accuracy on them (GAN-test), each with its seeded stratified bootstrap 95% interval (KID: its std
    over subsets). The FID is bias-corrected (cdiff.bootstrap), the raw FID at this count beside it.
    Raises NotComputable for fewer than two classes.
    """
    from cdiff.judge import predict

    check_judgeable(class_names)
    features, predicted = predict(judge, images)
    accuracy = class_accuracy(predicted, labels, class_names)
    fid_ci = fid_estimate(features, reference_features, labels, reference_labels, n_boot=n_boot, seed=seed)
    correct = predicted == labels
    acc_ci = accuracy_interval(correct, labels, n_boot=n_boot, seed=seed)
    kid_mean, kid_std = kid(features, reference_features, seed=seed)
    score = Score(
        fid_ci.value,
        accuracy.accuracy,
        len(images),
        [fid_ci.low, fid_ci.high],
        [acc_ci.low, acc_ci.high],
        fid_raw=fid_ci.raw,
        kid=kid_mean,
        kid_std=kid_std,
    )
    return Judgement(score, accuracy.per_class, features, labels, correct)


def classification_accuracy_score(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    test_set: ImageSet,
    config,
    *,
    seed: int = 0,
    n_boot: int = 1000,
) -> Interval:
    """CAS (Ravuri & Vinyals 2019): a fresh classifier of the judge's architecture (`config`, a JudgeConfig)
    trained on `images` (in [-1, 1]) alone, its accuracy on the real test split, with a stratified bootstrap
    interval over the test images. Unlike GAN-test it punishes missing diversity: images that cover little of
    each class teach a classifier that fails on the real variety. The real-data judge's accuracy is its ceiling.
    Raises NotComputable for fewer than two classes."""
    from cdiff.judge import predict, train_judge

    check_judgeable(class_names)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    classifier = train_judge(ImageSet(pixels, labels, list(class_names)), config, seed=seed, progress=False)
    correct = predict(classifier, test_set.as_float())[1] == test_set.labels
    return accuracy_interval(correct, test_set.labels, n_boot=n_boot, seed=seed)


def reference_features(judge, data: ImageSet) -> torch.Tensor:
    """The real held-out split's judge features (N, features); raises NotComputable for fewer than two classes."""
    from cdiff.judge import predict

    check_judgeable(data.class_names)
    return predict(judge, data.as_float())[0]


def reference_stats(judge, data: ImageSet) -> Stats:
    """The real held-out split in the judge's feature space: what generated samples are compared to."""
    return gaussian_stats(reference_features(judge, data))
