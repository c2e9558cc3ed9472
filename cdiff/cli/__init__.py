"""`cdiff`: sample, inspect and merge models and adapters; train a quick local model.

`arguments` holds the argparse types, `parser` the parser and its help texts, `commands` one function per command.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from cdiff.cli.commands import COMMANDS
from cdiff.cli.parser import build_parser
from cdiff.errors import CdiffError


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code: 0, 2 for a bad input (one line on stderr), 128+N on signal N."""
    from cdiff.io import Interrupted, all_or_nothing, interrupts_unwind

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    debug = args.debug or os.environ.get("CDIFF_DEBUG") == "1"
    in_main_thread = threading.current_thread() is threading.main_thread()
    try:
        # SIGTERM, like Ctrl-C, unwinds the stack: `finally` blocks remove temp files before the exit, and a
        # command that fails after writing one of its outputs puts it back as it was
        with interrupts_unwind() if in_main_thread else contextlib.nullcontext(), all_or_nothing():
            COMMANDS[args.command](args)
    except CdiffError as e:
        if debug:
            raise
        _last_line(f"cdiff: error: {' '.join(str(e).splitlines())}")
        return 2
    except Interrupted as e:
        _last_line(f"cdiff: interrupted ({e}): nothing half-written was left behind", mid_work=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        _last_line("cdiff: interrupted", mid_work=True)
        return 130
    return 0


def _last_line(message: str, mid_work: bool = False) -> None:
    """A command stopped: close its progress bars, then print its message as a line of its own.

    A bar that a signal cut mid-draw may have left the cursor after its text: then (`mid_work`, or a bar still
    open) the message starts with a carriage return (and, on a terminal, clears that line), so that what the
    user sees is the message alone.
    """
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        with contextlib.suppress(Exception):  # a bar interrupted while it was being drawn: never a traceback
            bar.close()
    clear = ("\r\033[K" if sys.stderr.isatty() else "\r") if bars or mid_work else ""
    print(clear + message, file=sys.stderr)
