"""The registry as a source of models: models:/ and runs:/ URIs wherever a folder goes, and a served model.

One tiny registry per module (tests/registry.py: two bases, four adapters, logged as the stages log them).
"""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cdiff.adapter_format import load_adapter
from cdiff.checkpoint import load_model
from cdiff.cli import main
from cdiff.grid import grid_image, panel_label_width, to_uint8
from cdiff.lora import merge_lora
from cdiff.samplers import sample
from tests.fuzzing import visible_lines
from tests.helpers import free_port
from tests.registry import SAMPLER, make_registry

pytestmark = pytest.mark.slow  # the registry takes tens of seconds to log

BASE = "models:/cdiff-base@adapters"
DIGITS = "models:/cdiff-adapter-digits@champion"  # version 2 (the lower FID)
STEPS = ["--sampler", SAMPLER.kind, "--steps", str(SAMPLER.steps), "--guidance", str(SAMPLER.guidance_scale)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def store(registry, monkeypatch, tmp_path):
    """The test registry as the tracking store, and a fresh download cache per test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.setenv("CDIFF_CACHE", str(tmp_path / "cache"))
    return registry


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _bytes(folder, name="adapter.safetensors") -> bytes:
    return (folder / name).read_bytes()


def _error_line(capsys) -> str:
    err = visible_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("cdiff: error: "), err
    return err[0]


def test_uris_resolve_to_the_registered_folders(store):
    from mlflow.tracking import MlflowClient

    from cdiff.sources import resolve

    def same(folder, local):
        return _bytes(folder) == _bytes(local)

    assert same(resolve(DIGITS, "adapter"), store.folders["digits-v2"])
    assert same(resolve("models:/cdiff-adapter-digits/1", "adapter"), store.folders["digits-v1"])
    assert same(resolve("models:/cdiff-adapter-digits/latest", "adapter"), store.folders["digits-v2"])
    base = resolve(BASE, "model")
    assert _bytes(base, "model.safetensors") == _bytes(store.folders["base"], "model.safetensors")
    base2 = resolve("models:/cdiff-base/2")
    assert _bytes(base2, "model.safetensors") == _bytes(store.folders["base2"], "model.safetensors")
    assert _bytes(base2, "model.safetensors") != _bytes(base, "model.safetensors")
    run_id = MlflowClient(store.uri).get_model_version("cdiff-adapter-digits", "1").run_id
    assert same(resolve(f"runs:/{run_id}/adapter"), store.folders["digits-v1"])  # a plain folder on a run
    assert same(resolve(f"runs:/{run_id}/pyfunc", "adapter"), store.folders["digits-v1"])  # the logged model


def test_sample_from_uris_gives_the_pixels_of_the_local_folders(store, tmp_path, capsys):
    folders = [str(store.folders["base"]), "--adapter", str(store.folders["digits-v2"])]
    args = ["--n", "2", "--seed", "5", *STEPS]
    assert main(["sample", BASE, "--adapter", DIGITS, *args, "-o", str(tmp_path / "uri.png")]) == 0
    assert main(["sample", *folders, *args, "-o", str(tmp_path / "local.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "uri.png"), _pixels(tmp_path / "local.png"))
    # and a different adapter version gives different pixels: the comparison can fail
    v1 = "models:/cdiff-adapter-digits/1"
    assert main(["sample", BASE, "--adapter", v1, *args, "-o", str(tmp_path / "v1.png")]) == 0
    assert not np.array_equal(_pixels(tmp_path / "v1.png"), _pixels(tmp_path / "local.png"))


def test_info_and_merge_take_uris(store, tmp_path, capsys):
    assert main(["info", DIGITS]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["source"] == DIGITS and info["r"] == 2
    assert main(["info", BASE]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model"
    assert main(["merge", BASE, DIGITS, "-o", str(tmp_path / "uri")]) == 0
    local = [str(store.folders["base"]), str(store.folders["digits-v2"])]
    assert main(["merge", *local, "-o", str(tmp_path / "local")]) == 0
    assert _bytes(tmp_path / "uri", "model.safetensors") == _bytes(tmp_path / "local", "model.safetensors")


def test_python_api_loads_uris(store):
    model, _, config = load_model(BASE)
    load_adapter(model, "models:/cdiff-adapter-letters@champion")  # an adapter with its own class names
    assert model.class_names == ["a", "b", "c"] and config.model.image_size == 12


def test_an_adapter_of_another_base_is_refused_as_for_folders(store, tmp_path, capsys):
    foreign = "models:/cdiff-adapter-foreign@champion"
    assert main(["sample", BASE, "--adapter", foreign, "-o", str(tmp_path / "x.png")]) == 2
    from_uri = _error_line(capsys)
    local = [str(store.folders["base"]), "--adapter", str(store.folders["foreign-v1"])]
    assert main(["sample", *local, "-o", str(tmp_path / "y.png")]) == 2
    from_folder = _error_line(capsys)
    assert "fingerprint" in from_uri and "(from models:/cdiff-adapter-foreign@champion)" in from_uri
    reason = from_folder.rsplit(":", 1)[-1]  # the same refusal; only the paths differ
    assert from_uri.endswith(reason), (from_uri, from_folder)
    assert not (tmp_path / "x.png").exists()


def test_an_adapter_uri_alone_samples_with_its_base_and_is_not_a_base(store, tmp_path, capsys):
    args = ["--n", "2", "--seed", "3", *STEPS]
    assert main(["sample", DIGITS, *args, "-o", str(tmp_path / "alone.png")]) == 0
    assert main(["sample", BASE, "--adapter", DIGITS, *args, "-o", str(tmp_path / "pair.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "alone.png"), _pixels(tmp_path / "pair.png"))
    foreign = "models:/cdiff-adapter-foreign@champion"  # trained on base v2, which comes with it
    assert main(["sample", foreign, *args, "-o", str(tmp_path / "foreign.png")]) == 0
    v2 = ["models:/cdiff-base/2", "--adapter", foreign]
    assert main(["sample", *v2, *args, "-o", str(tmp_path / "foreign-pair.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "foreign.png"), _pixels(tmp_path / "foreign-pair.png"))
    capsys.readouterr()
    # given as a base beside another adapter, or merged into, it is refused
    assert main(["sample", DIGITS, "--adapter", DIGITS, "-o", str(tmp_path / "x.png")]) == 2
    assert "is an adapter (with its base)" in _error_line(capsys)
    assert main(["merge", DIGITS, DIGITS, "-o", str(tmp_path / "m")]) == 2
    assert "is an adapter (with its base)" in _error_line(capsys)
    from mlflow.tracking import MlflowClient

    run_id = MlflowClient(store.uri).get_model_version("cdiff-adapter-digits", "1").run_id
    assert main(["sample", f"runs:/{run_id}/adapter", "-o", str(tmp_path / "x.png")]) == 2  # a folder alone
    assert "no base model bundled" in _error_line(capsys)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "uri,env,message",
    [
        ("models:/cdiff-adapter-digits@nope", {}, "alias nope not found"),
        ("models:/cdiff-adapter-nope/1", {}, "cdiff-adapter-nope"),
        ("runs:/0123456789abcdef/adapter", {}, "Run with id=0123456789abcdef not found"),
        ("models:/cdiff-base/x/y", {}, "use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"),
        ("s3://bucket/adapter", {}, "unknown URI scheme 's3'"),
        (DIGITS, {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/mlflow.db"}, "no MLflow store at"),
        (DIGITS, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "is unreachable"),
    ],
)
def test_bad_uris_are_one_line_and_exit_2(store, tmp_path, capsys, monkeypatch, uri, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["sample", BASE, "--adapter", uri, "-o", str(tmp_path / "x.png")]) == 2
    assert message in _error_line(capsys)
    assert main(["info", uri]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "nonexistent").exists()


def test_bad_uri_in_a_fresh_process_has_no_traceback(store):
    out = subprocess.run(
        [sys.executable, "-m", "cdiff", "info", "models:/cdiff-adapter-digits@nope"],
        env=store.env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"cdiff: error: models:/cdiff-adapter-digits@nope: Registered model alias nope not found. "
        f"(MLflow store {store.uri})"
    ]


def test_a_moved_alias_is_never_served_from_the_cache(store):
    """The cache is keyed by version and model id: the alias's new version is downloaded, not the old one."""
    from mlflow.tracking import MlflowClient

    from cdiff.sources import resolve

    def adapter_fp(uri):
        return _bytes(resolve(uri, "adapter"))

    client = MlflowClient(store.uri)
    before = adapter_fp(DIGITS)
    client.set_registered_model_alias("cdiff-adapter-digits", "champion", "1")
    try:
        after = adapter_fp(DIGITS)
    finally:
        client.set_registered_model_alias("cdiff-adapter-digits", "champion", "2")
    assert before == _bytes(store.folders["digits-v2"]) and after == _bytes(store.folders["digits-v1"])
    assert adapter_fp(DIGITS) == before  # back again, from the cache


def test_the_cache_key_names_the_version_and_its_model_id():
    """A new store that reuses a name and number (a fresh mlflow.db) gets a key of its own."""
    from types import SimpleNamespace

    from pipelines.core.tracking import _pin

    def client(model_id):
        mv = SimpleNamespace(version="3", model_id=model_id, run_id="r")
        return SimpleNamespace(get_model_version_by_alias=lambda name, alias: mv)

    (source, a), (_, b) = _pin(client("m-1"), DIGITS), _pin(client("m-2"), DIGITS)
    assert source == "models:/cdiff-adapter-digits/3" and a != b and "v3" in a


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_with_the_pixels_of_cdiff_sample(store, tmp_path):
    port = free_port()
    env = {**store.env, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # uvicorn
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", DIGITS, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # uvicorn is its child: the group is stopped as one
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        rows = {"columns": ["class", "n", "seed"], "data": [["one", 3, 7], ["2", 2, 8]]}
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": rows})
        assert status == 200, answer
        for data, message in (
            ([["nine", 1, 0]], "row 0: unknown class 'nine'"),
            ([["one", 1, 0], ["2", 0, 0]], "row 1: n must be in [1, 256], got 0"),
            ([["one", 257, 0]], "row 0: n must be in [1, 256], got 257"),
            ([["one", 1, 0], ["one", 1, 5], ["2", 1, -1]], "row 2: seed must be in [0, 2**32 - 1], got -1"),
            ([["one", 1, 2**32]], "row 0: seed must be in [0, 2**32 - 1], got 4294967296"),
        ):
            bad = {"columns": ["class", "n", "seed"], "data": data}
            status, error = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": bad})
            assert status == 400 and message in error["message"], (data, error)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

    one, two = answer["predictions"]
    assert (one["class"], one["class_id"], two["class"], two["class_id"]) == ("one", 1, "two", 2)
    served = [[np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in row["images"]] for row in (one, two)]

    # the Python API with the same sampler and seed
    model, schedule, _ = load_model(store.folders["base"])
    load_adapter(model, store.folders["digits-v2"])
    merge_lora(model)
    for (class_id, n, seed), images in zip([(1, 3, 7), (2, 2, 8)], served, strict=True):
        expected = to_uint8(sample(model, schedule, [class_id] * n, SAMPLER, seed=seed, progress=False))
        assert np.array_equal(np.stack(images), expected[..., 0].numpy())

    # `cdiff sample` with the same class, count and seed draws the same grid as the served images
    out = tmp_path / "one.png"
    args = ["--class", "one", "--n", "3", "--seed", "7", *STEPS]
    assert main(["sample", BASE, "--adapter", DIGITS, *args, "-o", str(out)]) == 0
    images = np.stack(served[0])[:, None].astype(np.float32) / 255 * 2 - 1  # (N, 1, H, W) in [-1, 1]
    drawn = grid_image(torch.from_numpy(images), ["one"], 3, title=f"{SAMPLER}, seed 7")
    assert np.array_equal(_pixels(out), np.asarray(drawn.convert("RGB")))


def test_compare_lists_every_registered_version_with_its_aliases(store, tmp_path):
    import shutil

    from pipelines.core import registry
    from pipelines.core.config import load_params
    from tests.helpers import ROOT

    shutil.copy(ROOT / "tests" / "tiny_params.yaml", tmp_path / "params.yaml")  # mlflow: cdiff-base, cdiff-adapter-
    rows = registry.versions(load_params(tmp_path / "params.yaml"))
    assert [(r.model, r.version, r.aliases) for r in rows] == [
        ("cdiff-adapter-digits", 1, []),
        ("cdiff-adapter-digits", 2, ["champion"]),
        ("cdiff-adapter-foreign", 1, ["champion"]),
        ("cdiff-adapter-letters", 1, ["champion"]),
        ("cdiff-base", 1, ["adapters"]),
        ("cdiff-base", 2, []),
    ]
    assert [r.tags.fid for r in rows[:2]] == [5.0, 3.0] and rows[0].tags.r == 2 and rows[0].tags.alpha == 2.0
    only = registry.versions(load_params(tmp_path / "params.yaml"), "digits")
    assert [r.model for r in only] == ["cdiff-adapter-digits"] * 2 + ["cdiff-base"] * 2
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.compare"], cwd=tmp_path, env=store.env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    listed = out.stdout.split("registered versions", 1)[1]
    assert all(f"{r.model} " in listed for r in rows) and listed.count("champion") == 3, listed


def test_pyproject_registers_the_resolvers_by_entry_point_alone():
    """`pip install -e .` registers models:/ and runs:/; cdiff finds them by entry point, naming no pipelines module."""
    import ast
    import tomllib

    from cdiff import sources
    from pipelines.core.tracking import resolve_uri
    from tests.helpers import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    registered = project["entry-points"][sources.GROUP]
    assert set(registered) == {"models", "runs"} and set(sources.known_schemes()) >= set(registered)
    assert [sources.resolver_for(scheme)[0] for scheme in registered] == [resolve_uri, resolve_uri]
    for path in sorted((ROOT / "cdiff").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "pipelines" for n in names), f"{path} imports {names}"
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert "pipelines.core" not in node.value, f"{path}:{node.lineno} names {node.value!r}"


def test_the_library_imports_no_mlflow_for_folders(tmp_path, tiny_model):
    from cdiff.checkpoint import save_model
    from cdiff.config import DiffusionConfig

    save_model(tiny_model, DiffusionConfig(timesteps=20), tmp_path / "model")
    code = (
        "import sys; from cdiff.cli import main; "
        f"assert main(['info', {str(tmp_path / 'model')!r}]) == 0; "
        "assert not any(m.split('.')[0] in ('mlflow', 'ray', 'dvc', 'pipelines') for m in sys.modules), 'imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_compare_draws_the_champions_side_by_side_as_cdiff_sample_does(store, tmp_path):
    """`pipelines.compare --grid`: one panel per domain's champion, each with the base it was trained on (the
    foreign adapter's is base v2), each panel the pixels of `cdiff sample` on the local folders."""
    import shutil

    from tests.helpers import ROOT

    shutil.copy(ROOT / "tests" / "tiny_params.yaml", tmp_path / "params.yaml")
    p = yaml.safe_load((tmp_path / "params.yaml").read_text())
    s = p["sample"]
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.compare", "--grid", "champions.png", "--per-class", "2"],
        cwd=tmp_path,
        env=store.env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compare: 3 champions side by side" in out.stdout
    grid = _pixels(tmp_path / "champions.png")
    args = ["--sampler", s["sampler"], "--steps", str(s["steps"]), "--guidance", str(s["guidance_scale"])]
    args += ["--eta", str(s["eta"]), "--n", "2", "--seed", str(p["seed"])]
    x = 0
    for base, adapter in (("base", "digits-v2"), ("base2", "foreign-v1"), ("base", "letters-v1")):  # name order
        domain = adapter.split("-")[0]  # each panel's label
        alone = tmp_path / f"{adapter}.png"
        assert (
            main(
                ["sample", str(store.folders[base]), "--adapter", str(store.folders[adapter]), *args, "-o", str(alone)]
            )
            == 0
        )
        panel = _pixels(alone)
        assert np.array_equal(grid[18 : 18 + panel.shape[0], x : x + panel.shape[1]], panel), adapter
        x += max(panel.shape[1], panel_label_width(domain)) + 12
    assert x - 12 == grid.shape[1]
    # refused in one line, before any work: an output that is not a PNG, an alias no adapter has
    (tmp_path / "notes.txt").write_text("user data")
    for extra, message in (
        (["--grid", "notes.txt"], "is not a PNG image"),
        (["--grid", "x.png", "--alias", "nope"], "no adapter in the registry has the alias 'nope'"),
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "pipelines.compare", *extra],
            cwd=tmp_path,
            env=store.env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert (tmp_path / "notes.txt").read_text() == "user data" and not (tmp_path / "x.png").exists()
