"""Faults survived: a killed Ray Train worker, a killed `dvc repro`, an MLflow server that is down,
and concurrent writers to one MLflow store (sqlite and a real server)."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cdiff.data import load_source
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import train
from pipelines.core import distributed
from pipelines.core.config import load_params
from pipelines.core.jobs import job_for
from tests.helpers import ROOT, free_port, make_project, registered_checkpoint, run
from tests.helpers import mlflow_server as helpers_mlflow_server

pytestmark = pytest.mark.slow


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray Train workers under `root` (this test's own Ray, never another run's on the machine)."""
    found = []
    for proc in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def test_killed_train_worker_resumes_from_its_checkpoint(tmp_path, monkeypatch, capfd):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    p = load_params(ROOT / "tests" / "tiny_params.yaml")
    p.ray = dataclasses.replace(p.ray, storage_path=str(tmp_path / "ray"), max_failures=1, cpus_per_worker=2.0)
    data = load_source("sklearn-digits", "train", p.model.image_size, p.model.channels)
    cfg = dataclasses.replace(p.train.base, steps=400, checkpoint_every=100, log_every=10)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("faults")).info.run_id
    killed: dict = {}

    def killer():  # kill the worker once the first checkpoint is on disk
        deadline = time.time() + 1200  # a loaded machine can take minutes to the first checkpoint
        while time.time() < deadline:
            # a checkpoint Ray has registered (its folder alone may still be being written)
            registered = _registered_checkpoint(tmp_path / "ray")
            workers = _train_workers(psutil.Process())  # the local Ray this process started
            if registered and workers:
                killed["after"] = True
                workers[0].kill()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with distributed.session(p):
        _, curve = distributed.fit(p, job_for(p, "base", data, cfg), mlflow_run_id=run_id)
    thread.join(1)
    assert killed, "no worker was killed: the test did not exercise the failure"
    said = capfd.readouterr()
    resumed = re.findall(r"resuming from the checkpoint at step (\d+) of 400", said.out + said.err)
    notes = [line for line in (said.out + said.err).splitlines() if "checkpoint" in line or "starts over" in line]
    # restarted from a checkpoint, once (the driver may show a worker's line twice, around its progress bar)
    assert len(set(resumed)) == 1 and int(resumed[0]) in (100, 200, 300), notes
    expected = list(range(10, 401, 10))
    assert [s for s, _ in curve] == expected  # the right step count, each step once in the final state
    history = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert history == expected  # one continuous MLflow history: nothing lost, nothing twice
    # resumed == uninterrupted: the same losses as a plain run without Ray (to float reduction order)
    import torch

    torch.manual_seed(p.seed)
    model = UNet(p.model, data.class_names)
    state = train(
        model, NoiseSchedule(p.diffusion), data, cfg, seed=p.seed, p_uncond=p.diffusion.p_uncond, progress=False
    )
    for (s1, v1), (s2, v2) in zip(curve, state.losses, strict=True):
        assert s1 == s2 and abs(v1 - v2) <= 1e-4 * max(1.0, abs(v2)), (s1, v1, v2)


def _registered_checkpoint(storage: Path) -> bool:
    return any(registered_checkpoint(run) for run in storage.glob("base-*"))


@pytest.fixture(scope="module")
def slow_project(tmp_path_factory):
    """A tiny project whose pretraining is long enough (500 steps, 20 s at 25 steps/s) to be interrupted."""
    work = tmp_path_factory.mktemp("faults")

    def edit(params):
        params["train"]["base"].update(steps=500, checkpoint_every=100, log_every=10)

    env = make_project(work, edit)
    run(["dvc", "repro", "prepare_base"], work, env)
    return work, env


def _checkpoints(storage: Path) -> int:
    return len(list(storage.glob("base-*/checkpoint_*")))


def _is_stage(proc: psutil.Process, module: str) -> bool:
    """The stage's Python process itself (not the shell DVC may run it through)."""
    cmd = proc.cmdline()
    return "python" in Path(cmd[0]).name and cmd[1:3] == ["-m", module]


