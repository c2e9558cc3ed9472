"""What every stage shares: the params, the output paths, one-line errors, and a Ray session."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

from cdiff.config import Params, load_params
from cdiff.errors import CdiffError

ROOT = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
PARAMS_FILE = ROOT / "params.yaml"


class Paths:
    """The pipeline's file layout (the DVC outs in dvc.yaml)."""

    prepared = ROOT / "data" / "prepared"
    base_model = ROOT / "models" / "base"
    tune = ROOT / "tune"
    adapters = ROOT / "adapters"
    samples = ROOT / "samples"
    metrics = ROOT / "metrics"
    plots = ROOT / "plots"
    runs = ROOT / "runs"  # MLflow run ids, so later stages log onto the right runs
    judges = ROOT / "models" / "judge"  # one classifier per dataset: GAN-test accuracy and FID features
    full = ROOT / "models" / "full"  # full fine-tune references (evaluate.full_finetune)
    reports = ROOT / "reports"


def dataset_name(p: Params, name: str) -> str:
    """'base' -> the base dataset's name; a domain name stays itself."""
    return p.data.base.name if name == "base" else p.domain(name).name


def sampler_spec(p: Params) -> str:
    """The pipeline's sampling settings as one spec: 'ddpm', 'ddim-N' or 'dpm++2m-N'."""
    return "ddpm" if p.sample.sampler == "ddpm" else f"{p.sample.sampler}-{p.sample.steps}"


def params() -> Params:
    return load_params(PARAMS_FILE)


def stage(fn):
    """Run a stage's main: user errors print one line and exit 2 (a traceback only with CDIFF_DEBUG=1)."""

    @functools.wraps(fn)
    def main(*args):
        try:
            fn(*args)
        except CdiffError as e:
            if os.environ.get("CDIFF_DEBUG") == "1":
                raise
            print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
            sys.exit(2)

    return main


def mkdirs(*paths: Path) -> None:
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def ray_session(p: Params):
    """Join the cluster at RAY_ADDRESS, or start a local Ray sized by params (no dashboard); shut down after."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "GLOO_SOCKET_IFNAME") if k in os.environ}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local CPU DDP: gloo on loopback
        env["GLOO_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"]
        ray.init(
            num_cpus=p.ray.num_cpus, include_dashboard=False, runtime_env={"env_vars": env}, configure_logging=False
        )
    try:
        yield
    finally:
        ray.shutdown()


def storage_path(p: Params) -> str:
    """Ray's checkpoint store: an absolute local path, or a URI (s3://, gs://) as given."""
    path = p.ray.storage_path
    return path if "://" in path else str((ROOT / path).resolve())
