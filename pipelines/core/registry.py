"""The MLflow model registry, and only here: the tags cdiff sets on a version (one typed record, written and
read here alone), the base's `adapters` alias, the `champion` alias, the judged images a champion contest
compares, and the versions `python -m pipelines.compare` lists.

The champion moves to a new adapter version only when it is better beyond the noise: by a paired bootstrap
interval on the difference of the two FIDs (both versions' judge features against the same real split,
resampled jointly; cdiff.bootstrap.fid_difference), not by whether their own intervals overlap (Schenker &
Gentleman 2001: that test is conservative and low-powered). Where the champion's judged images were not kept
(a version from before they were), or were judged by another judge, the two intervals are compared instead.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow

import cdiff
from cdiff import results
from cdiff.adapter_format import read_adapter_config
from cdiff.checkpoint import read_model_config
from cdiff.config import to_dict
from cdiff.errors import CdiffError
from cdiff.metrics import JudgedFeatures
from cdiff.samplers import Sampler
from pipelines.core.config import Params
from pipelines.core.tracking import check_server, client, tracking_uri

CHAMPION = "champion"
JUDGED = "scores/judged.safetensors"  # on an adapter's finetune run: its evaluation's judge features


@dataclass(frozen=True)
class VersionTags:
    """The tags of a registered version. Numbers are written with 8 decimals and read back as numbers; a tag
    that is absent (or not a number where one is due) reads as None."""

    fingerprint: str | None = None  # a base version: its weights
    base_fingerprint: str | None = None  # an adapter version: the base weights it was trained on
    r: int | None = None
    alpha: float | None = None
    val_loss: float | None = None
    fid: float | None = None  # set by the evaluate stage: the bias-corrected FID and its interval
    fid_low: float | None = None
    fid_high: float | None = None

    def as_tags(self) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = f"{value:.8f}" if isinstance(value, float) else str(value)
        return out

    @classmethod
    def read(cls, tags: dict[str, str]) -> VersionTags:
        kinds = {"r": int, "alpha": float, "val_loss": float, "fid": float, "fid_low": float, "fid_high": float}
        values = {}
        for f in dataclasses.fields(cls):
            raw = tags.get(f.name)
            try:
                values[f.name] = None if raw is None else kinds.get(f.name, str)(float(raw) if f.name == "r" else raw)
            except ValueError:
                values[f.name] = None
        return cls(**values)


@dataclass(frozen=True)
class Version:
    """A registered version of the base or of an adapter, as `python -m pipelines.compare` lists it."""

    model: str
    version: int
    aliases: list[str]
    tags: VersionTags
    run_id: str


@dataclass(frozen=True)
class Crowning:
    """What a champion contest did: the version that holds `champion` after it, why, and the comparison."""

    champion: str
    why: str  # first, better, tie or worse
    comparison: results.Comparison | None  # the new version minus the champion in FID; None when first


_NOT_CODE = shutil.ignore_patterns("__pycache__", "*.pyc")


def log_servable(name: str, base: Path, adapter: Path | None, sampler: Sampler, tags: VersionTags) -> str:
    """Log the base (with `adapter`, if given) as a pyfunc model on the active run (pipelines/core/serving.py,
    both folders bundled) and register it as a new version of `name` with `tags`; returns the version."""
    from pipelines.core import serving

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file copied
    folders = {serving.BASE: base} | ({serving.ADAPTER: adapter} if adapter is not None else {})
    if adapter is not None:
        names = read_adapter_config(adapter).class_names
    else:
        names = read_model_config(base).class_names
    example = serving.input_example((names or ["0"])[0], sampler)
    packages = ("mlflow", "torch", "torchvision", "safetensors", "pillow", "pandas")
    requirements = [f"{n}=={version(n)}" for n in packages]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {key: str(shutil.copytree(folder, Path(tmp) / key)) for key, folder in folders.items()}
        code = shutil.copytree(Path(cdiff.__file__).parent, Path(tmp) / "code" / "cdiff", ignore=_NOT_CODE)
        info = mlflow.pyfunc.log_model(
            name=serving.NAME,
            python_model=serving.__file__,
            artifacts=artifacts,
            model_config={"sampler": to_dict(sampler)},
            signature=serving.signature(sampler),
            input_example=example,
            pip_requirements=requirements,  # given, not inferred (which loads the model in a subprocess)
            code_paths=[str(code)],  # the cdiff that wrote the folders serves them
        )
    return register(name, info.model_uri, mlflow.active_run().info.run_id, info.model_id, tags)


def register(name: str, model_uri: str, run_id: str, model_id: str | None, tags: VersionTags) -> str:
    """A new version of `name` (created if new) for a logged model; returns its number."""
    mlflow_client = client()
    try:
        mlflow_client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        mlflow_client.create_registered_model(name)
    return mlflow_client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags.as_tags(), model_id=model_id
    ).version


def set_base_alias(p: Params, fingerprint: str, alias: str = "adapters") -> None:
    """Point the base model's alias at the registered version whose weights the adapters were trained on."""
    mlflow_client, name = client(), p.mlflow.base_model_name
    for mv in mlflow_client.search_model_versions(f"name = '{name}'"):
        if VersionTags.read(mv.tags).fingerprint == fingerprint:
            mlflow_client.set_registered_model_alias(name, alias, mv.version)
            return


