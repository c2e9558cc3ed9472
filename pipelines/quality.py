"""What the evaluate stages share: a judge's reference statistics, the real floor, and scoring a model."""

from __future__ import annotations

import time

from cdiff.config import Params
from cdiff.data import ImageSet
from cdiff.judge import load_judge
from cdiff.metrics import balanced_subset, generate, judge_images, reference_stats
from cdiff.names import safe_names
from pipelines.common import Paths, sampler_spec


class Scorer:
    """Scores generated images of one dataset against its real test split with its judge."""

    def __init__(self, p: Params, dataset: str, test_set: ImageSet):
        self.p = p
        self.judge, config = load_judge(Paths.judges / dataset)
        self.judge_accuracy = float(config["test_accuracy"])
        self.class_names = test_set.class_names
        self.keys = safe_names(self.class_names)
        self.reference = reference_stats(self.judge, test_set)

    def floor(self, train_set: ImageSet) -> dict:
        """Real train images vs the real test split, with the same count as the generated sets."""
        real = balanced_subset(train_set, self.p.evaluate.fid_per_class, seed=self.p.seed)
        return self._named(judge_images(self.judge, real.as_float(), real.labels, self.class_names, self.reference))

    def model(
        self, model, schedule, *, per_class: int | None = None, sampler: str | None = None, guidance=None
    ) -> dict:
        s = self.p.sample
        start = time.perf_counter()
        images, labels = generate(
            model,
            schedule,
            len(self.class_names),
            per_class or self.p.evaluate.fid_per_class,
            sampler=sampler or sampler_spec(self.p),
            guidance_scale=s.guidance_scale if guidance is None else guidance,
            eta=s.eta,
            seed=self.p.seed,
            batch_size=s.batch_size,
            precision=s.precision,
            compile=s.compile,
        )
        seconds = time.perf_counter() - start
        scores = judge_images(self.judge, images, labels, self.class_names, self.reference)
        return {**self._named(scores), "seconds": seconds}

    def _named(self, scores: dict) -> dict:
        """Per-class results under safe names (they become MLflow keys and report text)."""
        per_class = scores.pop("gan_test_per_class")
        names = dict(zip(self.class_names, self.keys, strict=True))
        return {**scores, "gan_test_per_class": {names[k]: v for k, v in per_class.items()}}
