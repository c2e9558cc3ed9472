"""Ray Train: 2 CPU workers and 1 worker with the same global batch and seed give the same losses."""

import dataclasses
import os
from pathlib import Path

import pytest

from cdiff.data import load_source
from pipelines.core import distributed
from pipelines.core.config import load_params
from pipelines.core.jobs import job_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_two_workers_match_one_worker(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    p = load_params(ROOT / "tests" / "tiny_params.yaml")
    p.ray = dataclasses.replace(p.ray, storage_path=str(tmp_path), cpus_per_worker=1.0)
    data = load_source("sklearn-digits", "train", p.model.image_size, p.model.channels)
    cfg = dataclasses.replace(p.train.base, steps=6, log_every=1, checkpoint_every=3)
    curves = {}
    with distributed.session(p):
        for workers in (1, 2):
            p.ray = dataclasses.replace(p.ray, num_workers=workers)
            _, curves[workers] = distributed.fit(p, job_for(p, "base", data, cfg))
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[2]] == list(range(1, 7))
    # the same global batch, noise and t; DDP averages gradients: equal up to float reduction order
    for (_, one), (_, two) in zip(curves[1], curves[2], strict=True):
        assert abs(one - two) <= 1e-4 * max(1.0, abs(one)), (curves[1], curves[2])
    assert os.environ.get("GLOO_SOCKET_IFNAME") == "lo"
