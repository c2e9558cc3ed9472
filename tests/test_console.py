"""The stage console: Ray's known noise is dropped where the driver prints worker output; the rest shows; a stage
whose `dvc repro` is gone stops."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.core import console
from tests.helpers import ROOT

NOISE = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 10}) from rank 0",
    "[2026-11-27 12:52:28,331 E 4849 4878] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'79c4' has constructor arguments in the object store and max_restarts > 0.",
]


def test_forwarded_noise_is_dropped_and_everything_else_printed():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from pipelines.core.distributed import _drop_forwarded_noise

    printed = []
    saved = list(dispatcher.handlers)
    try:
        dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
        _drop_forwarded_noise()
        real = "RuntimeError: CUDA out of memory"
        dispatcher.emit({"lines": [*NOISE, real], "pid": 1, "is_err": True})
        dispatcher.emit({"lines": NOISE[:1], "pid": 1, "is_err": True})  # nothing left: nothing printed
    finally:
        dispatcher.handlers = saved
    assert printed == [[real]]


def test_the_token_notice_is_dropped_on_the_driver(caplog):
    console.quiet_driver()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("Token authentication failed: the token is invalid")
    assert [r.getMessage() for r in caplog.records] == ["Token authentication failed: the token is invalid"]


def test_summary_is_one_line_naming_the_stage(capsys, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "finetune@digits")
    console.summary("adapter r=4", "val loss 0.1234", "adapters/digits")
    assert capsys.readouterr().out == "finetune@digits: adapter r=4; val loss 0.1234 -> adapters/digits\n"


STAGE = """
import os, time, pathlib
from pipelines.core.console import stage

@stage
def main():
    pathlib.Path(os.environ["READY"]).write_text(str(os.getpid()))
    time.sleep(60)

main()
"""

DVC = """
import os, subprocess, sys, time
subprocess.Popen([sys.argv[1], "-c", sys.argv[2]], env={**os.environ, "DVC_STAGE": "train@x"})
while not os.path.exists(os.environ["READY"]):
    time.sleep(0.05)
os._exit(0)  # gone, as `dvc repro` killed by SIGTERM is, without passing the signal on
"""


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])  # dash forks for `sh -c CMD`; bash execs CMD
def test_a_stage_stops_when_the_dvc_that_ran_it_is_gone(tmp_path, shell):
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    ready, said = tmp_path / "ready", tmp_path / "said"
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    env = {**os.environ, "READY": str(ready), "PYTHONPATH": str(ROOT)}
    with open(said, "w") as out:
        subprocess.run(
            [sys.executable, "-c", DVC, shell, f"{sys.executable} {script}"],
            env=env,
            stdout=out,
            stderr=out,
            timeout=60,
            check=True,
        )
    pid, deadline = int(ready.read_text()), time.time() + 20
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:  # the stage: an orphan, nobody reaps it here
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    assert "train@x: interrupted (SIGTERM): stopped, nothing half-written left behind" in said.read_text(), (
        said.read_text()
    )
