"""Output paths, atomic writes, JSON, safetensors and fingerprints: every file cdiff writes goes through here.

One output-path policy, `check_output`, runs before every write (and, in the CLI, before any long work):
a command replaces only an artefact of the kind it writes (a folder only when asked to overwrite),
never a special file (device, FIFO, socket) or a symbolic link, never a folder with a file or a file
with a folder, and never one of its own inputs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cdiff.errors import CdiffError
from cdiff.sources import origin


@dataclass(frozen=True)
class Artefact:
    """What an output path holds: a file (of a format recognised by its first bytes) or a cdiff folder."""

    name: str  # for messages: "PNG image", "model folder"
    folder: bool = False
    magic: bytes = b""  # an existing file of this kind starts with these bytes (after whitespace)
    marker: str = ""  # a folder of this kind holds this JSON file, whose `format_key` is `format`
    format: str = ""
    weights: str = ""  # weights folders (cdiff.weights): the safetensors file beside the marker
    version: int = 1
    format_key: str = "format"  # another tool's folder says what it is under its own key (PEFT: peft_type)


FILE = Artefact("file")
JSON = Artefact("JSON file", magic=b"{")
PNG = Artefact("PNG image", magic=b"\x89PNG\r\n\x1a\n")

_SPECIAL = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFLNK: "symbolic link",
}


def display_path(path) -> str:
    """A path for messages: relative ones say what they were resolved against, downloaded ones the URI they
    came from (cdiff.sources); undecodable bytes escaped."""
    text = str(path)
    if not os.path.isabs(text):
        with contextlib.suppress(OSError):
            text = f"{text} (relative to {os.getcwd()})"
    elif uri := origin(path):
        text = f"{text} (from {uri})"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # undecodable bytes of a file name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # a newline in a name stays one line


def _absolute(path) -> Path:
    """`path` made absolute with `~` expanded; its folder resolved (links too), its own name kept (not followed)."""
    try:
        path = Path(os.path.abspath(Path(path).expanduser()))
        return Path(os.path.realpath(path.parent)) / path.name if path.name else path
    except (ValueError, OSError) as e:  # an embedded NUL byte, a name too long
        raise CdiffError(f"cannot use {path!r} as a path ({e})") from e


def _holds(path: Path, artefact: Artefact) -> bool:
    """Does the existing file or non-empty folder `path` hold an artefact of this kind?"""
    if not artefact.folder:
        if not artefact.magic:
            return True
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(artefact.magic)
    marker = path / artefact.marker
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode) or os.path.getsize(marker) > 2**24:
            return False
        found = json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(found, dict) and found.get(artefact.format_key) == artefact.format


def check_output(path, artefact: Artefact = FILE, *, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """The output-path policy, in one line per refusal; returns the absolute output path.

    A file replaces only a regular file of its kind (a PNG a PNG); a folder replaces an empty folder, or
    a folder of its kind when `overwrite` is set. Special files, links, and paths equal to, inside or
    above an input are refused.
    """
    path = _absolute(path)
    shown = display_path(path)
    if not path.parent.is_dir():
        raise CdiffError(f"output folder {display_path(path.parent)} does not exist: create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CdiffError(f"output folder {display_path(path.parent)} is not writable: choose another output path")
    real = Path(os.path.realpath(path))
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(_absolute(given)))
        if real == source or source in real.parents or real in source.parents:
            where = "is" if real == source else "is inside" if source in real.parents else "holds"
            raise CdiffError(f"output {shown} {where} the input {display_path(given)}: write somewhere else")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise CdiffError(f"cannot use {shown} as an output path ({e.strerror})") from e
    if stat.S_IFMT(mode) in _SPECIAL:
        raise CdiffError(f"{shown} is a {_SPECIAL[stat.S_IFMT(mode)]}: cdiff never replaces one; choose another path")
    if stat.S_ISDIR(mode) and not artefact.folder:
        raise CdiffError(f"{shown} is a folder: give a file path for the {artefact.name}")
    if stat.S_ISREG(mode) and artefact.folder:
        raise CdiffError(f"{shown} is a file, not a {artefact.name}: choose another output path")
    try:
        if artefact.folder:
            with os.scandir(path) as entries:
                if not any(entries):
                    return path  # an empty folder: nothing is lost
        holds = _holds(path, artefact)
    except OSError as e:
        raise CdiffError(f"cannot use {shown} as an output path ({e.strerror})") from e
    if not holds:
        raise CdiffError(f"{shown} exists and is not a {artefact.name}: cdiff will not replace it; choose a new path")
    if artefact.folder and not overwrite:
        raise CdiffError(
            f"{shown} is an existing {artefact.name}: pass --overwrite to replace it, or choose a new path"
        )
    return path


# ---- interrupts: SIGTERM and SIGINT unwind the stack, so `finally` blocks remove temp files -----------


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGINT or SIGTERM while `interrupts_unwind()` is active."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_critical = {"depth": 0, "pending": [], "received": None}


def _on_signal(signum, frame) -> None:
    _critical["received"] = signum
    if _critical["depth"]:
        _critical["pending"].append(signum)  # a rename is in flight: raise when it is done
    else:
        raise Interrupted(signum)


def as_interrupted(e: KeyboardInterrupt) -> Interrupted:
    """The signal behind a KeyboardInterrupt: Ray's `ray.get` turns the `Interrupted` our handler raised
    into a plain KeyboardInterrupt, so the signal is read from what the handler last received."""
    if isinstance(e, Interrupted):
        return e
    return Interrupted(_critical["received"] or signal.SIGINT)


@contextlib.contextmanager
def interrupts_unwind() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise `Interrupted`, deferred while an atomic rename is in flight."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
        if not _critical["depth"] and _critical["pending"]:
            signum = _critical["pending"].pop()
            _critical["pending"].clear()
            raise Interrupted(signum)


# ---- atomic writes -------------------------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, racing other threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: Path, suffix: str) -> Path:
    """A hidden name beside `path` that names the writing process: `.NAME.PID-TOKEN.tmp`."""
    return path.parent / f".{path.name[:200]}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files and folders beside `path` that a writer killed outright (SIGKILL, a power cut)
    left behind: those whose process is gone. `.old` copies are kept (one may be the only copy of an
    output). Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(path.name[:200])}\.(\d+)-[0-9a-f]{{8}}\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            match = pattern.fullmatch(entry.name)
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


_WRITE_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.EIO,
    errno.EFBIG,
}


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """A full disk, a read-only file system or a name too long: one line, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        raise CdiffError(f"cannot write {display_path(path)} ({e.strerror or e})") from e


