"""The one exception type users see, and how a value is shown in its one-line messages."""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


class CdiffError(Exception):
    """A problem with the user's input (params, paths, files, arguments), with its fix in the message."""


def shown(value) -> str:
    """repr(value), bounded: a huge or deeply nested value (a YAML alias bomb) never makes a huge message."""
    return _REPR.repr(value)
