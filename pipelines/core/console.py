"""The console of a stage: one-line errors, one summary line, clean stops, and Ray's known noise dropped.

A default run used to print Ray Train's PlacementGroupCleaner warning every second of every Train
stage (its detached actor polls the State API, which the dashboard serves, and a local session
starts no dashboard), Train's "Reporting training result" on every checkpoint (a worker logger named
by its file path, which Train's own log level does not reach), a core-worker error line about the
PreemptionWatcher actor's arguments, and a notice that token authentication is on. Ray forwards
every worker line through one dispatcher in the driver; distributed.session drops the lines that
`is_noise` names there (they stay in Ray's log files), and every other warning and error still shows.

Stops: SIGTERM and SIGINT raise `cdiff.io.Interrupted` in a stage, so its `with` blocks unwind (the Ray
run is aborted, the MLflow run marked KILLED, temp files removed) and it exits 128+N with one line.
A stage that fails or is stopped after writing some of its outputs puts them back as they were
(`cdiff.io.all_or_nothing`): under DVC, which removed them first, none is left.
`dvc repro` does not pass SIGTERM on to its stage: killed, it leaves the stage orphaned, training on.
Under DVC a thread watches the stage's parent (through the shell DVC may run it in) and stops the stage the
same way when DVC is gone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from cdiff.errors import CdiffError
from cdiff.io import all_or_nothing, as_interrupted, interrupts_unwind

NOISE = (
    "Failed to query Ray Train Controller actor state",  # PlacementGroupCleaner, every second
    "Reporting training result",  # Ray Train worker, every checkpoint
    "Actor with class name: 'PreemptionWatcher'",  # Ray core worker, once per Train run
    "Token authentication is enabled for this Ray cluster",  # the driver, once per session
)


def is_noise(line: str) -> bool:
    return any(text in line for text in NOISE)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


def quiet_driver() -> None:
    """Drop the noise that Ray logs in this process (the token notice of ray.init)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())


def stage_name() -> str:
    """The DVC stage (finetune@digits), or the script's name when run by hand."""
    return os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem


def stage(fn):
    """Run a stage's main: user errors print one line and exit 2 (a traceback only with CDIFF_DEBUG=1);
    SIGTERM and SIGINT (and the end of the `dvc repro` that started it) stop it cleanly, exit 128+N."""

    @functools.wraps(fn)
    def main(*args):
        quiet_driver()
        try:
            with interrupts_unwind(), _stop_when_dvc_is_gone(), all_or_nothing():
                fn(*args)
        except CdiffError as e:
            if os.environ.get("CDIFF_DEBUG") == "1":
                raise
            _close_progress_bars()
            print(f"{stage_name()}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # cdiff.io.Interrupted, or what Ray made of it
            e = as_interrupted(e)
            _close_progress_bars()
            print(f"{stage_name()}: interrupted ({e}): stopped, nothing half-written left behind", file=sys.stderr)
            sys.exit(128 + e.signum)

    return main


SHELLS = frozenset({"sh", "dash", "ash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def _ppid(pid: int) -> int | None:
    """The parent of another process (Linux's /proc), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _ancestry() -> tuple[int | None, ...]:
    """This stage's parent, and the parent's parent where the parent is a shell: DVC runs a stage's command as
    `$SHELL -c CMD`, and where that shell forks instead of exec-ing its one command (dash, /bin/sh on Debian,
    DVC's shell when SHELL is unset), the stage's parent is the shell, which outlives DVC."""
    parent = os.getppid()
    try:
        shell = Path(f"/proc/{parent}/comm").read_text().strip() in SHELLS
    except OSError:
        shell = False
    return (parent, _ppid(parent)) if shell else (parent,)


@contextlib.contextmanager
def _stop_when_dvc_is_gone(poll_s: float = 0.2):
    """Under DVC: SIGTERM to this stage as soon as `dvc repro` is gone (this process, or the shell DVC ran it
    through, reparented), as DVC killed by SIGTERM does not pass the signal on. A stage run by hand keeps
    running whatever its parent does."""
    if not os.environ.get("DVC_STAGE"):
        yield
        return
    started, done = _ancestry(), threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if _ancestry() != started:  # reparented: DVC has exited
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="stop-when-dvc-is-gone", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _close_progress_bars() -> None:
    """Clear the stage's progress bars first, so that its last line is a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar interrupted while it was being drawn
            bar.close()


def summary(made: str, metric: str, where: str) -> None:
    """The stage's one line: what it made, the number that says how good, and where it went."""
    print(f"{stage_name()}: {made}; {metric} -> {where}", flush=True)
