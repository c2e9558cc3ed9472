"""tune@D: a search killed (SIGKILL) after some trials finished resumes where it stopped and ends with the
trials and best config of an uninterrupted search, each trial in MLflow once; a judge objective with
Optuna's TPE reports at ASHA's rungs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cdiff import results
from tests.helpers import make_project, run

pytestmark = pytest.mark.slow
SAMPLES = 4


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A one-domain tiny project with its base, data and judge, and trials run one at a time."""
    work = tmp_path_factory.mktemp("tune")

    def edit(params):
        del params["data"]["domains"]["rotated"]
        params["tune"].update(num_samples=SAMPLES, max_concurrent=1, steps_per_trial=20, eval_every=5, grace_period=5)

    env = make_project(work, edit)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    env["RAY_TMPDIR"] = str(ray_tmp)
    run(["dvc", "repro", "pretrain", "prepare@inverted", "judge@inverted"], work, env)
    yield work, env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def set_tune(work: Path, storage: str, **tune) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["ray"]["storage_path"] = storage
    params["tune"].update(tune)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tune_stage(work: Path, env: dict) -> str:
    out = run([sys.executable, "-m", "pipelines.tune", "inverted"], work, env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def experiment(storage: Path) -> Path:
    (found,) = storage.glob("tune-*")
    return found


def trial_states(storage: Path) -> dict[str, str]:
    """trial id -> status, from the newest experiment state Tune has written to ray.storage_path."""
    for state in sorted(storage.glob("tune-*/experiment_state-*.json"), reverse=True):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):  # being replaced
            return {}
        return {t["trial_id"]: t["status"] for t in (json.loads(raw) for raw, _ in data["trial_data"])}
    return {}


def result_files(storage: Path) -> dict[str, tuple[int, int]]:
    """trial id -> (mtime_ns, size) of its result.json."""
    out = {}
    for f in storage.glob("tune-*/_trial_*/result.json"):
        stat = f.stat()
        out[f.parent.name.split("_")[2] + "_" + f.parent.name.split("_")[3]] = (stat.st_mtime_ns, stat.st_size)
    return out


