"""The champion contest through the registry: each version's judged images are kept on its run, and a new
version takes `champion` only when the paired FID difference is beyond its interval."""

import mlflow
import pytest
import torch

from cdiff import results
from cdiff.metrics import Judgement
from pipelines.core import registry
from pipelines.core.scoring import Scorer

D, CLASSES = 16, 10


def _features(n: int, shift: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n judge features of 10 classes (class k's mean at k along the first axis), every feature off by `shift`."""
    labels = torch.arange(n) % CLASSES
    x = torch.randn(n, D, generator=g, dtype=torch.float64) + shift
    x[:, 0] += labels.double()
    return x, labels


def _scorer(real, reference: str = "judge-1/test-1") -> Scorer:
    """A Scorer with its real split and reference set, without a judge folder: what versus_kept reads."""
    scorer = Scorer.__new__(Scorer)
    scorer.reference_features, scorer.reference_labels = real
    scorer.reference, scorer.seed = reference, 0
    return scorer


def _judgement(features, labels) -> Judgement:
    score = results.Score(0.0, 1.0, len(labels))
    return Judgement(score, {}, features, labels, torch.ones(len(labels), dtype=torch.bool))


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("contest", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client = registry.client()
    client.create_registered_model("cdiff-adapter-x")
    yield experiment, client
    mlflow.set_tracking_uri(None)


def _contest(experiment, client, scorer, judged, fid):
    """A new version whose evaluation kept `judged`, then its contest with the champion, as evaluate@D runs it."""
    with mlflow.start_run(experiment_id=experiment) as run:
        registry.log_judged(judged.kept(scorer.reference))
    version = client.create_model_version("cdiff-adapter-x", "m", run_id=run.info.run_id).version
    score = results.Score(fid, 0.9, len(judged.labels), [fid - 0.01, fid + 0.01])  # narrow: unpaired would move
    return registry.set_champion(
        "cdiff-adapter-x", version, score, lambda champion: scorer.versus_kept(judged, registry.load_judged(champion))
    )


def test_a_clearly_better_adapter_takes_the_champion_a_retrain_with_another_seed_does_not(store):
    experiment, client = store
    g = torch.Generator().manual_seed(0)
    real = _features(1000, 0.0, g)
    scorer = _scorer(real)
    first = _contest(experiment, client, scorer, _judgement(*_features(300, 0.3, g)), 2.0)
    assert (first.champion, first.why) == ("1", "first")
    # the same model again, another seed: its own FID (given) differs beyond both narrow intervals, but the
    # paired difference of the kept images holds 0
    again = _contest(experiment, client, scorer, _judgement(*_features(300, 0.3, g)), 1.5)
    assert (again.champion, again.why) == ("1", "tie") and again.comparison.paired
    low, high = again.comparison.difference_interval
    assert low < 0 < high
    better = _contest(experiment, client, scorer, _judgement(*_features(300, 0.05, g)), 1.9)
    assert (better.champion, better.why) == ("3", "better") and better.comparison.difference_interval[1] < 0
    assert str(client.get_model_version_by_alias("cdiff-adapter-x", "champion").version) == "3"
    worse = _contest(experiment, client, scorer, _judgement(*_features(300, 0.3, g)), 1.0)
    assert (worse.champion, worse.why) == ("3", "worse") and worse.comparison.difference_interval[0] > 0


def test_images_judged_under_another_reference_fall_back_to_the_intervals(store):
    experiment, client = store
    g = torch.Generator().manual_seed(1)
    real = _features(1000, 0.0, g)
    _contest(experiment, client, _scorer(real, "judge-1/test-1"), _judgement(*_features(300, 0.3, g)), 2.0)
    retrained_judge = _scorer(real, "judge-2/test-1")
    crowned = _contest(experiment, client, retrained_judge, _judgement(*_features(300, 0.3, g)), 1.0)
    assert crowned.why == "better" and not crowned.comparison.paired  # 1.0 [0.99, 1.01] vs 2.0 [1.99, 2.01]
    kept = registry.load_judged(client.get_model_version("cdiff-adapter-x", "2").run_id)
    assert kept.reference == "judge-2/test-1" and kept.features.shape == (300, D) and kept.correct.all()
