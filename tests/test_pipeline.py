"""End to end: `dvc repro` on tiny params in a temp git repo, then the DAG's caching, MLflow and the registry."""

import hashlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cdiff import results
from tests.helpers import ROOT, kill_processes_in, make_project
from tests.helpers import run as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("project")
    env = make_project(work)
    ray_logs = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay short
    env["RAY_TMPDIR"] = str(ray_logs)
    out = _run(["dvc", "repro"], work, env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (work / "console.txt").write_text(out.stdout + out.stderr)
    yield work, env, ray_logs
    shutil.rmtree(ray_logs, ignore_errors=True)


def test_every_output_exists(project):
    work, *_ = project
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
        "reports/inverted/real.png",  # the real training images beside the samples
        "reports/rotated/report.md",
    ):
        assert (work / path).is_file(), path
    for domain in ("inverted", "rotated"):
        assert (work / f"metrics/per_class/{domain}.json").is_file()
    assert not (work / "models/full/rotated").exists()  # only the domains in evaluate.full_finetune
    curve = (work / "plots/pretrain_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 1 + 30 // 5


def test_metrics_and_report_hold_judge_scores_and_goals(project):
    work, env, _ = project
    m = results.load(work / "metrics/inverted.json", results.DomainEvaluation)
    for score in (m.floor, m.base, m.adapter):
        assert score.fid >= 0 and 0 <= score.gan_test <= 1 and score.images == 10 * 4
        low, high = score.fid_interval
        assert low <= score.fid <= high and score.fid_raw >= 0 and score.kid is not None  # the headline inside
    assert m.adapter_vs_base_fid.verdict in ("better", "tie", "worse") and m.adapter_vs_base_fid.paired
    low, high = m.adapter_vs_base_fid.difference_interval
    assert low <= m.adapter_vs_base_fid.difference <= high
    assert (m.r, m.alpha) == tuple(
        json.loads((work / "adapters/inverted/adapter_config.json").read_text())[k] for k in ("r", "lora_alpha")
    )
    per_class = results.load(work / "metrics/per_class/inverted.json", results.PerClass).accuracy
    assert set(per_class) == {"base", "adapter"} and set(per_class["adapter"]) == {str(i) for i in range(10)}
    shown = run_dvc_metrics_show(work, env)  # one table: the same columns for every domain, no per-class keys
    assert not any("per_class" in column or column.startswith("accuracy.") for column in shown)
    sweep = (work / "plots/sweep_sampler.csv").read_text().splitlines()
    assert sweep[0] == "sampler,fid,fid_low,fid_high,fid_raw,kid,gan_test,gan_test_low,gan_test_high,seconds,images"
    assert [r.split(",")[0] for r in sweep[1:]] == ["ddpm", "ddim-5", "dpm++2m-5"]
    guidance, samplers = (results.load_sweep(work / f"plots/sweep_{over}.csv") for over in ("guidance", "sampler"))
    assert guidance[1].setting == "2" and guidance[1] == replace(samplers[2], setting="2")  # dpm++2m-5 at 2: once
    summary = results.load(work / "reports/summary.json", results.RunSummary)
    assert len(summary.domains["inverted"].goals) == 4  # with the full fine-tune goal
    assert len(summary.domains["rotated"].goals) == 3 and summary.domains["rotated"].full is None
    report = (work / "reports/report.md").read_text()
    assert f"{m.adapter.fid:.4g}" in report and "Quality goals" in report
    full = summary.domains["inverted"].adapter_vs_full_fid  # paired, from the judged features the stages kept
    assert full is not None and full.paired
    assert f"Adapter minus full fine-tune: FID {full.shown()}" in (work / "reports/inverted/report.md").read_text()
    assert summary.domains["rotated"].adapter_vs_full_fid is None


def run_dvc_metrics_show(work, env) -> list[str]:
    """The columns of `dvc metrics show --json`, as DVC flattens them."""
    raw = json.loads(_run(["dvc", "metrics", "show", "--json"], work, env))
    columns = set()
    for rev in raw.values():
        for data in rev["data"].values():
            columns |= set(_flatten(data["data"]))
    return sorted(columns)


def _flatten(d: dict, prefix: str = "") -> list[str]:
    return [
        k for key, v in d.items() for k in (_flatten(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
    ]


def test_console_shows_one_summary_per_stage_and_none_of_rays_noise(project):
    work, env, ray_logs = project
    console = (work / "console.txt").read_text()
    stages = [line.split()[0] for line in _run(["dvc", "stage", "list"], work, env).splitlines()]
    for stage in stages:
        summaries = [line for line in console.splitlines() if re.search(rf"(^|\s){re.escape(stage)}: .* -> ", line)]
        assert len(summaries) == 1, (stage, summaries)
    logged = "".join(f.read_text(errors="replace") for f in ray_logs.rglob("*.err") if f.is_file())
    assert "Reporting training result" in logged  # Ray did say it, in its own log files
    for unused in ("PlacementGroupCleaner", "PreemptionWatcher", "DatasetManager"):  # not started in a local session
        assert f":actor_name:{unused}" not in logged, unused
    for noise in ("Failed to query Ray Train Controller", "Reporting training result", "PreemptionWatcher"):
        assert noise not in console, noise
    assert "max_concurrent_trials" not in console and "INFO mlflow" not in console


def test_mlflow_runs_registry_and_aliases(project):
    work, env, _ = project
    # the embedded store keeps its artefacts in the repository's mlartifacts/ (gitignored, and excluded
    # from cluster.yaml's rsync), not in an mlruns/ of MLflow's own choosing
    assert list((work / "mlartifacts").rglob("model.safetensors"))
    assert list((work / "mlartifacts").rglob("adapter.safetensors"))
    assert not (work / "mlruns").exists()
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
    ft_domain=ft["tags.domain"].iloc[0],
    params={{k: v for k, v in c.get_run(ft["run_id"].iloc[0]).data.params.items() if "lora" in k}},
    tuned={{d: json.load(open(f"tune/{{d}}/best.json")) for d in ("inverted", "rotated")}},
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
    assert {"adapter", "samples", "report", "results"} <= set(info["artifacts"])
    tuned = info["tuned"][info["ft_domain"]]  # the finetune run logs the lr, r and alpha it trained with
    assert info["params"][f"data.domains.{info['ft_domain']}.lora.r"] == str(tuned["r"])
    assert info["params"][f"data.domains.{info['ft_domain']}.lora.alpha"] == str(tuned["alpha"])
    assert info["params"]["train.lora.lr"] == str(tuned["lr"])
    assert "adapters" in info["base_alias"] and {k: int(v) for k, v in info["champion"].items()} == {
        "inverted": 1,
        "rotated": 1,
    }
    table = _run([sys.executable, "-m", "pipelines.compare"], work, env)
    assert "inverted" in table and "rotated" in table and "fid_adapter" in table
    # the stages registered servable models: the CLI reads them back from the project's store
    cache = {**env, "CDIFF_CACHE": str(work / "cache")}
    for uri, kind in (("models:/cdiff-base@adapters", "model"), ("models:/cdiff-adapter-rotated@champion", "adapter")):
        described = json.loads(_run([sys.executable, "-m", "cdiff", "info", uri], work, cache))
        assert (described["kind"], described["source"]) == (kind, uri)


def test_second_repro_is_a_noop_and_status_clean(project):
    work, env, _ = project
    out = _run(["dvc", "repro"], work, env)
    assert "Running stage" not in out
    assert "up to date" in _run(["dvc", "status"], work, env)


def test_one_domain_change_reaches_only_that_domains_stages(project):
    """A change to one domain's params changes only its own stages (and the report of all): DVC reruns those and
    what reads their outputs, which are that domain's paths (tests/test_dvc_deps.py). Read from `dvc status`,
    not rerun: the forced rerun below runs a domain's chain."""
    work, env, _ = project
    original = (work / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["data"]["domains"]["rotated"]["lora"]["dropout"] = 0.1
    try:
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(_run(["dvc", "status", "--json"], work, env))
    finally:
        (work / "params.yaml").write_text(original)
    assert sorted(status) == ["finetune@rotated", "report", "tune@rotated"], status
    changed = {stage: [set(e.get("changed deps", {})) for e in entries] for stage, entries in status.items()}
    assert all(deps == [{"params.yaml"}] for deps in changed.values()), status  # params only: nothing else moved
    assert "up to date" in _run(["dvc", "status"], work, env)


def test_reproduce_checks_out_a_runs_commit_and_params_and_matches_its_outputs(project, tmp_path):
    work, env, _ = project
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
    same = "outputs identical to the run's dvc.lock: 2 (data/image_index/digits.json, data/prepared/digits)"
    assert same in out, out  # the stage and the index stage it depends on


def test_queued_experiments_run_two_at_once_on_the_shared_stores(project):
    """`dvc exp run --queue -S ...` twice, then `dvc queue start -j 2`: both experiments run side by side in
    DVC's temp workspaces, log to the repository's mlflow.db and train in its ray_results/, and leave the
    workspace as it was."""
    import time

    work, env, _ = project
    _run(["git", "add", "-A"], work, env)  # the queue runs from the last commit: dvc.lock and params with it
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], work, env)
    adapter = (work / "adapters" / "inverted" / "adapter.safetensors").read_bytes()
    before = set((work / "ray_results").glob("lora-*"))
    for steps in (12, 14):
        _run(["dvc", "exp", "run", "--queue", "-S", f"train.lora.steps={steps}", "finetune@inverted"], work, env)
    queued_at = int(time.time() * 1000)
    try:
        _run(["dvc", "queue", "start", "-j", "2"], work, env, timeout=120)
        deadline = time.time() + 900
        while True:
            status = _run(["dvc", "queue", "status"], work, env, timeout=120)
            if status.count("Success") == 2:
                break
            assert "Failed" not in status and time.time() < deadline, status + _queue_logs(work)
            time.sleep(2)
    finally:  # the queue's workers are daemons of their own session: stop them, passed or not
        _run(["dvc", "queue", "stop", "--kill"], work, env, check=False, timeout=120)
        kill_processes_in(work)
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="tags.stage = 'finetune' and tags.domain = 'inverted'")
print(json.dumps(sorted(runs["params.train.lora.steps"].tolist())))
"""
    steps = json.loads(_run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])
    assert "12" in steps and "14" in steps  # both in the repository's store
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{work}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["cdiff-test"], filter_string="attributes.start_time >= {queued_at}")
print(json.dumps([[r["tags.stage"], r["tags.domain"], r["start_time"].timestamp(), r["end_time"].timestamp()]
                  for _, r in runs.iterrows()]))
"""
    ran = json.loads(_run([sys.executable, "-c", code], work, env).strip().splitlines()[-1])
    # only the stage whose params changed ran (its upstream is cached): one finetune@inverted per experiment
    assert sorted((stage, domain) for stage, domain, *_ in ran) == [("finetune", "inverted")] * 2, ran
    (_, _, start_a, end_a), (_, _, start_b, end_b) = ran
    assert start_a < end_b and start_b < end_a, ran  # and the two ran at once: their runs overlap in time
    assert len(set((work / "ray_results").glob("lora-*")) - before) == 2  # and in its Ray storage
    shown = _run(["dvc", "exp", "show", "--csv"], work, env)
    assert ",12," in shown and ",14," in shown
    assert (work / "adapters" / "inverted" / "adapter.safetensors").read_bytes() == adapter
    assert "up to date" in _run(["dvc", "status"], work, env)
    assert not (work / "mlruns").exists()


def _queue_logs(work: Path) -> str:
    """What the queue's celery workers and experiments logged, for a failure's message."""
    logs = sorted((work / ".dvc" / "tmp" / "exps").rglob("*.out"))
    return "".join(f"\n--- {f.relative_to(work)}\n{f.read_text(errors='replace')[-2000:]}" for f in logs)


def test_a_one_class_domain_runs_through_with_its_judge_scores_marked_not_computable(project, tmp_path):
    """A domain of one class is allowed: its evaluate stage finishes, the judge's scores marked n/a (a judge of
    one class calls everything perfect), instead of NotComputable stopping `dvc repro`. In a copy of the project,
    so that the tests after this one read the original; it logs to the original's MLflow store, which the runs
    it reopens live in (a copied store refuses to work in its new place)."""
    work, env, _ = project
    copy = tmp_path / "one-class"
    shutil.copytree(work, copy, symlinks=True)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["data"]["domains"]["rotated"]["transforms"] = ["rotate:90", "subset_classes:[3]", "limit_per_class:10"]
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], copy, env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "judge metrics need at least two classes" in out.stdout + out.stderr  # evaluate@rotated's summary
    ev = results.load(copy / "metrics" / "rotated.json", results.DomainEvaluation)
    assert ev.floor is None and ev.base is None and ev.adapter is None
    assert ev.judge_note.startswith("judge metrics need at least two classes, this domain has 1")
    assert ev.test_loss_adapter > 0 and ev.trainable_params > 0  # what can be measured still is
    page = (copy / "reports" / "rotated" / "report.md").read_text()
    assert "n/a: judge metrics need at least two classes" in page and "| n/a | n/a |" in page
    run = results.load(copy / "reports" / "summary.json", results.RunSummary)
    assert [g.goal for g in run.domains["rotated"].goals] == ["trainable parameters <= 3% of the base"]
    assert len(run.domains["inverted"].goals) > 1  # the other domain is judged as before
    assert "| rotated | n/a | n/a | n/a |" in (copy / "reports" / "report.md").read_text()


def test_forced_rerun_from_scratch_is_bit_identical(project):  # keep last: see its end
    work, env, _ = project
    outputs = [
        "models/base/model.safetensors",
        "adapters/inverted/adapter.safetensors",
        "tune/inverted/best.json",
        "metrics/inverted.json",
        "models/judge/inverted/judge.safetensors",
    ]
    before = {f: hashlib.sha256((work / f).read_bytes()).hexdigest() for f in outputs}
    shutil.rmtree(work / "ray_results")  # no checkpoint to resume from: every stage trains anew
    # one domain's chain from the raw data on (the other domain's stages are the same code on other data)
    out = _run(["dvc", "repro", "--force", "evaluate@inverted"], work, env)
    assert "Running stage 'pretrain'" in out and "rotated" not in out
    after = {f: hashlib.sha256((work / f).read_bytes()).hexdigest() for f in outputs}
    assert before == after
    # last in this module: the rerun's records (runs/*.json: new MLflow run ids and registry versions) differ
    # by design, so the stages that read them (the other domain's among them) now show as changed
