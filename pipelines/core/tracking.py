"""MLflow, and only here: stage runs, reopening an earlier stage's run, Tune trials as child runs,
curves, result records, and models:/ and runs:/ URIs downloaded (the registry's versions, tags and aliases:
pipelines/core/registry.py).

Every client is built by `client()` with the tracking URI; a server that is down fails the stage in
one line before anything trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cdiff import results
from cdiff.config import from_dict, to_dict
from cdiff.errors import CdiffError
from cdiff.io import Artefact, atomic_dir, kept_whatever_happens, read_json, write_json
from pipelines.core.config import Params
from pipelines.core.layout import paths

if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # database migrations and "creating experiment" are not news
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@dataclass(frozen=True)
class RunRecord:
    """runs/*.json: which MLflow run (and registered version) holds a stage's model."""

    run_id: str
    model_version: str
    fingerprint: str = ""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the repo's sqlite file as an absolute path (DVC temp workspaces share it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()


def embedded_uri() -> str:
    """The default store: mlflow.db in the repository, its artefacts in the repository's mlartifacts/."""
    return f"sqlite:///{paths.mlflow_db}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that is down fails the stage here, in one line, before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CdiffError(
            f"MLflow tracking server {uri} is unreachable ({reason}): start it, or unset MLFLOW_TRACKING_URI "
            "to log to the local sqlite store"
        ) from e


def setup(p: Params) -> str:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small record read back
    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)  # MLflow 3.17 exports it as MLFLOW_TRACKING_URI too: Ray's workers get it
    if uri == embedded_uri():
        experiment = mlflow.get_experiment_by_name(p.mlflow.experiment)
        if experiment is None:  # the embedded store keeps artefacts in the repository, whatever folder a stage runs in
            mlflow.create_experiment(p.mlflow.experiment, artifact_location=paths.mlflow_artifacts.as_uri())
        else:
            check_artifacts_inside(experiment.name, experiment.artifact_location)
    return mlflow.set_experiment(p.mlflow.experiment).experiment_id


def check_artifacts_inside(experiment: str, location: str) -> None:
    """The embedded store's artefacts must lie in this project: a copied or moved project's mlflow.db still
    names the original's folder, and would write into it. (MLflow cannot re-point an experiment: each run and
    registered version keeps its own absolute artefact URI.)"""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # an object store the user chose for this experiment
    folder = Path(os.path.realpath(urllib.request.url2pathname(parsed.path)))
    if not folder.is_relative_to(paths.shared):
        raise CdiffError(
            f"MLflow experiment {experiment!r} in {paths.show(paths.mlflow_db)} keeps its artefacts in {folder}, "
            f"outside this project ({paths.shared}): the project was copied or moved. Move {paths.show(paths.mlflow_db)} "
            f"and {paths.show(paths.mlflow_artifacts)}/ aside to start a new store here, or set MLFLOW_TRACKING_URI "
            "to the store you mean"
        )


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


@contextlib.contextmanager
def stage_run(p: Params, stage: str, domain: str | None = None):
    """A new MLflow run for one stage, with the params it ran with, versions and reproducibility tags; yields its id."""
    setup(p)
    tags = {
        "git_commit": git_commit(),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "stage": stage,
        "domain": domain or "",
        "packages": json.dumps({n: version(n) for n in ("torch", "ray", "mlflow", "dvc")}),
    }
    with mlflow.start_run(run_name=f"{stage}-{domain}" if domain else stage, tags=tags) as run:
        try:
            mlflow.log_params(flatten(to_dict(p)))
            mlflow.log_artifact(str(paths.params_file))
            if paths.lock_file.is_file():
                mlflow.log_artifact(str(paths.lock_file))  # dvc.lock's input hashes as of this run
            yield run.info.run_id
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C (cdiff.io.Interrupted): stopped, not failed
            mlflow.end_run("KILLED")
            raise


@contextlib.contextmanager
def reopen(p: Params, record: Path):
    """Log onto the run of an earlier stage, named by its run record (runs/*.json); yields the record."""
    run = results.load(record, RunRecord, "MLflow run record")
    setup(p)
    with mlflow.start_run(run_id=run.run_id):
        try:
            yield run
        except BaseException:
            mlflow.end_run("FINISHED")  # the earlier stage's run stays finished: its model is still good
            raise


def save_run_record(path: Path, run_id: str, model_version: str, fingerprint: str = "") -> None:
    results.save(path, RunRecord(run_id, model_version, fingerprint))


def log_params(values: dict) -> None:
    mlflow.log_params(values)


def log_result(record, prefix: str = "") -> None:
    """A result record onto the active run: its numbers as metrics, itself as results/<Type>.json."""
    mlflow.log_metrics(results.scalars(record, prefix))
    mlflow.log_dict(to_dict(record), f"results/{prefix}{type(record).__name__}.json")


def log_sweep(over: str, points: list[results.SweepPoint]) -> None:
    """Each point's numbers as `sweep_sampler.ddim-50.fid`; MLflow refuses '+' in a key: dpm++2m-20 -> dpmpp2m-20."""
    for point in points:
        mlflow.log_metrics(results.scalars(point, f"sweep_{over}.{point.setting.replace('+', 'p')}."))


def log_files(path: Path, artifact_path: str) -> None:
    """A file or a folder's files onto the active run."""
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def load_result(run_id: str, cls: type[results.R]) -> results.R | None:
    """A record logged by `log_result`, or None when the run has none (yet)."""
    try:
        raw = mlflow.artifacts.load_dict(f"runs:/{run_id}/results/{cls.__name__}.json")
    except (mlflow.exceptions.MlflowException, OSError):
        return None
    return from_dict(cls, raw, f"run {run_id[:8]} results/{cls.__name__}.json")


@dataclass(frozen=True)
class StageRun:
    run_id: str
    domain: str
    commit: str  # the git commit it ran at


def stage_runs(p: Params, stage: str, domain: str | None = None) -> list[StageRun]:
    """Every finished run of a stage (optionally one domain): run_id, domain and git commit of each."""
    setup(p)
    query = f"tags.stage = '{stage}'" + (f" and tags.domain = '{domain}'" if domain else "")
    runs = client().search_runs([mlflow.get_experiment_by_name(p.mlflow.experiment).experiment_id], query)
    return [StageRun(r.info.run_id, r.data.tags.get("domain", ""), r.data.tags.get("git_commit", "")) for r in runs]


def log_curve(run_id: str, name: str, points: list[tuple[int, float]], uri: str | None = None) -> None:
    """Log (step, value) points as one metric's history, in batches MLflow accepts."""
    mlflow_client = MlflowClient(uri) if uri else client()
    batch = [Metric(name, float(v), 0, int(s)) for s, v in points]
    for i in range(0, len(batch), 900):
        mlflow_client.log_batch(run_id, metrics=batch[i : i + 900])


def log_missing(run_id: str, name: str, points: list[tuple[int, float]]) -> int:
    """Log the points whose steps the run's history lacks (after a resumed stage); returns how many."""
    have = {m.step for m in client().get_metric_history(run_id, name)}
    missing = [(s, v) for s, v in points if s not in have]
    if missing:
        log_curve(run_id, name, missing)
    return len(missing)


def log_trial(trial: results.TuneTrial, curves: dict[str, list[tuple[int, float]]], tags: dict[str, str]) -> bool:
    """One Tune trial as a child run of the active (tune) run: its config and its curves.

    tags must hold `tune_experiment` and `tune_trial_id`: a trial that a finished run already holds (a
    restored search returns the trials of the run that was interrupted too) is skipped; returns False.
    """
    parent = mlflow.active_run()
    logged = f"tags.tune_experiment = '{tags['tune_experiment']}' and tags.tune_trial_id = '{tags['tune_trial_id']}'"
    if client().search_runs([parent.info.experiment_id], f"{logged} and attributes.status = 'FINISHED'"):
        return False
    tags = {**tags, "git_commit": parent.data.tags.get("git_commit", "unknown")}
    with mlflow.start_run(run_name=f"trial-{trial.trial}", nested=True, tags=tags) as child:
        mlflow.log_params({"r": trial.r, "alpha": trial.alpha, "lr": trial.lr})
        for name, points in curves.items():
            log_curve(child.info.run_id, name, points)
    return True


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    mlflow_client = MlflowClient(uri) if uri else client()
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def run_origin(p: Params, run_id: str, folder: Path) -> tuple[str, dict[str, Path]]:
    """(git commit, {'params.yaml': path, 'dvc.lock': path}) of a run, its files downloaded into `folder`."""
    setup(p)
    try:
        commit = client().get_run(run_id).data.tags.get("git_commit", "unknown")
    except mlflow.exceptions.MlflowException as e:
        raise CdiffError(f"no MLflow run {run_id} at {tracking_uri()}") from e
    files = {}
    for name in (paths.params_file.name, paths.lock_file.name):
        try:
            files[name] = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=folder))
        except (mlflow.exceptions.MlflowException, OSError):
            pass
    return commit, files


# ---- the registry as a source of models: cdiff's resolver of models:/ and runs:/ URIs -----------------

DOWNLOAD = Artefact("MLflow download", folder=True, marker="cdiff-download.json", format="cdiff-mlflow-download")
_MODELS = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+|latest))")
_RUNS = re.compile(r"runs:/([^/]+)/(.+)")


def cache_root() -> Path:
    """Where downloaded models live: $CDIFF_CACHE, else $XDG_CACHE_HOME/cdiff, else ~/.cache/cdiff."""
    if os.environ.get("CDIFF_CACHE"):
        return Path(os.environ["CDIFF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdiff"


def _store(uri: str) -> str:
    """The tracking URI to read `uri` from: one that exists (a sqlite file is never created by a lookup)."""
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise CdiffError(
            f"{uri}: no MLflow store at {store}: set MLFLOW_TRACKING_URI to the one that holds it "
            "(sqlite:////ABS/PATH/mlflow.db or http://HOST:PORT), or run in the project folder that holds mlflow.db"
        )
    check_server(store)
    return store


def _pin(mlflow_client: MlflowClient, uri: str) -> tuple[str, str]:
    """(what to download, the cache key): an alias pinned to its version, keyed by the version's own run or
    model id, so that a new version, or a new store reusing a name and number, is never served from the cache."""
    if m := _MODELS.fullmatch(uri):
        name, alias, number = m.groups()
        if alias:
            mv = mlflow_client.get_model_version_by_alias(name, alias)
        elif number == "latest":
            mv = max(mlflow_client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        else:
            mv = mlflow_client.get_model_version(name, number)
        return f"models:/{name}/{mv.version}", _key("models", name, f"v{mv.version}-{mv.model_id or mv.run_id}")
    if m := _RUNS.fullmatch(uri):
        run_id, path = m.groups()
        mlflow_client.get_run(run_id)  # a one-line error for a run that is not there
        return uri, _key("runs", run_id, path)
    raise CdiffError(f"{uri}: use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")


def _key(*parts: str) -> str:
    """A cache path of plain names: nothing in a URI can point outside the cache."""
    return "/".join(re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in parts)


def download(uri: str) -> Path:
    """A local copy of what a models:/ or runs:/ URI names, from the cache when this version is there."""
    store = _store(uri)
    mlflow_client = MlflowClient(store, store)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        source, key = _pin(mlflow_client, uri)
        folder = cache_root() / "mlflow" / key
        if not (folder / DOWNLOAD.marker).is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                with kept_whatever_happens(), atomic_dir(folder, DOWNLOAD) as tmp:  # a cache, not an output
                    local = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp), tracking_uri=store)
                    marker = {"format": DOWNLOAD.format, "uri": source, "store": store}
                    write_json(tmp / DOWNLOAD.marker, marker | {"path": str(Path(local).relative_to(tmp))})
            except CdiffError:
                if not (folder / DOWNLOAD.marker).is_file():  # not another process that got there first
                    raise
    except mlflow.exceptions.MlflowException as e:
        raise CdiffError(f"{uri}: {(e.message.splitlines() or ['not found'])[0]} (MLflow store {store})") from e
    return folder / read_json(folder / DOWNLOAD.marker, "MLflow download record")["path"]


def bundle(uri: str) -> dict[str, Path]:
    """The cdiff folders a URI holds: {'base': ..., 'adapter': ...} for a registered pyfunc model, else
    {'folder': ...} for a plain folder (runs:/RUN_ID/adapter)."""
    from mlflow.models import Model

    folder = download(uri)
    if not (folder / "MLmodel").is_file():
        return {"folder": folder}
    artifacts = Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts", {})
    return {key: folder / spec["path"] for key, spec in artifacts.items()}


def resolve_uri(uri: str, kind: str | None) -> Path:
    """cdiff's resolver of models:/ and runs:/ URIs (the cdiff.uri_resolvers entry points, cdiff.sources)."""
    from pipelines.core import serving

    folders = bundle(uri)
    if "folder" in folders:
        if kind == "base":
            raise CdiffError(f"{uri} is a folder with no base model bundled: give its base, and it with --adapter")
        return folders["folder"]
    if kind == "base":
        return folders[serving.BASE]
    kind = kind or ("adapter" if serving.ADAPTER in folders else "model")
    if kind == "model" and serving.ADAPTER in folders:
        raise CdiffError(f"{uri} is an adapter (with its base): give it as the adapter, and a base model beside it")
    key = serving.ADAPTER if kind == "adapter" else serving.BASE
    if key not in folders:
        raise CdiffError(f"{uri} holds no {kind}: it is a base model")
    return folders[key]
