"""End to end: `dvc repro` on tiny params in a temp git repo, then the DAG's caching, MLflow and the registry."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("project")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("dvc.lock", "metrics/", "plots/", "tune/", "runs/")):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    shutil.copy(ROOT / "tests" / "tiny_params.yaml", work / "params.yaml")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        _run(cmd, work, env)
    _run(["dvc", "repro"], work, env)
    return work, env


def test_every_output_exists(project):
    work, _ = project
    for domain in ("inverted", "rotated"):
        for path in (
            f"adapters/{domain}/adapter.safetensors",
            f"tune/{domain}/best.json",
            f"samples/{domain}/base.png",
            f"samples/{domain}/adapter.png",
            f"metrics/{domain}.json",
            f"plots/finetune-{domain}_loss.csv",
        ):
            assert (work / path).is_file(), path
    for path in (
        "models/base/model.safetensors",
        "metrics/pretrain.json",
        "plots/pretrain_loss.csv",
        "samples/base.png",
        "models/judge/digits/judge.safetensors",
        "models/judge/rotated/judge.safetensors",
        "metrics/base.json",
        "plots/sweep_sampler.csv",
        "models/full/inverted/model.safetensors",
        "metrics/full-inverted.json",
        "samples/full-inverted.png",
        "reports/report.md",
        "reports/summary.json",
        "reports/base/sweep_sampler.png",
        "reports/inverted/samples.png",
        "reports/rotated/report.md",
    ):
        assert (work / path).is_file(), path
    assert not (work / "models/full/rotated").exists()  # only the domains in evaluate.full_finetune
    curve = (work / "plots/pretrain_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 1 + 30 // 5


def test_metrics_and_report_hold_judge_scores_and_goals(project):
    work, _ = project
    m = json.loads((work / "metrics/inverted.json").read_text())
    for key in ("fid_floor", "fid_base", "fid_adapter", "gan_test_adapter", "judge_test_accuracy"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert set(m["gan_test_per_class"]["adapter"]) == {str(i) for i in range(10)}
    sweep = (work / "plots/sweep_sampler.csv").read_text().splitlines()
    assert sweep[0] == "sampler,fid,gan_test,seconds" and [r.split(",")[0] for r in sweep[1:]] == ["ddpm", "ddim-5"]
    summary = json.loads((work / "reports/summary.json").read_text())
    goals = summary["domains"]["inverted"]["goals"]
    assert len(goals) == 4 and all(isinstance(g["met"], bool) for g in goals)  # with the full fine-tune goal
    assert len(summary["domains"]["rotated"]["goals"]) == 3
    report = (work / "reports/report.md").read_text()
    assert f"{m['fid_adapter']:.4g}" in report and "Quality goals" in report


def test_mlflow_runs_registry_and_aliases(project):
    work, env = project
    code = f"""
import json, mlflow
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
c = MlflowClient()
runs = mlflow.search_runs(experiment_names=["cdiff-test"])
ft = runs[runs["tags.stage"] == "finetune"]
trials = runs[runs["tags.stage"] == "tune-trial"]
out = dict(
    stages=sorted(set(runs["tags.stage"])),
    finetune_domains=sorted(ft["tags.domain"]),
    test_loss=[float(v) for v in ft["metrics.test_loss_adapter"]],
    commit=sorted(set(runs["tags.git_commit"])),
    trial_parents=sorted(set(trials["tags.mlflow.parentRunId"])),
    tune_runs=sorted(runs[runs["tags.stage"] == "tune"]["run_id"]),
    curve=len(c.get_metric_history(runs[runs["tags.stage"] == "pretrain"]["run_id"].iloc[0], "loss")),
    artifacts=sorted(a.path for a in c.list_artifacts(ft["run_id"].iloc[0])),
    base_alias=c.get_registered_model("cdiff-base").aliases,
    champion={{d: c.get_model_version_by_alias("cdiff-adapter-" + d, "champion").version for d in ("inverted", "rotated")}},
)
print(json.dumps(out))
"""
    info = json.loads(_run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])
    assert info["stages"] == ["finetune", "full_finetune", "judge", "pretrain", "tune", "tune-trial"]
    assert info["finetune_domains"] == ["inverted", "rotated"] and all(v > 0 for v in info["test_loss"])
    assert len(info["commit"]) == 1 and len(info["commit"][0]) == 40
    assert info["trial_parents"] == info["tune_runs"]  # every trial is a child of its domain's tune run
    assert info["curve"] == 30 // 5
    assert {"adapter", "samples", "report"} <= set(info["artifacts"])
    assert "adapters" in info["base_alias"] and {k: int(v) for k, v in info["champion"].items()} == {
        "inverted": 1,
        "rotated": 1,
    }
    table = _run([sys.executable, "-m", "pipelines.compare"], work, env)
    assert "inverted" in table and "rotated" in table and "fid_adapter" in table


def test_second_repro_is_a_noop_and_status_clean(project):
    work, env = project
    out = _run(["dvc", "repro"], work, env)
    assert "Running stage" not in out
    assert "up to date" in _run(["dvc", "status"], work, env)


def test_forced_rerun_from_scratch_is_bit_identical(project):
    work, env = project
    outputs = [
        "models/base/model.safetensors",
        "adapters/inverted/adapter.safetensors",
        "adapters/rotated/adapter.safetensors",
        "tune/inverted/best.json",
        "metrics/inverted.json",
        "metrics/rotated.json",
        "models/judge/inverted/judge.safetensors",
        "models/full/inverted/model.safetensors",
        "reports/inverted/report.md",
    ]
    before = {f: hashlib.sha256((work / f).read_bytes()).hexdigest() for f in outputs}
    shutil.rmtree(work / "ray_results")  # no checkpoint to resume from: every stage trains anew
    _run(["dvc", "repro", "--force"], work, env)
    after = {f: hashlib.sha256((work / f).read_bytes()).hexdigest() for f in outputs}
    assert before == after


def test_one_domain_change_reruns_only_that_domain(project):
    work, env = project
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["domains"]["rotated"]["lora"]["dropout"] = 0.1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], work, env)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == ["evaluate@rotated", "finetune@rotated", "report", "sample@rotated", "tune@rotated"], out[-2000:]
    assert "up to date" in _run(["dvc", "status"], work, env)
