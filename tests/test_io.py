"""The output-path policy, atomic writes, umask, interrupts and strict JSON (cdiff/io.py)."""

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdiff.errors import CdiffError
from cdiff.io import (
    JSON,
    PNG,
    Artefact,
    Interrupted,
    _on_signal,
    _uninterrupted,
    all_or_nothing,
    atomic_dir,
    atomic_write,
    check_output,
    kept_whatever_happens,
    read_json,
    write_json,
)

THING = Artefact("thing folder", folder=True, marker="thing.json", format="cdiff-thing")
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"rest"


def _tree(root: Path) -> dict:
    """Every path under root (links not followed) with its kind and content: what a write must not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), p.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
    return out


def _thing(folder: Path) -> Path:
    folder.mkdir()
    (folder / "thing.json").write_text(json.dumps({"format": "cdiff-thing"}))
    return folder


@pytest.fixture
def work(tmp_path):
    (tmp_path / "file.txt").write_text("user data")
    (tmp_path / "grid.png").write_bytes(PNG_BYTES)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("user data")
    (tmp_path / "empty").mkdir()
    _thing(tmp_path / "thing")
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink(tmp_path / "grid.png", tmp_path / "link.png")
    os.symlink(tmp_path / "thing", tmp_path / "link-thing")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.png"))
    yield tmp_path
    sock.close()


@pytest.mark.parametrize(
    "name,artefact,kwargs,message",
    [
        ("fifo.png", PNG, {}, "is a FIFO"),
        ("sock.png", PNG, {}, "is a socket"),
        ("link.png", PNG, {}, "is a symbolic link"),
        ("link-thing", THING, {"overwrite": True}, "is a symbolic link"),
        ("folder", PNG, {}, "is a folder"),
        ("empty", PNG, {}, "is a folder"),
        ("file.txt", THING, {"overwrite": True}, "is a file"),
        ("file.txt", PNG, {}, "is not a PNG image"),
        ("grid.png", JSON, {}, "is not a JSON file"),
        ("folder", THING, {"overwrite": True}, "is not a thing folder"),
        (".", THING, {"overwrite": True}, "is not a thing folder"),
        ("thing", THING, {}, "pass --overwrite"),
        ("missing/x.png", PNG, {}, "does not exist"),
    ],
)
def test_output_policy_refuses_in_one_line_and_changes_nothing(work, name, artefact, kwargs, message):
    before = _tree(work)
    with pytest.raises(CdiffError, match=message) as err:
        with atomic_dir(work / name, artefact, **kwargs) if artefact.folder else atomic_write(work / name, artefact):
            raise AssertionError("the body must not run")
    assert "\n" not in str(err.value)
    assert _tree(work) == before


def test_char_device_is_never_replaced_even_by_root(tmp_path):
    """As root (the tests run as root here), /dev/null could be replaced: the policy refuses it anyway."""
    with pytest.raises(CdiffError, match="character device"):
        check_output("/dev/null", PNG)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize(
    "output,where",
    [("models/base", "is the input"), ("models/base/x", "is inside the input"), ("models", "holds the input")],
)
def test_an_output_never_overlaps_an_input(tmp_path, output, where):
    (tmp_path / "models" / "base").mkdir(parents=True)
    with pytest.raises(CdiffError, match=where):
        check_output(tmp_path / output, THING, overwrite=True, inputs=[tmp_path / "models" / "base"])
    os.symlink(tmp_path / "models", tmp_path / "alias")  # the same folder under another name
    with pytest.raises(CdiffError, match=where):
        check_output(tmp_path / output, THING, overwrite=True, inputs=[tmp_path / "alias" / "base"])


def test_same_kind_is_replaced_and_an_empty_folder_is_taken(work):
    with atomic_write(work / "grid.png", PNG) as tmp:
        tmp.write_bytes(PNG_BYTES + b"new")
    assert (work / "grid.png").read_bytes().endswith(b"new")
    with atomic_dir(work / "thing", THING, overwrite=True) as tmp:
        (tmp / "thing.json").write_text(json.dumps({"format": "cdiff-thing", "new": 1}))
    assert json.loads((work / "thing" / "thing.json").read_text())["new"] == 1
    with atomic_dir(work / "empty", THING) as tmp:
        (tmp / "thing.json").write_text("{}")
    assert (work / "empty" / "thing.json").is_file()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temp or old folder left


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temp(work):
    before = _tree(work)
    for context in (atomic_write(work / "grid.png", PNG), atomic_dir(work / "thing", THING, overwrite=True)):
        with pytest.raises(RuntimeError), context as tmp:
            (tmp / "x" if tmp.is_dir() else tmp).write_bytes(b"half")
            raise RuntimeError("crash in the middle")
    assert _tree(work) == before


def test_outputs_respect_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file  # writes its files 0600 on its own

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "t", THING) as tmp:
            with atomic_write(tmp / "w.safetensors") as f:
                save_file({"x": torch.zeros(2)}, str(f))
            write_json(tmp / "thing.json", {"format": "cdiff-thing"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "t" / "w.safetensors").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "t" / "thing.json").st_mode) == 0o640


_WRITER = """
import sys, time
from pathlib import Path
from cdiff.io import Artefact, atomic_dir, atomic_write, interrupts_unwind
out = Path(sys.argv[1])
thing = Artefact("thing folder", folder=True, marker="thing.json", format="cdiff-thing")
with interrupts_unwind():
    with atomic_dir(out / "thing", thing, overwrite=True) as tmp, atomic_write(out / "f.txt") as f:
        (tmp / "thing.json").write_text("{}")
        f.write_text("half")
        print("ready", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_remove_temp_files(work, signum):
    before = _tree(work)
    proc = _ready(_WRITER, work)
    assert any(p.name.endswith(".tmp") for p in work.iterdir())  # the temp files exist while it works
    _stop(proc, signum)
    assert _tree(work) == before  # old content intact, no temp left


def _ready(script: str, work: Path) -> subprocess.Popen:
    """Run `script` on `work` in a fresh interpreter, until it prints "ready"."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen, signum: int) -> None:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "Interrupted" in err


def test_a_signal_during_a_rename_waits_for_it():
    with pytest.raises(Interrupted) as err:
        with _uninterrupted():
            _on_signal(signal.SIGTERM, None)  # deferred: the rename in flight completes first
            done = True
    assert done and err.value.signum == signal.SIGTERM


def test_json_never_holds_nan_or_infinity(tmp_path):
    with pytest.raises(CdiffError, match="NaN or infinite"):
        write_json(tmp_path / "m.json", {"fid": float("nan")})
    assert not list(tmp_path.iterdir())
    for text in ('{"a": NaN}', '{"a": Infinity}', '{"a": -1e999}', "[" * 100_000, '{"a": 1'):
        (tmp_path / "m.json").write_text(text)
        start = time.perf_counter()
        with pytest.raises(CdiffError, match="not valid JSON") as err:
            read_json(tmp_path / "m.json", "metrics")
        assert "\n" not in str(err.value) and len(str(err.value)) < 400 and time.perf_counter() - start < 5


def test_relative_paths_say_what_they_were_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CdiffError, match=f"relative to {tmp_path}"):
        read_json("missing.json", "metrics")


def test_an_unreadable_existing_output_is_refused_for_an_unprivileged_user():
    """Root reads everything: run as uid 65534 (nobody) to meet a PNG it may not read (or replace)."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to switch to an unprivileged user")
    work = Path(tempfile.mkdtemp(prefix="cdiff-unreadable-"))
    try:
        os.chmod(work, 0o777)
        (work / "g.png").write_bytes(PNG_BYTES)
        os.chmod(work / "g.png", 0o600)
        script = "from cdiff.io import PNG, check_output; import sys; check_output(sys.argv[1], PNG)"
        out = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                script,
                str(work / "g.png"),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert out.returncode == 1 and "CdiffError: cannot use" in out.stderr and "Permission denied" in out.stderr
        assert (work / "g.png").read_bytes() == PNG_BYTES
    finally:
        shutil.rmtree(work)


