import json
import subprocess
import sys

import pytest
from PIL import Image

from cdiff.checkpoint import save_model
from cdiff.cli import main
from cdiff.config import DiffusionConfig
from cdiff.lora import inject_lora, save_adapter, unload_lora


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(timesteps=20), tmp_path / "model")
    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "adapter", class_names=["x", "y", "z"])
    unload_lora(tiny_model)
    return tmp_path


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "cdiff", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("sample", "info", "merge", "train", "examples:"):
        assert word in out
    out = subprocess.run(
        [sys.executable, "-m", "cdiff", "sample", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--guidance" in out and "classifier-free" in out


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
        (["--guidance", "-1"], ">= 0"),
        (["--guidance", "nan"], ">= 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(model_dir, capsys, extra, message):
    try:
        code = main(["sample", str(model_dir / "model"), *extra, "-o", str(model_dir / "g.png")])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_missing_paths_exit_2_without_traceback(model_dir, capsys):
    assert main(["sample", str(model_dir / "nope"), "-o", str(model_dir / "g.png")]) == 2
    assert main(["sample", str(model_dir / "model"), "-o", str(model_dir / "no" / "dir" / "g.png")]) == 2
    assert main(["info", str(model_dir / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("cdiff: error:") for line in err)


def test_train_writes_a_loadable_model(tmp_path):
    from cdiff.checkpoint import load_model

    assert main(["train", "--source", "sklearn-digits", "--steps", "2", "-o", str(tmp_path / "m")]) == 0
    model, _, config = load_model(tmp_path / "m")
    assert model.class_names == [str(i) for i in range(10)] and config["model"]["image_size"] == 28
