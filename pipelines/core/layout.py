"""Every path of the pipeline, defined once: the files dvc.yaml's deps and outs name.

tests/test_dvc_deps.py checks that dvc.yaml and this layout agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _roots() -> tuple[Path, Path]:
    """(the workspace a stage runs in, the repository whose MLflow store and Ray storage it shares).

    DVC runs a stage in its workspace's root. A queued or --temp experiment's workspace is a temp folder
    (<repo>/.dvc/tmp/exps/...), deleted afterwards, and there DVC sets DVC_ROOT to the repository:
    runs and checkpoints go to the repository's store, outputs stay in the workspace.
    """
    cwd, dvc_root = Path.cwd().resolve(), os.environ.get("DVC_ROOT")
    if dvc_root and os.environ.get("DVC_STAGE"):
        return cwd, Path(dvc_root).resolve()
    root = Path(dvc_root or cwd).resolve()
    return root, root


@dataclass(frozen=True)
class Layout:
    root: Path
    home: Path | None = None  # the repository of a DVC temp workspace (default: root)

    @property
    def shared(self) -> Path:
        """Where the MLflow store and a relative ray.storage_path live: the repository, also for DVC's temp workspaces."""
        return self.home or self.root

    # ---- inputs and bookkeeping
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def lock_file(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def images(self) -> Path:
        """Where image-folder domains live (imagefolder:data/images/NAME): the index stages depend on it."""
        return self.root / "data" / "images"

    def image_index(self, dataset: str) -> Path:
        """The images one dataset's source reads, with their hashes: its prepare stage depends on this file alone."""
        return self.root / "data" / "image_index" / f"{dataset}.json"

    @property
    def mlflow_db(self) -> Path:
        return self.shared / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.shared / "mlartifacts"

    def show(self, path: Path) -> str:
        """A path as the user reads it: relative to the repository root."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def ray_storage(self, storage_path: str) -> str:
        """Ray's checkpoint store: an absolute local path, or a URI (s3://, gs://) as given."""
        return storage_path if "://" in storage_path else str((self.shared / storage_path).resolve())

    # ---- data and models
    def prepared(self, dataset: str) -> Path:
        return self.root / "data" / "prepared" / dataset

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    def judge(self, dataset: str) -> Path:
        return self.root / "models" / "judge" / dataset

    def full_model(self, domain: str) -> Path:
        return self.root / "models" / "full" / domain

    def adapter(self, domain: str) -> Path:
        return self.root / "adapters" / domain

    def tune_best(self, domain: str) -> Path:
        return self.root / "tune" / domain / "best.json"

    def tune_trials(self, domain: str) -> Path:
        return self.root / "tune" / domain / "trials.json"

    # ---- sample grids
    @property
    def base_grid(self) -> Path:
        return self.root / "samples" / "base.png"

    def domain_grid(self, domain: str, model: str) -> Path:
        """model: 'base' (the base alone) or 'adapter' (base + adapter)."""
        return self.root / "samples" / domain / f"{model}.png"

    def full_grid(self, domain: str) -> Path:
        return self.root / "samples" / f"full-{domain}.png"

    # ---- MLflow run records: later stages log onto the run of the stage that made the model
    @property
    def pretrain_run(self) -> Path:
        return self.root / "runs" / "pretrain.json"

    def finetune_run(self, domain: str) -> Path:
        return self.root / "runs" / f"finetune-{domain}.json"

    # ---- metrics (headline numbers for `dvc metrics show`) and their per-class detail
    @property
    def pretrain_metrics(self) -> Path:
        return self.root / "metrics" / "pretrain.json"

    def judge_metrics(self, dataset: str) -> Path:
        return self.root / "metrics" / f"judge-{dataset}.json"

    @property
    def base_metrics(self) -> Path:
        return self.root / "metrics" / "base.json"

    def domain_metrics(self, domain: str) -> Path:
        return self.root / "metrics" / f"{domain}.json"

    def full_metrics(self, domain: str) -> Path:
        return self.root / "metrics" / f"full-{domain}.json"

    def judged(self, domain: str, what: str) -> Path:
        """A domain's judged image set: the judge features the report compares, paired (cdiff.metrics.JudgedFeatures).
        'real' (the test split) and 'adapter' in the evaluate stage's folder (empty for a domain no judge can
        score), 'full' (the full fine-tune) beside it."""
        if what == "full":
            return self.root / "metrics" / "judged" / f"full-{domain}.safetensors"
        return self.root / "metrics" / "judged" / domain / f"{what}.safetensors"

    def per_class(self, metrics_file: Path) -> Path:
        """Per-class accuracy beside a metrics file, kept out of it so that `dvc metrics show` stays one table."""
        return self.root / "metrics" / "per_class" / metrics_file.name

    # ---- curves and sweeps for `dvc plots`
    @property
    def pretrain_curve(self) -> Path:
        return self.root / "plots" / "pretrain_loss.csv"

    def finetune_curve(self, domain: str) -> Path:
        return self.root / "plots" / f"finetune-{domain}_loss.csv"

    def full_curve(self, domain: str) -> Path:
        return self.root / "plots" / f"full-{domain}_loss.csv"

    def sweep(self, over: str) -> Path:
        """over: 'guidance' or 'sampler'."""
        return self.root / "plots" / f"sweep_{over}.csv"

    # ---- reports
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report_page(self, name: str | None = None) -> Path:
        """reports/report.md, or reports/NAME/report.md for 'base' and each domain."""
        return self.reports / "report.md" if name is None else self.reports / name / "report.md"

    @property
    def summary(self) -> Path:
        return self.reports / "summary.json"


def make_parents(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)


paths = Layout(*_roots())
