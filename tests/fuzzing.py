"""What every fuzz test asserts about an entry point, and the tiny workspace it mutates.

The contract: exit 0, or exit 2 with exactly one visible line on stderr; never an uncaught exception
or a traceback; never a non-finite output; nothing written outside the output path (and nothing at all
on exit 2). Hypothesis runs a bounded number of examples, derandomized, so the suite stays repeatable.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context
from PIL import Image

from cdiff import results
from cdiff.adapter_format import save_adapter
from cdiff.checkpoint import load_model, save_model
from cdiff.cli import main
from cdiff.config import DiffusionConfig
from cdiff.lora import inject_lora, unload_lora
from cdiff.model import UNet
from tests.conftest import tiny_config

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

# values a careless or hostile user might put anywhere: JSON-able, for configs and params
NASTY_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    4,
    2.5,
    -0.5,
    1e-30,
    1e308,
    -1e308,
    10**20,
    10**400,
    float("nan"),
    float("inf"),
    -float("inf"),
    "",
    " ",
    "x",
    "cat",
    "4",
    "nan",
    "caf\udce9",
    "a\nb",
    "../../x",
    "x" * 500,
    [],
    [1],
    ["a"],
    ["a", "a"],
    ["a", "b", "c", "d"],
    [None],
    [[1]],
    {},
    {"a": 1},
]


def make_workspace(root: Path) -> Path:
    """Model, adapter, a second model, user files and special files: everything a command could wreck."""
    torch.manual_seed(0)
    model = UNet(tiny_config(), ["cat", "dog", "bird"])
    save_model(model, DiffusionConfig(timesteps=20), root / "model")
    inject_lora(model, r=2, alpha=2, extra_trainable=["prompt"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    save_adapter(model, root / "adapter", class_names=["x", "y", "z"])
    unload_lora(model)
    save_model(model, DiffusionConfig(timesteps=20), root / "other")
    Image.new("L", (4, 4)).save(root / "grid.png")
    (root / "notes.txt").write_text("user data")
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text("user data")
    (root / "empty").mkdir()
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / "images" / c / f"{i}.png")
    (root / "params.yaml").write_text((Path(__file__).parent / "tiny_params.yaml").read_text())
    results.save(root / "summary.json", _run_summary())
    os.symlink("grid.png", root / "link.png")
    return root


def _run_summary() -> results.RunSummary:
    """A small reports/summary.json for `cdiff compare`."""
    score = results.Score(1.0, 0.9, 20)
    base_eval = results.BaseEvaluation(score, score, 0.9, "ddim-5", 2.0)
    base = results.BaseSummary(results.PretrainResult(0.5, 0.5, 10), base_eval, [])
    evaluation = results.DomainEvaluation(score, score, score, 0.5, 0.4, 0.9, 2, 2.0, 10, 0.01)
    return results.RunSummary("s", base, {"d": results.DomainSummary(evaluation, 1e-3, None, [])})


@contextlib.contextmanager
def copy_of(workspace: Path):
    """A fresh copy of the workspace (plus a FIFO and a socket) as cwd and HOME (so `~` stays inside)."""
    work = Path(tempfile.mkdtemp(prefix="cdiff-fuzz-"))
    shutil.copytree(workspace, work, symlinks=True, dirs_exist_ok=True)
    os.mkfifo(work / "fifo.png")  # special files do not copy: made here
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(work / "sock.png"))
    cwd, home = os.getcwd(), os.environ.get("HOME")
    os.chdir(work)
    os.environ["HOME"] = str(work)
    try:
        yield work
    finally:
        os.chdir(cwd)
        os.environ["HOME"] = home or ""
        sock.close()
        shutil.rmtree(work)


def tree(root: Path) -> dict:
    """Every path under root (links not followed) with its type and, for files, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = p.read_bytes() if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def visible_lines(err: str) -> list[str]:
    """What a terminal shows of stderr: progress bars redraw with \\r, so each line's last segment."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def output_of(argv: list[str]) -> str | None:
    value = None
    for i, token in enumerate(argv[:-1]):
        if token in ("-o", "--output"):
            value = argv[i + 1]
    return value


def assert_contract(code: int, err: str, work: Path, before: dict, output: str | None) -> None:
    """Exit 0 or 2 (one line); no traceback; on 0 only the output path changed, on 2 nothing did."""
    if currently_in_test_context():  # what the examples reached: pytest --hypothesis-show-statistics
        event(f"exit {code}: {visible_lines(err)[-1][:40] if code else 'ok'}")
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = visible_lines(err)
        assert len(lines) == 1 and lines[0].startswith("cdiff"), err
    after = tree(work)
    allowed = ()
    if code == 0 and output is not None:
        target = Path(os.path.abspath(Path(output).expanduser()))
        if target == work or work in target.parents:
            allowed = (str(target.relative_to(work)),)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    stray = {p for p in changed if not any(p == a or p.startswith(a + os.sep) for a in allowed)}
    assert not stray, (code, err, sorted(stray)[:5])
    for name in allowed:
        path = work / name
        if path.is_dir() and (path / "config.json").is_file():
            model, _, _ = load_model(path)  # a written model loads: fingerprint and finite values checked
            assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        elif path.is_file():
            with Image.open(path) as im:
                assert im.format == "PNG" and np.isfinite(np.asarray(im, dtype=np.float64)).all()