@contextlib.contextmanager
def atomic_write(path, artefact: Artefact = FILE) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one `os.replace`.

    A crash, exception or interrupt leaves the old file (or nothing), never a half-written one. The
    file is created with the process's umask, as `open` would.
    """
    path = check_output(path, artefact)
    sweep_stale_temps(path)
    tmp = _temp_beside(path, ".tmp")
    try:
        with _os_errors(path):
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # as `open` would make it, whatever the writer did (safetensors: 0600)
            with _uninterrupted():
                check_output(path, artefact)  # something may have appeared there meanwhile
                backup = _keep_aside(path)
                os.replace(tmp, path)
                _written(path, backup)
    finally:
        with _uninterrupted():
            if os.path.lexists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path, artefact: Artefact, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it takes `path`'s place (see `check_output`)."""
    path = check_output(path, artefact, overwrite=overwrite)
    sweep_stale_temps(path)
    tmp, old = _temp_beside(path, ".tmp"), _temp_beside(path, ".old")
    try:
        with _os_errors(path):
            os.mkdir(tmp)  # mode 0o777 less the umask
            yield tmp
            with _uninterrupted():
                check_output(path, artefact, overwrite=overwrite)
                if os.path.lexists(path):
                    os.rename(path, old)
                os.rename(tmp, path)
                _written(path, old if os.path.lexists(old) else None)
    finally:
        with _uninterrupted():
            if os.path.lexists(old) and not os.path.lexists(path):
                os.rename(old, path)  # the swap failed half-way: put the old folder back
            kept = _journal is not None and any(backup == old for _, backup in _journal)
            for leftover in (tmp,) if kept else (tmp, old):
                if os.path.lexists(leftover):
                    shutil.rmtree(leftover)