def _runs_by_status(work: Path, env: dict) -> dict:
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="tags.stage = 'pretrain'")
print(json.dumps(runs["status"].value_counts().to_dict()))
"""
    return json.loads(run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])


def test_stopped_then_killed_dvc_repro_resumes_and_leaves_no_half_output(slow_project):
    """SIGTERM to `dvc repro` (DVC does not pass it on): the stage stops within a minute, writes nothing, aborts
    its Ray run and marks its MLflow run KILLED; a rerun at once resumes. Then SIGKILL to everything (a crash):
    nothing half-written, and the next rerun resumes again and ends with the whole curve.

    DVC runs the stage as `$SHELL -c CMD`; with SHELL=/bin/sh (dash on Debian, and DVC's shell where SHELL is
    unset, as under CI) the shell forks, so the stage's parent is the shell, which outlives DVC."""
    work, env = slow_project
    env = {**env, "SHELL": "/bin/sh"}
    storage = work / "ray_results"
    first = work / "first.log"
    with open(first, "w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", "pretrain"], cwd=work, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.time() + 600  # a loaded machine can take minutes to the first checkpoint
        while not _registered_checkpoint(storage):
            assert proc.poll() is None and time.time() < deadline, "pretrain ended before its first checkpoint"
            time.sleep(0.05)
        stage = [c for c in psutil.Process(proc.pid).children(recursive=True) if _is_stage(c, "pipelines.pretrain")]
        assert len(stage) == 1, "the stage runs under dvc"
        workers = _train_workers(stage[0])
        assert workers, "the stage trains in Ray Train workers of its own"
        if Path("/bin/sh").resolve().name == "dash":  # the case this test is for: a shell between dvc and the stage
            assert stage[0].ppid() != proc.pid
        proc.send_signal(signal.SIGTERM)  # dvc alone, as a scheduler or `kill` would
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(stage, timeout=90)
        assert not alive, "the stage trained on after dvc was stopped"
        stopped_at = _checkpoints(storage)
        _, alive = psutil.wait_procs(workers, timeout=30)  # Ray's workers end with the stage's Ray session
        assert not alive, "the stage's Ray Train workers outlived it"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    said = first.read_text()
    assert "pretrain: interrupted (SIGTERM)" in said, said[-3000:]  # stopped, not finished before the signal
    assert not (work / "models" / "base").exists(), said[-3000:]  # nothing half-written, nothing taken for complete
    assert not (work / "metrics" / "pretrain.json").exists()
    assert _runs_by_status(work, env) == {"KILLED": 1}

    log = work / "rerun.log"
    with open(log, "w") as out:  # the rerun right after: resumes, then is killed outright
        proc = subprocess.Popen(
            ["dvc", "repro", "pretrain"], cwd=work, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.time() + 600
        while _checkpoints(storage) <= stopped_at:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        workers = _train_workers(psutil.Process(proc.pid))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # dvc, the stage and whatever Ray runs in its session
        proc.wait()
    for worker in workers:  # its own workers, should any have outlived the kill
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    assert "resuming from the checkpoint at step" in log.read_text()
    assert not (work / "models" / "base").exists()
    assert not (work / "metrics" / "pretrain.json").exists()
    assert "pretrain" in run(["dvc", "status", "pretrain"], work, env)
    out = run(["dvc", "repro", "pretrain"], work, env, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "resuming from the checkpoint at step" in out.stdout + out.stderr
    curve = (work / "plots" / "pretrain_loss.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in curve] == list(range(10, 501, 10))
    code = f"""
import json, mlflow
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="tags.stage = 'pretrain'")
done = runs[runs["status"] == "FINISHED"]["run_id"].iloc[0]
print(json.dumps(sorted(m.step for m in MlflowClient().get_metric_history(done, "loss"))))
"""
    steps = json.loads(run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])
    assert steps == list(range(10, 501, 10))  # the resumed stage's run holds the whole curve
    assert "up to date" in run(["dvc", "status", "pretrain"], work, env)


def test_unreachable_mlflow_server_fails_fast_in_one_line(slow_project):
    work, env = slow_project
    before = set(work.glob("ray_results/*"))
    start = time.time()
    out = run(
        [sys.executable, "-m", "pipelines.pretrain"],
        work,
        {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        check=False,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0], out.stderr
    assert time.time() - start < 60 and set(work.glob("ray_results/*")) == before  # before any training


def _logging_trial(config):
    """A Tune trial that logs its own MLflow run, step by step, while the other trials do the same."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from pipelines.core.tracking import log_curve

    client = MlflowClient(config["uri"])
    run_id = client.create_run(config["experiment_id"], tags={"trial": str(config["trial"])}).info.run_id
    for step in range(config["points"]):
        log_curve(run_id, "loss", [(step, 1.0 / (step + 1))], config["uri"])
        client.log_metric(run_id, "acc", step / config["points"], step=step)
    client.set_terminated(run_id)
    tune.report({"logged": config["points"]})


def _count_points(uri: str, experiment_id: str) -> list[tuple[str, int, int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id])
    return sorted(
        (
            r.data.tags["trial"],
            len(client.get_metric_history(r.info.run_id, "loss")),
            len(client.get_metric_history(r.info.run_id, "acc")),
        )
        for r in runs
    )


@pytest.fixture
def mlflow_server(tmp_path):
    with helpers_mlflow_server(tmp_path, "--default-artifact-root", str(tmp_path / "art")) as uri:
        yield uri


def test_concurrent_tune_trials_lose_no_metric(tmp_path, mlflow_server, monkeypatch):
    import ray.cloudpickle
    from mlflow.tracking import MlflowClient
    from ray import tune

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    p = load_params(ROOT / "tests" / "tiny_params.yaml")
    stores = {"sqlite": f"sqlite:///{tmp_path}/mlflow.db", "server": mlflow_server}
    trials, points = 4, 40
    with distributed.session(p):
        for name, uri in stores.items():
            experiment_id = MlflowClient(uri).create_experiment(f"concurrent-{name}")
            tuner = tune.Tuner(
                tune.with_resources(_logging_trial, {"cpu": 0.5}),
                param_space={
                    "uri": uri,
                    "experiment_id": experiment_id,
                    "points": points,
                    "trial": tune.grid_search(list(range(trials))),
                },
                tune_config=tune.TuneConfig(max_concurrent_trials=trials),
                run_config=tune.RunConfig(name=f"concurrent-{name}", storage_path=str(tmp_path / "ray")),
            )
            results = tuner.fit()
            assert not results.errors, results.errors
            counted = _count_points(uri, experiment_id)
            assert counted == [(str(i), points, points) for i in range(trials)], (name, counted)
