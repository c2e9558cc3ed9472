"""Scoring generated images of one dataset with its judge: FID against the real test split and GAN-test accuracy."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import torch

from cdiff.bootstrap import accuracy_difference, fid_difference
from cdiff.config import JudgeConfig, SampleConfig
from cdiff.data import ImageSet
from cdiff.io import fingerprint
from cdiff.judge import load_judge
from cdiff.metrics import (
    JudgedFeatures,
    Judgement,
    balanced_subset,
    classification_accuracy_score,
    generate,
    judge_images,
    reference_features,
)
from cdiff.names import safe_names
from cdiff.results import Comparison, Score
from cdiff.samplers import Sampler


class Judged(NamedTuple):
    score: Score
    per_class: dict[str, float]  # GAN-test accuracy under safe class names (they become MLflow keys)
    seconds: float  # to generate the images (0 for real ones)
    judgement: Judgement  # the images' features, labels and hits: what paired comparisons resample


class Scorer:
    """Scores image sets of one dataset against its real test split with its judge; `per_class` images per class.

    Every score carries seeded bootstrap 95% intervals. `sample` sets the sampling batch, precision and compile.
    A dataset of one class raises cdiff.metrics.NotComputable: its judge would call everything perfect.
    """

    def __init__(
        self,
        judge: Path,
        test_set: ImageSet,
        per_class: int,
        seed: int,
        sample: SampleConfig | None = None,
        cas: JudgeConfig | None = None,
    ):
        """`cas`: the classifier the classification accuracy score trains on each scored set (None: no CAS)."""
        self.judge, config = load_judge(judge)
        self.test_set, self.cas = test_set, cas
        self.class_names = test_set.class_names
        self.reference_features = reference_features(self.judge, test_set)
        self.reference_labels = test_set.labels
        # names the judge and the real split: judged images compare, paired, only under the same reference
        self.reference = f"{config.get('fingerprint', '')}/{fingerprint({'features': self.reference_features})}"
        self.per_class, self.seed, self.sample = per_class, seed, sample or SampleConfig()

    def floor(self, train_set: ImageSet) -> Judged:
        """Real train images vs the real test split, with the same count as the generated sets."""
        real = balanced_subset(train_set, self.per_class, seed=self.seed)
        return self._judge(real.as_float(), real.labels, 0.0)

    def model(
        self, model, schedule, sampler: Sampler, per_class: int | None = None, progress: bool = True, cas: bool = True
    ) -> Judged:
        """`per_class` images per class of `model`, judged (with the CAS where the scorer has a CAS classifier
        and `cas`: the sweeps leave it out)."""
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
            compile_mode=s.compile_mode,
            call_batch=s.call_batch,
            progress=progress,
        )
        return self._judge(images, labels, time.perf_counter() - start, cas)

    def _judge(self, images, labels, seconds: float, cas: bool = True) -> Judged:
        judged = judge_images(
            self.judge, images, labels, self.class_names, self.reference_features, self.reference_labels, seed=self.seed
        )
        score = judged.score
        if cas and self.cas is not None:
            ci = classification_accuracy_score(
                images, labels, self.class_names, self.test_set, self.cas, seed=self.seed
            )
            score = dataclasses.replace(score, cas=ci.value, cas_interval=[ci.low, ci.high])
        names = dict(zip(self.class_names, safe_names(self.class_names), strict=True))
        per_class = {names[k]: v for k, v in judged.per_class.items()}
        return Judged(score, per_class, seconds, dataclasses.replace(judged, score=score))

    def difference(self, a: Judgement, b: Judgement) -> tuple[Comparison, Comparison]:
        """A - B in FID (paired: one real set, resampled once for both) and in GAN-test accuracy, with intervals."""
        real = (self.reference_features, self.reference_labels)
        fid = fid_difference((a.features, a.labels), (b.features, b.labels), real, seed=self.seed)
        accuracy = accuracy_difference((a.correct, a.labels), (b.correct, b.labels), seed=self.seed)
        return Comparison.of(fid), Comparison.of(accuracy)

    def real(self) -> JudgedFeatures:
        """The real split's judge features, for comparisons made later (the report's adapter - full fine-tune)."""
        hits = torch.ones(len(self.reference_labels), dtype=torch.bool)
        return JudgedFeatures(self.reference_features, self.reference_labels, hits, self.reference)

    def versus_kept(self, a: Judgement, kept: JudgedFeatures | None) -> Comparison | None:
        """A - judged images kept earlier (cdiff.metrics.JudgedFeatures), in FID (paired); None where none were
        kept or they were judged under another reference (another judge or real split)."""
        if kept is None or kept.reference != self.reference:
            return None
        real = (self.reference_features, self.reference_labels)
        return Comparison.of(fid_difference((a.features, a.labels), (kept.features, kept.labels), real, seed=self.seed))
