"""pipelines/core/tracking.py and the stages that read MLflow: names checked before training, the embedded
store's artefacts kept inside the project, and a run's commit tag never handed to git as an option."""

import subprocess
import sys

import pytest

from cdiff.errors import CdiffError
from pipelines.core import tracking
from pipelines.core.layout import paths
from tests.helpers import ROOT


def test_artefacts_of_the_embedded_store_must_lie_in_this_project(tmp_path):
    tracking.check_artifacts_inside("cdiff", paths.mlflow_artifacts.as_uri())
    tracking.check_artifacts_inside("cdiff", "s3://bucket/mlflow")  # an object store the user chose
    with pytest.raises(CdiffError, match="outside this project .*copied or moved") as err:
        tracking.check_artifacts_inside("cdiff", (tmp_path / "elsewhere" / "mlartifacts").as_uri())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tag", ["--lock", "-f", "HEAD", "abc123", "g" * 40, "0" * 39])
def test_reproduce_refuses_a_commit_tag_that_is_not_a_full_hex_id(tmp_path, tag):
    code = f"""
import sys
from pipelines import reproduce
from pipelines.core import tracking
tracking.run_origin = lambda p, run_id, folder: ({tag!r}, {{}})
sys.argv = ["reproduce", "0123456789abcdef", "--dir", {str(tmp_path / "out")!r}]
reproduce.main()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "is not a full 40-hex commit id" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_sweep_points_of_every_sampler_kind_are_valid_mlflow_keys(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cdiff import results
    from cdiff.samplers import KINDS, Sampler

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    labels = [Sampler.of(kind, 20).label for kind in KINDS]
    points = [
        results.SweepPoint(label, results.Score(10.0, 0.9, 60, [8.0, 12.0], [0.8, 0.95]), 1.0) for label in labels
    ]
    with mlflow.start_run() as run:
        tracking.log_sweep("sampler", points)
    logged = set(MlflowClient(uri).get_run(run.info.run_id).data.metrics)
    assert {"sweep_sampler.dpmpp2m-20.score.fid", "sweep_sampler.ddim-20.score.fid_high"} <= logged
    assert "sweep_sampler.ddpm.seconds" in logged