# ---- all or nothing: a failed or stopped block puts back every path it wrote -----------------------------

_WRITES = st.lists(
    st.tuples(st.sampled_from(["a.json", "b.json", "thing", "other"]), st.binary(max_size=8)), max_size=6
)


def _write(root: Path, name: str, content: bytes) -> None:
    if name in ("thing", "other"):
        with atomic_dir(root / name, THING, overwrite=True) as tmp:
            (tmp / "thing.json").write_text(json.dumps({"format": "cdiff-thing"}))
            (tmp / "data").write_bytes(content)
    else:
        write_json(root / name, {"content": content.hex()})


@settings(max_examples=60, deadline=None)
@given(before=_WRITES, during=_WRITES, fail=st.booleans())
def test_all_or_nothing_leaves_every_output_or_the_ones_it_found(tmp_path_factory, before, during, fail):
    root = tmp_path_factory.mktemp("aon")
    (root / "user.txt").write_text("user data")
    for name, content in before:
        _write(root, name, content)
    found = _tree(root)
    with contextlib.suppress(RuntimeError):
        with all_or_nothing():
            for name, content in during:
                _write(root, name, content)
            if fail:
                raise RuntimeError("a stage failed after writing")
    if fail:
        assert _tree(root) == found  # every path as it was: restored, or removed if it was new
    else:
        expected = tmp_path_factory.mktemp("plain")
        (expected / "user.txt").write_text("user data")
        for name, content in before + during:
            _write(expected, name, content)
        assert _tree(root) == _tree(expected)  # the writes took effect, no copy kept aside is left


