"""Ray Train: 2 CPU workers (in micro-batches) and 1 worker (each in its own storage) with one global batch and seed:
equal losses."""

import dataclasses
import os
from pathlib import Path

import pytest

from cdiff.data import load_source
from pipelines.core import distributed
from pipelines.core.config import load_params
from pipelines.core.jobs import job_for, run_name

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_two_workers_match_one_worker(tmp_path, monkeypatch):
    from ray.train import Result

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    p = load_params(ROOT / "tests" / "tiny_params.yaml")
    data = load_source("sklearn-digits", "train", p.model.image_size, p.model.channels)
    cfg = dataclasses.replace(p.train.base, steps=6, log_every=1, checkpoint_every=3)
    curves = {}
    with distributed.session(p):
        for workers in (1, 2):
            # each worker count its own storage: one run of this job there, trained from step 0 (the same job
            # in one storage would resume the other's final checkpoint and hand back its curve)
            storage = tmp_path / f"workers-{workers}"
            p.ray = dataclasses.replace(p.ray, storage_path=str(storage), cpus_per_worker=1.0, num_workers=workers)
            # 2 workers also in micro-batches (16 rows each: 6, 6, 4), DDP reducing once per step: the same numbers
            job = job_for(p, "base", data, cfg if workers == 1 else dataclasses.replace(cfg, micro_batch=6))
            _, curves[workers] = distributed.fit(p, job)
            reported = Result.from_path(str(storage / run_name(job))).metrics
            assert reported["world_size"] == workers and reported["step"] == 6, reported
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[2]] == list(range(1, 7))
    # the same global batch, noise and t; DDP averages gradients: equal up to float reduction order
    for (_, one), (_, two) in zip(curves[1], curves[2], strict=True):
        assert abs(one - two) <= 1e-4 * max(1.0, abs(one)), (curves[1], curves[2])
    assert os.environ.get("GLOO_SOCKET_IFNAME") == "lo"


def test_sample_grids_are_logged_at_their_steps_while_training(tmp_path, monkeypatch):
    # train.sample_every: rank 0 draws a seeded grid of the EMA weights at those checkpoints, as MLflow image
    # steps (the UI's slider); the curve is the same as without grids (drawn on a copy)
    from mlflow.tracking import MlflowClient
    from PIL import Image

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("grids", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    p = load_params(ROOT / "tests" / "tiny_params.yaml")
    p.ray = dataclasses.replace(p.ray, storage_path=str(tmp_path / "ray"), cpus_per_worker=2.0)
    data = load_source("sklearn-digits", "train", p.model.image_size, p.model.channels)
    cfg = dataclasses.replace(p.train.base, steps=8, log_every=2, checkpoint_every=4, sample_every=4)
    job = job_for(p, "base", data, cfg, grid=p.sampler)
    with distributed.session(p):
        _, curve = distributed.fit(p, job, mlflow_run_id=run_id)
    pngs = sorted(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
    assert [name.split("+")[2] for name in pngs] == ["4", "8"] or sorted(n.split("+")[2] for n in pngs) == ["4", "8"]
    local = client.download_artifacts(run_id, pngs[0], str(tmp_path))
    with Image.open(local) as im:
        assert im.width > 4 * p.model.image_size  # four images a row, with the class labels
    off = job_for(p, "base", data, dataclasses.replace(cfg, sample_every=0), grid=p.sampler)
    assert off.grid is None and run_name(job) == run_name(off)