def mlflow_trials(work: Path, env: dict, name: str) -> list[dict]:
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="tags.tune_experiment = '{name}'")
cols = ["tags.tune_trial_id", "tags.mlflow.parentRunId", "status", "params.r", "params.lr", "tags.ray_gpu_share"]
print(json.dumps(runs[cols].to_dict("records")))
"""
    return json.loads(run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])


def kill_when(work: Path, env: dict, storage: Path, finished: int) -> dict[str, str]:
    """Start the tune stage, SIGKILL it and every process it started once `finished` trials are on disk."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.tune", "inverted"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            states = trial_states(storage)
            if sum(s == "TERMINATED" for s in states.values()) >= finished:
                break
            assert proc.poll() is None and time.time() < deadline, f"the search ended or stalled: {states}"
            time.sleep(0.05)
    finally:
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        for p in tree:  # the stage, Ray's processes and the trial's worker, each by its id
            try:
                p.kill() if isinstance(p, psutil.Process) else os.kill(p.pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait()
    return states


def test_killed_search_resumes_to_the_uninterrupted_result(project):
    work, env = project
    set_tune(work, "ray_whole")
    tune_stage(work, env)
    whole = {f: (work / "tune/inverted" / f).read_bytes() for f in ("best.json", "trials.json")}

    storage = work / "ray_resumed"
    set_tune(work, storage.name)
    states = kill_when(work, env, storage, finished=2)
    done = {t for t, s in states.items() if s == "TERMINATED"}
    assert len(done) < SAMPLES, f"the search finished before it was killed: {states}"
    before = result_files(storage)

    out = tune_stage(work, env)  # restores the search: the finished trials are not run again
    assert "best of 4 trials" in out
    after = trial_states(storage)
    assert len(after) == SAMPLES and set(after.values()) == {"TERMINATED"} and done <= set(after)
    now = result_files(storage)
    assert {t: now[t] for t in done} == {t: before[t] for t in done}
    assert {f: (work / "tune/inverted" / f).read_bytes() for f in whole} == whole  # same trials, same best

    name = experiment(storage).name
    logged = mlflow_trials(work, env, name)
    assert sorted(r["tags.tune_trial_id"] for r in logged if r["tags.tune_trial_id"] in after) == sorted(after)

    tune_stage(work, env)  # the whole search is on disk: nothing trains, and MLflow gets no trial twice
    assert result_files(storage) == now
    again = mlflow_trials(work, env, name)
    assert sorted(r["tags.tune_trial_id"] for r in again) == sorted(r["tags.tune_trial_id"] for r in logged)


def test_a_judge_objective_with_tpe_reports_at_the_rungs(project):
    work, env = project
    tune = dict(objective="fid", search="tpe", num_samples=3, objective_per_class=2, objective_sampler="ddim-5")
    tune |= dict(variants=["lora", "dora"], up_ranks=[2, 4])  # and the variant and the up path's rank
    set_tune(work, "ray_fid", **tune)
    out = tune_stage(work, env)
    assert "; fid " in out
    best = results.load(work / "tune/inverted/best.json", results.TuneTrial)
    trials = results.load(work / "tune/inverted/trials.json", results.TuneTrials).trials
    assert best.objective == "fid" and best.score == min(t.score for t in trials)
    start = trials[0]  # the domain's own config comes first, with TPE too
    assert (start.r, start.alpha, start.lr, start.variant, start.up_r) == (2, 2.0, 0.003, "lora", 2)
    assert all(t.variant in ("lora", "dora") and t.up_r in (2, 4) for t in trials)
    assert best.variant in ("lora", "dora") and best.up_r in (2, 4)
    name = experiment(work / "ray_fid").name
    assert len(mlflow_trials(work, env, name)) == 3
    code = f"""
import json, mlflow
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
c = MlflowClient()
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="tags.tune_experiment = '{name}'")
print(json.dumps({{r: {{k: [m.step for m in c.get_metric_history(r, k)] for k in ("fid", "gan_test", "val_loss")}}
                  for r in runs["run_id"]}}))
"""
    curves = json.loads(run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])
    assert len(curves) == 3
    for trial in curves.values():  # every trial, not only the first: the judge scores at ASHA's rungs alone
        steps = sorted(trial["val_loss"])
        assert steps == sorted(trial["fid"]) == sorted(trial["gan_test"])
        assert set(steps) <= {5, 10, 20} and 5 in steps  # the rungs (grace 5, factor 2) and the last step only
    # the searcher Tune saved beside the trials is OptunaSearch with Optuna's TPE sampler (read as bytes, not unpickled)
    (state,) = experiment(work / "ray_fid").glob("searcher-state-*.pkl")
    assert b"_ot_study" in state.read_bytes() and b"optuna.samplers._tpe" in state.read_bytes()


def test_trials_share_a_gpu_side_by_side(project):
    """tune.trials_per_gpu 2 on a Ray instance told it has one GPU (this machine has none, so the trials train on
    the CPU): each trial holds half of it, and the two run at the same time, not one after the other."""
    work, env = project
    params = yaml.safe_load((work / "params.yaml").read_text())
    ray_before = dict(params["ray"])
    params["ray"].update(use_gpu=True, num_gpus=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:  # one rung at the end (grace = the budget): ASHA stops neither trial early
        set_tune(work, "ray_packed", num_samples=2, max_concurrent=2, trials_per_gpu=2, steps_per_trial=60)
        set_tune(work, "ray_packed", grace_period=60, eval_every=10)
        tune_stage(work, env)
    finally:
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["ray"] = ray_before
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    spans = []
    for f in sorted((work / "ray_packed").glob("tune-*/_trial_*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        assert rows and all(r["gpu_share"] == 0.5 for r in rows), f
        spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    assert len(spans) == 2
    # timestamps are whole seconds: more than 1 s of overlap cannot come from trials run one after the other
    assert min(end for _, end in spans) - max(start for start, _ in spans) > 1, spans
    logged = mlflow_trials(work, env, experiment(work / "ray_packed").name)
    assert len(logged) == 2 and {r["tags.ray_gpu_share"] for r in logged} == {"0.5"}