# ---- all or nothing: a stage leaves all of its outputs, or those it found -----------------------------

_journal: list[tuple[Path, Path | None]] | None = None  # (path written, its previous version kept aside)


def _keep_aside(path: Path) -> Path | None:
    """Within `all_or_nothing`: a hard link to the file about to be replaced, to put back on failure."""
    if _journal is None or not os.path.lexists(path):
        return None
    backup = _temp_beside(path, ".old")
    try:
        os.link(path, backup)
    except OSError:  # a file system without hard links
        shutil.copy2(path, backup)
    return backup


def _written(path: Path, backup: Path | None) -> None:
    if _journal is not None:
        _journal.append((path, backup))


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@contextlib.contextmanager
def kept_whatever_happens() -> Iterator[None]:
    """Within `all_or_nothing`: writes that are not the command's outputs (a download cache) stay if it fails."""
    global _journal
    outer, _journal = _journal, None
    try:
        yield
    finally:
        _journal = outer


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Within: every file and folder the atomic writers replace is kept aside until the block ends. If the
    block raises or is interrupted, each path written within is put back as it was (or removed, if it was
    not there), so a stage stopped after its first output leaves none of them half-done. Nested: the
    outermost block decides. Only the paths this process wrote are touched."""
    global _journal
    if _journal is not None:
        yield
        return
    journal: list[tuple[Path, Path | None]] = []
    _journal = journal
    try:
        yield
        with _uninterrupted():
            _journal = None
            while journal:
                _, backup = journal.pop()
                if backup is not None:
                    _remove(backup)
    except BaseException:
        with _uninterrupted():
            _journal = None
            while journal:  # newest first: a path written twice ends as it was before the first write
                path, backup = journal.pop()
                _remove(path)
                if backup is not None:
                    os.replace(backup, path)
        raise
    finally:
        _journal = None


# ---- JSON ----------------------------------------------------------------------------------------


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def write_json(path, obj) -> None:
    """Write `obj` as JSON, atomically; a NaN or infinite number is refused, never written."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as e:
        raise CdiffError(f"refusing to write {display_path(path)}: it would hold a NaN or infinite number") from e
    with atomic_write(path, JSON) as tmp:
        tmp.write_text(text)


def read_json(path, what: str) -> dict:
    """A JSON object from `path`; NaN, Infinity and out-of-range numbers are refused as corrupt."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CdiffError(f"{what} not found: {display_path(path)}")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise CdiffError(f"cannot read {what} {display_path(path)} ({e.strerror})") from e
    return parse_json(text, f"{what} {display_path(path)}")


def parse_json(text: str | bytes, what: str) -> dict:
    """A JSON object from text, checked as `read_json` checks a file; `what` names it in messages."""
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
        raise CdiffError(f"{what} is not valid JSON ({reason}): the file is corrupt") from e
    if not isinstance(obj, dict):
        raise CdiffError(f"{what} must hold a JSON object")
    return obj


# ---- tensors -------------------------------------------------------------------------------------


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted name order: equal iff the weights are equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in blocks; an unreadable file is one line naming it."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CdiffError(f"cannot read {display_path(path)} ({e.strerror or e})") from e


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse, in one line, tensors holding NaN or inf (a diverged training, a corrupt file)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CdiffError(f"{what}: tensor {name} holds NaN or infinite values: the weights are broken")


def load_safetensors(path, what: str, *, metadata: bool = False):
    """Load tensors only: safetensors never runs code, and a pickle or junk file is refused in one line.

    With `metadata`: (tensors, the file's string metadata, {} if it has none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"{what} not found: {display_path(path)}")
    try:
        data = path.read_bytes()  # bytes, not a path: safetensors refuses paths that are not UTF-8
        tensors = load(data)
        if not metadata:
            return tensors
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # as load() just read it
        return tensors, header.get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        reason = (str(e).splitlines() or [e.__class__.__name__])[0][:200]
        raise CdiffError(f"{what} {display_path(path)} is not a valid safetensors file ({reason})") from e


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