def log_judged(judged: JudgedFeatures) -> None:
    """An adapter evaluation's judged images (features, labels, hits), onto the active run: what a later version
    is compared with, paired, should this one be champion."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(JUDGED).name
        judged.save(path)
        mlflow.log_artifact(str(path), str(Path(JUDGED).parent))


def load_judged(run_id: str) -> JudgedFeatures | None:
    """The judged images `log_judged` kept on a run; None where it kept none (or they cannot be read)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=JUDGED, tracking_uri=tracking_uri())
        return JudgedFeatures.load(path)
    except (mlflow.exceptions.MlflowException, OSError, CdiffError):
        return None


def set_champion(
    model_name: str,
    version: str,
    score: results.Score,
    compare: Callable[[str], results.Comparison | None] | None = None,
) -> Crowning:
    """Tag this version with its FID and interval, then hold a contest with the champion: `compare(run_id of
    the champion)` gives this version minus the champion in FID (paired), or None where it cannot; then their
    intervals are compared instead. `champion` moves only on 'better'."""
    mlflow_client = client()
    low, high = score.fid_interval or (score.fid, score.fid)
    for key, value in VersionTags(fid=score.fid, fid_low=low, fid_high=high).as_tags().items():
        mlflow_client.set_model_version_tag(model_name, version, key, value)
    try:
        current = mlflow_client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    held = VersionTags.read(current.tags) if current is not None else None
    if current is None or str(current.version) == str(version) or held.fid is None:
        mlflow_client.set_registered_model_alias(model_name, CHAMPION, str(version))
        return Crowning(str(version), "first", None)
    comparison = compare(current.run_id) if compare and current.run_id else None
    if comparison is None:
        low_high = [held.fid if v is None else v for v in (held.fid_low, held.fid_high)]
        champion = results.Score(held.fid, 0.0, 0, low_high)
        beats = score.fid_beats(champion)
        verdict = "tie" if beats is None else ("better" if beats else "worse")
        comparison = results.Comparison(score.fid - held.fid, None, verdict, paired=False)
    if comparison.verdict == "better":
        mlflow_client.set_registered_model_alias(model_name, CHAMPION, str(version))
        return Crowning(str(version), "better", comparison)
    return Crowning(str(current.version), comparison.verdict, comparison)


def versions(p: Params, domain: str | None = None) -> list[Version]:
    """Every registered version of the base and of each domain's adapter (or of one domain's), with its
    aliases and tags, in name and version order."""
    check_server(tracking_uri())
    mlflow_client = client()
    prefix = p.mlflow.adapter_model_prefix
    wanted = (lambda n: n == prefix + domain) if domain else (lambda n: n.startswith(prefix))
    rows = []
    for model in mlflow_client.search_registered_models(max_results=1000):
        if model.name != p.mlflow.base_model_name and not wanted(model.name):
            continue
        aliases: dict[str, list[str]] = {}
        for alias, number in model.aliases.items():
            aliases.setdefault(str(number), []).append(alias)
        for mv in mlflow_client.search_model_versions(f"name = '{model.name}'"):
            named = sorted(aliases.get(str(mv.version), []))
            rows.append(Version(model.name, int(mv.version), named, VersionTags.read(mv.tags), mv.run_id or ""))
    return sorted(rows, key=lambda r: (r.model, r.version))


def aliased(p: Params, rows: list[Version], alias: str) -> dict[str, str]:
    """{domain: models:/ADAPTER@alias} for every adapter among `versions` rows with a version holding `alias`."""
    prefix = p.mlflow.adapter_model_prefix
    named = {r.model for r in rows if r.model.startswith(prefix) and alias in r.aliases}
    return {name[len(prefix) :]: f"models:/{name}@{alias}" for name in sorted(named)}