_STAGE = """
import sys, time
from pathlib import Path
from cdiff.io import Artefact, all_or_nothing, atomic_dir, interrupts_unwind, write_json
out = Path(sys.argv[1])
thing = Artefact("thing folder", folder=True, marker="thing.json", format="cdiff-thing")
with interrupts_unwind(), all_or_nothing():
    with atomic_dir(out / "thing", thing, overwrite=True) as tmp:
        (tmp / "thing.json").write_text('{"format": "cdiff-thing", "new": 1}')
    write_json(out / "new.json", {"done": 1})
    print("ready", flush=True)
    time.sleep(60)
"""


def test_a_stopped_block_puts_back_what_it_replaced(work):
    before = _tree(work)
    proc = _ready(_STAGE, work)
    assert (work / "new.json").exists() and "new" in (work / "thing" / "thing.json").read_text()
    _stop(proc, signal.SIGTERM)
    assert _tree(work) == before  # the old thing folder back, the new file gone, nothing kept aside left


def test_a_cache_written_within_all_or_nothing_stays_when_it_fails(tmp_path):
    with pytest.raises(RuntimeError), all_or_nothing():
        write_json(tmp_path / "output.json", {"x": 1})
        with kept_whatever_happens():
            write_json(tmp_path / "cache.json", {"x": 2})
        write_json(tmp_path / "later.json", {"x": 3})  # the journal is back after the cache
        raise RuntimeError("failed after the download")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_a_writer_killed_outright_leaves_a_temp_the_next_write_removes(tmp_path):
    # SIGKILL runs no cleanup: the temp file stays (hidden, beside the output, named by the dead writer's pid);
    # the next write of that output removes it. A live writer's temp and any .old copy are left alone.
    out = tmp_path / "grid.png"
    code = (
        "import sys, time\nfrom cdiff.io import atomic_write\n"
        f"with atomic_write({str(out)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half')\n    print('writing', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    (stale,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert stale.name.startswith(".grid.png.") and f".{proc.pid}-" in stale.name and not out.exists()
    live = tmp_path / f".grid.png.{os.getpid()}-0123abcd.tmp"  # this process: alive
    live.write_bytes(b"mine")
    old = tmp_path / f".grid.png.{proc.pid}-0123abcd.old"
    old.write_bytes(b"a kept copy")
    with atomic_write(out) as tmp:
        tmp.write_bytes(b"\x89PNG whole")
    assert out.read_bytes() == b"\x89PNG whole" and not stale.exists()
    assert live.exists() and old.exists()
