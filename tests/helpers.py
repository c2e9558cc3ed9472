"""A throwaway copy of the project in a temp git repo, for tests that run stages or `dvc repro`."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("dvc.lock", "metrics/", "plots/", "tune/", "runs/", "reports/")


# No command a test runs takes this long even on a slow, loaded machine (a whole tiny `dvc repro` takes
# minutes): one that does has hung, and it fails its test instead of holding the suite until CI's limit.
RUN_TIMEOUT_S = 1200


def run(args, cwd, env, check=True, timeout=RUN_TIMEOUT_S):
    """Run a command in a session of its own; its stdout (check) or the CompletedProcess (not check).

    Past `timeout` seconds its whole process group (dvc, the stage, Ray's processes) is killed and the test
    fails with what it printed so far."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:  # a daemon of another session may still hold its pipes
            said = "".join(proc.communicate(timeout=30))[-6000:]
        except subprocess.TimeoutExpired:
            said = "(its output: still held open by a process outside its group)"
        raise AssertionError(f"{' '.join(map(str, args))}: no exit after {timeout} s\n{said}") from None
    except BaseException:  # a test's own timeout, or Ctrl-C: leave nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    out = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
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


def kill_processes_in(folder: Path) -> None:
    """Kill every process whose working directory lies in `folder` (daemons a command left running there,
    such as DVC's queue workers and their experiments); not this one."""
    import psutil

    inside = str(Path(folder).resolve())
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cwd = proc.cwd()
            if proc.pid != os.getpid() and (cwd == inside or cwd.startswith(inside + os.sep)):
                proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registered_checkpoint(run: Path) -> bool:
    """A checkpoint Ray's controller has recorded for a run folder (a checkpoint folder alone may still be
    being written)."""
    try:
        return bool(json.loads((run / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def mlflow_server(root: Path, *artifacts: str):
    """`mlflow server` on loopback with its store in root/server.db; `artifacts`: its artefact flags
    (--default-artifact-root DIR, or --artifacts-destination DIR). Yields the tracking URI."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{root}/server.db", *artifacts],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
