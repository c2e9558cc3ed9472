"""Reproduce an MLflow run: `python -m pipelines.reproduce RUN_ID [--dir DIR] [--stage STAGE] [--dry-run]`.

Every stage run records its git commit (tag git_commit), the full params.yaml and dvc.lock as of its
start. This checks out that commit as a git worktree in DIR, puts the run's params.yaml there, runs
`dvc repro [STAGE]` from scratch (the worktree has its own empty DVC cache and MLflow store), and
compares each output hash in the new dvc.lock with the run's dvc.lock.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from cdiff.errors import CdiffError
from pipelines import tracking
from pipelines.common import ROOT, params, stage


def lock_outputs(lock_file: Path) -> dict[str, str]:
    """path -> md5 of every stage output in a dvc.lock."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return {
        out["path"]: out.get("md5", "")
        for entry in lock.get("stages", {}).values()
        for out in entry.get("outs", [])
        if "path" in out
    }


def compare(logged: dict[str, str], new: dict[str, str]) -> tuple[list[str], list[str]]:
    """(outputs with the same hash, outputs whose hash differs), over the outputs both locks have."""
    both = sorted(set(logged) & set(new))
    return [p for p in both if logged[p] == new[p]], [p for p in both if logged[p] != new[p]]


@stage
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="an MLflow run id of any stage (see the MLflow UI or pipelines.compare)")
    parser.add_argument("--dir", type=Path, help="where to check out (default reproduce-RUNID8 beside the repo)")
    parser.add_argument("--stage", help="rerun only up to this stage (default: the whole pipeline)")
    parser.add_argument("--dry-run", action="store_true", help="check out and print the command, run nothing")
    args = parser.parse_args()
    tracking.setup(params())
    try:
        run = MlflowClient().get_run(args.run_id)
    except mlflow.exceptions.MlflowException as e:
        raise CdiffError(f"no MLflow run {args.run_id} at {tracking.tracking_uri()}") from e
    commit = run.data.tags.get("git_commit", "unknown")
    if commit == "unknown":
        raise CdiffError(f"run {args.run_id} has no git_commit tag: it was not made inside a git checkout")
    target = (args.dir or ROOT.parent / f"reproduce-{args.run_id[:8]}").resolve()
    if target.exists():
        raise CdiffError(f"{target} exists: choose another --dir")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in ("params.yaml", "dvc.lock"):
            try:
                files[name] = Path(
                    mlflow.artifacts.download_artifacts(run_id=args.run_id, artifact_path=name, dst_path=tmp)
                )
            except (mlflow.exceptions.MlflowException, OSError) as e:
                if name == "params.yaml":
                    raise CdiffError(f"run {args.run_id} has no params.yaml artifact") from e
        git = subprocess.run(
            ["git", "worktree", "add", "--detach", str(target), commit], cwd=ROOT, capture_output=True, text=True
        )
        if git.returncode != 0:
            raise CdiffError(f"git worktree add failed: {git.stderr.strip().splitlines()[-1]}")
        shutil.copyfile(files["params.yaml"], target / "params.yaml")
        logged = lock_outputs(files["dvc.lock"]) if "dvc.lock" in files else {}
    command = ["dvc", "repro", *([args.stage] if args.stage else [])]
    print(f"checked out {commit[:12]} with run {args.run_id[:8]}'s params.yaml in {target}")
    if args.dry_run:
        print(f"to reproduce: cd {target} && {' '.join(command)}")
        return
    subprocess.run(command, cwd=target, check=True)
    same, different = compare(logged, lock_outputs(target / "dvc.lock"))
    print(f"outputs identical to the run's dvc.lock: {len(same)}" + (f" ({', '.join(same)})" if same else ""))
    if different:
        print(f"outputs that differ: {', '.join(different)}")
    if not same and not different:
        print("the run's dvc.lock has none of these outputs yet (it is logged as of the run's start)")


if __name__ == "__main__":
    main()
