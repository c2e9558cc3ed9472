"""The console of a stage: one-line errors, one summary line, and Ray's known noise dropped.

A default run used to print Ray Train's PlacementGroupCleaner warning every second of every Train
stage (its detached actor polls the State API, which the dashboard serves, and a local session
starts no dashboard), Train's "Reporting training result" on every checkpoint (a worker logger named
by its file path, which Train's own log level does not reach), a core-worker error line about the
PreemptionWatcher actor's arguments, and a notice that token authentication is on. Ray forwards
every worker line through one dispatcher in the driver; distributed.session drops the lines that
`is_noise` names there (they stay in Ray's log files), and every other warning and error still shows.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

from cdiff.errors import CdiffError

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
    """Run a stage's main: user errors print one line and exit 2 (a traceback only with CDIFF_DEBUG=1)."""

    @functools.wraps(fn)
    def main(*args):
        quiet_driver()
        try:
            fn(*args)
        except CdiffError as e:
            if os.environ.get("CDIFF_DEBUG") == "1":
                raise
            print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
            sys.exit(2)

    return main


def summary(made: str, metric: str, where: str) -> None:
    """The stage's one line: what it made, the number that says how good, and where it went."""
    print(f"{stage_name()}: {made}; {metric} -> {where}", flush=True)
