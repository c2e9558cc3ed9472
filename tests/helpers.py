"""A throwaway copy of the project in a temp git repo, for tests that run stages or `dvc repro`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("dvc.lock", "metrics/", "plots/", "tune/", "runs/", "reports/")


def run(args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out if not check else out.stdout


def make_project(work: Path, edit=None) -> dict:
    """Copy the tracked sources into `work` with tests/tiny_params.yaml as params.yaml; returns the env to run in.

    `edit(params_dict)` may change the tiny params first.
    """
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(OUTPUTS):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    params = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    if edit:
        edit(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
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
        run(cmd, work, env)
    return env
