"""MLflow: one run per stage, tagged with git commit, DVC stage and domain; registry helpers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from cdiff.config import Params, to_dict
from cdiff.errors import CdiffError
from cdiff.io import write_json
from pipelines.common import PARAMS_FILE, ROOT


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the repo's sqlite file as an absolute path (DVC temp workspaces share it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that is down fails the stage here, in one line, before any training starts."""
    import urllib.error
    import urllib.request

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
    check_server(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    if "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_experiment_by_name(p.mlflow.experiment) is None:
        # the embedded default keeps artifacts beside mlflow.db, whatever folder a stage runs in
        mlflow.create_experiment(p.mlflow.experiment, artifact_location=(ROOT / "mlartifacts").as_uri())
    return mlflow.set_experiment(p.mlflow.experiment).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
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
def stage_run(p: Params, stage: str, domain: str | None = None, run_name: str | None = None, parent_run_id=None):
    """An MLflow run for one stage, with the full resolved params, versions and reproducibility tags."""
    setup(p)
    tags = {
        "git_commit": git_commit(),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "stage": stage,
        "domain": domain or "",
        "packages": json.dumps({n: version(n) for n in ("torch", "ray", "mlflow", "dvc")}),
    }
    lock = ROOT / "dvc.lock"
    with mlflow.start_run(
        run_name=run_name or (f"{stage}-{domain}" if domain else stage), tags=tags, parent_run_id=parent_run_id
    ) as run:
        mlflow.log_params(flatten(to_dict(p)))
        mlflow.log_artifact(str(PARAMS_FILE))
        if lock.is_file():
            mlflow.log_artifact(str(lock))  # dvc.lock's input hashes as of this run
        yield run


def log_curve(run_id: str, name: str, points: list[tuple[int, float]], uri: str | None = None) -> None:
    """Log (step, value) points as one metric's history, in batches MLflow accepts."""
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    batch = [Metric(name, float(v), 0, int(s)) for s, v in points]
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])


def log_missing(run_id: str, name: str, points: list[tuple[int, float]], uri: str | None = None) -> int:
    """Log the points whose steps the run's history lacks (after a resumed stage); returns how many."""
    have = {m.step for m in MlflowClient(uri).get_metric_history(run_id, name)}
    missing = [(s, v) for s, v in points if s not in have]
    if missing:
        log_curve(run_id, name, missing, uri)
    return len(missing)


def register(name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
    """Register the run's artifact folder as a new version of `name`; returns the version."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    return mv.version


def write_run_file(path: Path, **info) -> None:
    write_json(path, info)


def set_base_alias(p: Params, fingerprint: str, alias: str = "adapters") -> None:
    """Point the base model's alias at the registered version whose weights the adapters were trained on."""
    client = MlflowClient()
    name = p.mlflow.base_model_name
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("fingerprint") == fingerprint:
            client.set_registered_model_alias(name, alias, mv.version)
            return


def read_run_file(path: Path) -> dict:
    from cdiff.io import read_json

    return read_json(path, "MLflow run record")
