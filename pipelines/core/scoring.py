"""Scoring generated images of one dataset with its judge: FID against the real test split and GAN-test accuracy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from cdiff.config import SampleConfig
from cdiff.data import ImageSet
from cdiff.judge import load_judge
from cdiff.metrics import balanced_subset, gaussian_stats, generate, judge_images, reference_features
from cdiff.names import safe_names
from cdiff.results import Score
from cdiff.samplers import Sampler


class Judged(NamedTuple):
    score: Score
    per_class: dict[str, float]  # GAN-test accuracy under safe class names (they become MLflow keys)
    seconds: float  # to generate the images (0 for real ones)


class Scorer:
    """Scores image sets of one dataset against its real test split with its judge; `per_class` images per class.

    Every score carries seeded bootstrap 95% intervals. `sample` sets the sampling batch, precision and compile.
    A dataset of one class raises cdiff.metrics.NotComputable: its judge would call everything perfect.
    """

    def __init__(self, judge: Path, test_set: ImageSet, per_class: int, seed: int, sample: SampleConfig | None = None):
        self.judge, _ = load_judge(judge)
        self.class_names = test_set.class_names
        self.reference_features = reference_features(self.judge, test_set)
        self.reference = gaussian_stats(self.reference_features)
        self.per_class, self.seed, self.sample = per_class, seed, sample or SampleConfig()

    def floor(self, train_set: ImageSet) -> Judged:
        """Real train images vs the real test split, with the same count as the generated sets."""
        real = balanced_subset(train_set, self.per_class, seed=self.seed)
        return self._judge(real.as_float(), real.labels, 0.0)

    def model(self, model, schedule, sampler: Sampler, per_class: int | None = None, progress: bool = True) -> Judged:
        start = time.perf_counter()
        s = self.sample
        images, labels = generate(
            model,
            schedule,
            len(self.class_names),
            per_class or self.per_class,
            sampler,
            seed=self.seed,
            batch_size=s.batch_size,
            precision=s.precision,
            compile=s.compile,
            progress=progress,
        )
        return self._judge(images, labels, time.perf_counter() - start)

    def _judge(self, images, labels, seconds: float) -> Judged:
        scores = judge_images(
            self.judge,
            images,
            labels,
            self.class_names,
            self.reference,
            reference_features=self.reference_features,
            seed=self.seed,
        )
        names = dict(zip(self.class_names, safe_names(self.class_names), strict=True))
        per_class = {names[k]: v for k, v in scores["gan_test_per_class"].items()}
        score = Score(
            scores["fid"], scores["gan_test"], scores["count"], scores["fid_interval"], scores["gan_test_interval"]
        )
        return Judged(score, per_class, seconds)
