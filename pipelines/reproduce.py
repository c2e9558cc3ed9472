"""Reproduce an MLflow run: `python -m pipelines.reproduce RUN_ID [--dir DIR] [--stage STAGE] [--dry-run]`.

Every stage run records its git commit (tag git_commit), the full params.yaml and dvc.lock as of its
start. This checks out that commit as a git worktree in DIR, puts the run's params.yaml there, runs
`dvc repro [STAGE]` from scratch (the worktree has its own empty DVC cache and MLflow store), and
compares each output hash in the new dvc.lock with the run's dvc.lock.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from cdiff.errors import CdiffError
from pipelines.core import tracking
from pipelines.core.config import params
from pipelines.core.console import stage
from pipelines.core.layout import paths

COMMIT = re.compile(r"[0-9a-f]{40}")


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
    target = (args.dir or paths.root.parent / f"reproduce-{args.run_id[:8]}").resolve()
    if target.exists():
        raise CdiffError(f"{target} exists: choose another --dir")
    with tempfile.TemporaryDirectory() as tmp:
        commit, files = tracking.run_origin(params(), args.run_id, Path(tmp))
        if commit == "unknown":
            raise CdiffError(f"run {args.run_id} has no git_commit tag: it was not made inside a git checkout")
        if not COMMIT.fullmatch(commit):  # never an option such as --lock or -f handed to git
            raise CdiffError(f"run {args.run_id}'s git_commit tag {commit[:60]!r} is not a full 40-hex commit id")
        if paths.params_file.name not in files:
            raise CdiffError(f"run {args.run_id} has no params.yaml artifact")
        git = subprocess.run(
            ["git", "worktree", "add", "--detach", "--", str(target), commit],
            cwd=paths.root,
            capture_output=True,
            text=True,
        )
        if git.returncode != 0:
            raise CdiffError(f"git worktree add failed: {(git.stderr.strip().splitlines() or ['no message'])[-1]}")
        shutil.copyfile(files[paths.params_file.name], target / paths.params_file.name)
        logged = lock_outputs(files[paths.lock_file.name]) if paths.lock_file.name in files else {}
    command = ["dvc", "repro", *([args.stage] if args.stage else [])]
    print(f"checked out {commit[:12]} with run {args.run_id[:8]}'s params.yaml in {target}")
    if args.dry_run:
        print(f"to reproduce: cd {target} && {' '.join(command)}")
        return
    subprocess.run(command, cwd=target, check=True)
    same, different = compare(logged, lock_outputs(target / paths.lock_file.name))
    print(f"outputs identical to the run's dvc.lock: {len(same)}" + (f" ({', '.join(same)})" if same else ""))
    if different:
        print(f"outputs that differ: {', '.join(different)}")
    if not same and not different:
        print("the run's dvc.lock has none of these outputs yet (it is logged as of the run's start)")


if __name__ == "__main__":
    main()
