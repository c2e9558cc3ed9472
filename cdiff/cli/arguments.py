"""The argparse types of cdiff's options: each turns one word of the command line into a value, or refuses it in
one line that argparse prints after the option's name."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from cdiff.sources import is_uri


def bounded(kind: type, least: float, most: float):
    """An argparse type: an int or a float, finite and in [least, most], else one line naming the bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is not int and not math.isfinite(value):  # an int is finite, and may be too large for a float
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {text}")
        return value

    return parse


def path(text: str) -> Path:
    if "\x00" in text or not text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user of no such user
        raise argparse.ArgumentTypeError(f"{text.split('/')[0]!r} names no home folder on this machine") from None


def source(text: str) -> str | Path:
    """A model or adapter: a URI (models:/..., kept as text for its resolver) or a folder path."""
    return text if is_uri(text) else path(text)


def named_source(text: str) -> tuple[str, str | Path]:
    """NAME=ADAPTER: the name requests use, and the adapter's folder or URI."""
    name, sep, adapter = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or not adapter:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ADAPTER (a name of letters, digits, '.', '-', '_')")
    return name, source(adapter)


_WEIGHT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def weighted_source(text: str) -> tuple[str | Path, float]:
    """An adapter with its mix weight: DIR:WEIGHT (any finite number) or DIR alone (weight 1). Only a number
    after the last ':' is a weight, so `models:/name@alias` or `a:b` stay whole; for a folder named `x:2`,
    write `x:2:1`."""
    head, colon, tail = text.rpartition(":")
    if not colon or not head or not _WEIGHT.fullmatch(tail):
        return source(text), 1.0
    weight = float(tail)
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"the weight of {head!r} must be a finite number, got {tail}")
    return source(head), weight


positive_int = bounded(int, 1, 10**9)
seed = bounded(int, 0, 2**32 - 1)
