"""End to end: `dvc repro` on tiny params in a temp git repo, then the DAG's caching, MLflow and the registry."""

import hashlib
import json
import shutil
import sys

import pytest
import yaml

from tests.helpers import ROOT, make_project
from tests.helpers import run as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("project")
    env = make_project(work)
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


def test_reproduce_checks_out_a_runs_commit_and_params_and_matches_its_outputs(project, tmp_path):
    work, env = project
    code = f"""
import mlflow
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="tags.domain = 'inverted' and tags.stage = 'finetune'")
print(runs.sort_values("start_time")["run_id"].iloc[0])  # from the first repro, on the original params
"""
    run_id = _run([sys.executable, "-c", code], work, env).strip().splitlines()[-1]
    out = _run(
        [
            sys.executable,
            "-m",
            "pipelines.reproduce",
            run_id,
            "--dir",
            str(tmp_path / "again"),
            "--stage",
            "prepare_base",
        ],
        work,
        env,
    )
    original = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    assert yaml.safe_load((tmp_path / "again" / "params.yaml").read_text()) == original
    assert "outputs identical to the run's dvc.lock: 1 (data/prepared/digits)" in out, out
