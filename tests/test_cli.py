import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from cdiff.adapter_format import save_adapter
from cdiff.checkpoint import save_model
from cdiff.cli import main
from cdiff.config import DiffusionConfig
from cdiff.lora import inject_lora, unload_lora


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(timesteps=20), tmp_path / "model")
    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "adapter", class_names=["x", "y", "z"])
    unload_lora(tiny_model)
    return tmp_path


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "cdiff", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("sample", "info", "merge", "export-peft", "serve", "train", "examples:"):
        assert word in out
    out = subprocess.run(
        [sys.executable, "-m", "cdiff", "sample", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--guidance" in out and "classifier-free" in out and "--adapter ADAPTER[:WEIGHT]" in out


def test_sample_writes_a_labelled_grid(model_dir, capsys):
    out = model_dir / "grid.png"
    assert (
        main(
            [
                "sample",
                str(model_dir / "model"),
                "--class",
                "dog",
                "--class",
                "0",
                "--n",
                "3",
                "--steps",
                "4",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.width > 3 * 12 and im.height > 2 * 12


def test_sample_with_adapter_and_ddpm(model_dir):
    out = model_dir / "a.png"
    args = [
        "sample",
        str(model_dir / "model"),
        "--adapter",
        str(model_dir / "adapter"),
        "--class",
        "y",
        "--n",
        "2",
        "--sampler",
        "ddpm",
        "-o",
        str(out),
    ]
    assert main(args) == 0 and out.is_file()


def test_sample_with_dpm_solver(model_dir):
    out = model_dir / "dpm.png"
    args = ["sample", str(model_dir / "model"), "--n", "1", "--sampler", "dpm++2m", "--steps", "4", "-o", str(out)]
    assert main(args) == 0 and out.is_file()


def test_info_and_merge(model_dir, capsys):
    assert main(["info", str(model_dir / "adapter")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["r"] == 2
    assert main(["merge", str(model_dir / "model"), str(model_dir / "adapter"), "-o", str(model_dir / "merged")]) == 0
    assert main(["info", str(model_dir / "merged")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["class_names"] == ["x", "y", "z"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--class", "horse"], "unknown class 'horse'"),
        (["--steps", "0"], "must be at least 1"),
        (["--guidance", "-1"], "must be at least 0, got -1"),
        (["--guidance", "nan"], "must be a finite number, got nan"),
        (["--guidance", "1e9"], "must be at most 100, got 1e9"),
        (["--eta", "inf"], "must be a finite number, got inf"),
        (["--n", "1000"], "must be at most 256"),
        (["--seed", "-1"], "must be at least 0"),
        (["--n", "9" * 400], "must be at most 256"),  # too large for a float: refused, not an OverflowError
        (["--seed", "9" * 30], "must be at most 4294967295"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(model_dir, capsys, extra, message):
    code = main(["sample", str(model_dir / "model"), *extra, "-o", str(model_dir / "g.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_missing_paths_exit_2_without_traceback(model_dir, capsys):
    assert main(["sample", str(model_dir / "nope"), "-o", str(model_dir / "g.png")]) == 2
    assert main(["sample", str(model_dir / "model"), "-o", str(model_dir / "no" / "dir" / "g.png")]) == 2
    assert main(["info", str(model_dir / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("cdiff: error:") for line in err)


def test_a_home_of_no_such_user_is_one_line(capsys):
    assert main(["info", "~no-such-user-cdiff/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'~no-such-user-cdiff' names no home folder on this machine" in err and len(err.splitlines()) == 1


def test_train_writes_a_loadable_model(tmp_path):
    from cdiff.checkpoint import load_model

    assert main(["train", "--source", "sklearn-digits", "--steps", "2", "-o", str(tmp_path / "m")]) == 0
    model, _, config = load_model(tmp_path / "m")
    assert model.class_names == [str(i) for i in range(10)] and config.model.image_size == 28


def _tree(root):
    """Every path under root with its content: what a refused command must leave alone."""
    import os
    import stat

    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = p.read_bytes() if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
    return out


def _one_error_line(capsys) -> str:
    from tests.fuzzing import visible_lines

    err = visible_lines(capsys.readouterr().err)  # what a terminal shows: progress bars are redrawn with \r
    assert len(err) == 1 and err[0].startswith("cdiff: error: "), err
    return err[0]


def test_sample_refuses_an_existing_folder_before_sampling(model_dir, capsys, monkeypatch):
    import cdiff.grid

    monkeypatch.setattr(cdiff.grid, "sample", lambda *a, **k: pytest.fail("sampled before checking -o"))
    (model_dir / "out").mkdir()
    assert main(["sample", str(model_dir / "model"), "-o", str(model_dir / "out")]) == 2
    assert "is a folder" in _one_error_line(capsys)


def test_merge_never_replaces_what_it_does_not_write(model_dir, capsys, monkeypatch):
    """The reported disaster: `cdiff merge models/base A -o models` emptied models/. Now refused, before loading."""
    models = model_dir / "models"
    models.mkdir()
    (model_dir / "model").rename(models / "base")
    (models / "notes.txt").write_text("mine")
    monkeypatch.chdir(model_dir)
    before = _tree(model_dir)
    for output, message in [
        ("models", "holds the input"),
        ("models/base", "is the input"),
        (".", "holds the input"),
        ("adapter", "is the input"),
        ("models/notes.txt", "is a file"),
    ]:
        for overwrite in ([], ["--overwrite"]):
            assert main(["merge", "models/base", "adapter", "-o", output, *overwrite]) == 2
            assert message in _one_error_line(capsys)
    assert _tree(model_dir) == before
    assert main(["merge", "models/base", "adapter", "-o", "models/merged"]) == 0
    assert main(["merge", "models/base", "adapter", "-o", "models/merged"]) == 2
    assert "pass --overwrite" in _one_error_line(capsys)
    assert main(["merge", "models/base", "adapter", "-o", "models/merged", "--overwrite"]) == 0
    assert (models / "notes.txt").read_text() == "mine" and (models / "base" / "config.json").is_file()


def test_sample_onto_a_device_is_refused_even_as_root(model_dir, capsys):
    import os
    import stat

    assert main(["sample", str(model_dir / "model"), "--n", "1", "--steps", "1", "-o", "/dev/null"]) == 2
    assert "character device" in _one_error_line(capsys) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_device_without_cuda_is_one_line(model_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["sample", str(model_dir / "model"), "--device", "cuda", "-o", str(model_dir / "g.png")]) == 2
    assert "CUDA is not available" in _one_error_line(capsys)


def test_a_diverging_cdiff_train_stops_naming_the_step_and_saves_nothing(tmp_path, capsys, monkeypatch):
    from cdiff.model import UNet

    forward = UNet.forward

    def diverging(self, x, t, y):  # the second training step blows up
        out = forward(self, x, t, y)
        self._calls = getattr(self, "_calls", 0) + 1
        return out * float("nan") if self.training and self._calls == 2 else out

    monkeypatch.setattr(UNet, "forward", diverging)
    assert main(["train", "--source", "sklearn-digits", "--steps", "5", "-o", str(tmp_path / "m")]) == 2
    assert "training diverged at step 2" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_cdiff_train_in_one_line_and_writes_nothing(tmp_path):
    import signal
    import time

    from tests.fuzzing import visible_lines

    proc = subprocess.Popen(
        [sys.executable, "-m", "cdiff", "train", "--source", "sklearn-digits", "--steps", "100000", "-o", "m"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,  # bytes: text mode would turn the progress bar's \r into \n
    )
    seen, deadline = b"", time.time() + 120
    while b"it/s]" not in seen and time.time() < deadline:  # wait until the progress bar is drawn: training runs
        char = proc.stderr.read(1)
        if not char:
            break
        seen += char
    proc.send_signal(signal.SIGTERM)
    err = (seen + proc.stderr.read()).decode()  # through the same buffer (communicate() would skip what it holds)
    proc.wait(timeout=60)
    lines = visible_lines(err)
    assert (
        proc.returncode == 128 + signal.SIGTERM
        and lines == [lines[-1]]
        and lines[-1].startswith("cdiff: interrupted (SIGTERM)")
    )
    assert list(tmp_path.iterdir()) == []


def test_paths_expand_home_and_odd_names_print(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(model_dir))
    assert main(["sample", "~/model", "--n", "1", "--steps", "1", "-o", "~/caf\udce9.png"]) == 0
    assert "caf\\udce9.png" in capsys.readouterr().out
    assert [p.name for p in model_dir.glob("caf*.png")] == ["caf\udce9.png"]


def test_read_only_output_folder_is_refused_in_one_line():
    """Run as an unprivileged user (root writes anywhere), with a real read-only folder."""
    from cdiff.checkpoint import save_model
    from cdiff.config import DiffusionConfig
    from cdiff.model import UNet
    from tests.conftest import tiny_config

    work = Path(tempfile.mkdtemp(prefix="cdiff-ro-"))
    try:
        os.chmod(work, 0o755)
        save_model(UNet(tiny_config(), ["a", "b", "c"]), DiffusionConfig(timesteps=10), work / "model")
        for p in [work / "model", *(work / "model").iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        (work / "ro").mkdir(mode=0o555)
        os.chmod(work / "ro", 0o555)
        cmd = [
            sys.executable,
            "-m",
            "cdiff",
            "sample",
            str(work / "model"),
            "--n",
            "1",
            "-o",
            str(work / "ro" / "x.png"),
        ]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        assert out.returncode == 2, out.stderr
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and "is not writable" in err[0], out.stderr
        assert list((work / "ro").iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_train_reads_its_sections_of_params_yaml_without_the_pipeline(tmp_path):
    code = f"""
import sys
from cdiff.cli import main
code = main(["train", "--params", "tests/tiny_params.yaml", "--steps", "1", "-o", {str(tmp_path / "m")!r}])
print(code, sorted(m for m in sys.modules if m.split(".")[0] in ("pipelines", "ray", "mlflow", "dvc")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    from cdiff.checkpoint import load_model

    _, _, config = load_model(tmp_path / "m")
    assert config.model.image_size == 12 and config.diffusion.timesteps == 100  # the tiny params'


# ---- weighted mixes: --adapter DIR:WEIGHT ----------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("adapters/a", (Path("adapters/a"), 1.0)),
        ("adapters/a:0.7", (Path("adapters/a"), 0.7)),
        ("a:-2.5e-1", (Path("a"), -0.25)),
        ("a:+3", (Path("a"), 3.0)),
        ("a:.5", (Path("a"), 0.5)),
        ("dir:with:colons", (Path("dir:with:colons"), 1.0)),  # ':' and a non-number: still a path
        ("my:adapter", (Path("my:adapter"), 1.0)),
        ("a:0.5x", (Path("a:0.5x"), 1.0)),
        ("a:", (Path("a:"), 1.0)),
        ("x:2:1", (Path("x:2"), 1.0)),  # a folder named x:2
        ("models:/cdiff-adapter-digits@champion", ("models:/cdiff-adapter-digits@champion", 1.0)),
        ("models:/cdiff-adapter-digits/3:0.5", ("models:/cdiff-adapter-digits/3", 0.5)),
    ],
)
def test_adapter_weights_parse_only_a_number_after_the_last_colon(text, expected):
    from cdiff.cli.arguments import weighted_source

    assert weighted_source(text) == expected


@pytest.fixture
def mix_dir(model_dir, tiny_model):
    """model_dir, plus adapters a and b whose LoRA weights are not zero (the fixture's adapter is a no-op)."""
    from tests.test_lora import _randomize_lora

    for i, name in enumerate("ab"):
        inject_lora(tiny_model, r=2, alpha=4, extra_trainable=["prompt"])
        _randomize_lora(tiny_model, seed=i)
        save_adapter(tiny_model, model_dir / name, class_names=[f"{name}{k}" for k in range(3)])
        unload_lora(tiny_model)
    return model_dir


def test_sample_with_a_weighted_mix(mix_dir):
    def grid(*adapters):
        out = mix_dir / f"{len(list(mix_dir.glob('*.png')))}.png"
        args = ["sample", str(mix_dir / "model"), "--n", "2", "--steps", "3", "--seed", "5", "-o", str(out)]
        assert main([*args, *(x for a in adapters for x in ("--adapter", str(mix_dir / a)))]) == 0
        return out.read_bytes()

    alone = grid("a")
    assert grid("a:1", "b:0") == alone  # the mix path, adding nothing: the same pixels
    assert grid("a:0.5") != alone
    assert grid("a:0.5", "b:0.5") not in (alone, grid("b"))


def test_merge_a_weighted_mix(mix_dir, capsys):
    import torch

    from cdiff.checkpoint import load_model
    from cdiff.mixing import load_adapters

    a, b = str(mix_dir / "a"), str(mix_dir / "b")
    out = mix_dir / "mixed"
    assert (
        main(["merge", str(mix_dir / "model"), "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5", "-o", str(out)]) == 0
    )
    merged, _, config = load_model(out)
    expected, _, _ = load_model(mix_dir / "model")
    load_adapters(expected, [(mix_dir / "a", 0.7), (mix_dir / "b", -0.5)])
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in expected.state_dict().items())
    assert config.extra["merged_from"]["adapters"] == [{"adapter": a, "weight": 0.7}, {"adapter": b, "weight": -0.5}]
    assert merged.class_names == ["a0", "a1", "a2"]
    plain, _, _ = load_model(mix_dir / "model")
    assert not torch.equal(
        plain.state_dict()["prompt.embedding.weight"], merged.state_dict()["prompt.embedding.weight"]
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "model", "--adapter", "a:nan", "-o", "g.png"], "must be a finite number, got nan"),
        (["sample", "model", "--adapter", "a:-inf", "-o", "g.png"], "must be a finite number, got -inf"),
        (["merge", "model", "--adapter", "a:inf", "-o", "m"], "must be a finite number, got inf"),
        (["merge", "model", "-o", "m"], "cdiff merge needs an adapter"),
        (["merge", "model", "--adapter", "a:0.5", "--adapter", "nope:0.5", "-o", "m"], "adapter folder not found"),
    ],
)
def test_bad_mixes_exit_2_with_one_line_and_write_nothing(mix_dir, capsys, monkeypatch, args, message):
    monkeypatch.chdir(mix_dir)
    before = _tree(mix_dir)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(("cdiff: error: ", f"cdiff {args[0]}: error: ")) and message in err[0]
    assert _tree(mix_dir) == before


def test_sample_refuses_a_mix_with_an_adapter_of_another_base(mix_dir, capsys):
    from cdiff.model import UNet
    from tests.conftest import tiny_config

    other = UNet(tiny_config())
    inject_lora(other, r=2, alpha=2)
    save_adapter(other, mix_dir / "foreign")
    args = [
        "sample",
        str(mix_dir / "model"),
        "--adapter",
        f"{mix_dir / 'a'}:0.5",
        "--adapter",
        f"{mix_dir / 'foreign'}:0.5",
    ]
    assert main([*args, "-o", str(mix_dir / "g.png")]) == 2
    assert "trained on other base weights (fingerprint mismatch)" in _one_error_line(capsys)


def test_serve_refuses_bad_names_and_a_name_twice_in_one_line(model_dir, capsys):
    model = str(model_dir / "model")
    assert main(["serve", model, "--adapter", "bad name=x"]) == 2
    assert "is not NAME=ADAPTER" in capsys.readouterr().err
    adapter = str(model_dir / "adapter")
    assert main(["serve", model, "--adapter", f"a={adapter}", "--adapter", f"a={adapter}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cdiff: error: an adapter name is given twice: a"
