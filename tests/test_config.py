from pathlib import Path

import pytest
import yaml

from cdiff.config import DiffusionConfig, ModelConfig, TrainConfig, load_sections
from cdiff.errors import CdiffError
from cdiff.samplers import Sampler
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, edit):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.data.base.source == "fashion-mnist" and len(p.data.domains) >= 2


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda r: r["data"]["domains"]["digits"]["lora"].update(r=0), "data.domains.digits.lora.r"),
        (lambda r: r["data"]["domains"]["digits"].update(source="nope"), "data.domains.digits.source"),
        (lambda r: r["train"]["base"].update(lr=-1.0), "train.base.lr"),
        (lambda r: r["data"]["domains"]["digits"].update(transforms=["blur"]), "data.domains.digits.transforms[0]"),
        (lambda r: r["model"].update(n_ctx="four"), "model.n_ctx"),
        (lambda r: r["model"].update(colour=3), "model.colour"),
        (lambda r: r["sample"].update(guidance_scale=float("nan")), "sample.guidance_scale"),
        (lambda r: r["ray"].update(num_workers=0), "ray.num_workers"),
        (lambda r: r["evaluate"].update(sampler_sweep=["ddim-0"]), "evaluate.sampler_sweep"),
        (lambda r: r["evaluate"].update(full_finetune=["cifar"]), "evaluate.full_finetune"),
        (lambda r: r["data"]["domains"].update(base=r["data"]["domains"]["digits"]), "data.domains.base"),
        (lambda r: r["judge"].update(features=0), "judge.features"),
        (lambda r: r["diffusion"].update(prediction="score"), "diffusion.prediction"),
        (lambda r: r["diffusion"].update(min_snr_gamma=-1.0), "diffusion.min_snr_gamma"),
        (lambda r: r["train"]["base"].update(precision="fp16"), "train.base.precision"),
        (lambda r: r["train"]["lora"].update(compile="yes"), "train.lora.compile"),
        (lambda r: r["sample"].update(sampler="euler"), "sample.sampler"),
        (lambda r: r["sample"].update(precision="half"), "sample.precision"),
        (lambda r: r["evaluate"].update(sampler_sweep=["dpm++2m"]), "evaluate.sampler_sweep"),
        (lambda r: r["mlflow"].update(base_model_name="team/base"), "mlflow.base_model_name"),
        (lambda r: r["mlflow"].update(experiment="it's"), "mlflow.experiment"),
        (lambda r: r["mlflow"].update(adapter_model_prefix="a:"), "mlflow.adapter_model_prefix"),
        (
            lambda r: r["mlflow"].update(adapter_model_prefix="", base_model_name="digits"),
            "mlflow.adapter_model_prefix",
        ),
        (lambda r: r["tune"].update(objective="accuracy"), "tune.objective"),
        (lambda r: r["tune"].update(objective_per_class=0), "tune.objective_per_class"),
        (lambda r: r["tune"].update(search="bayes"), "tune.search"),
        (lambda r: r["tune"].update(objective_sampler="ddim-0"), "tune.objective_sampler"),
        (lambda r: r["tune"].update(objective_guidance=float("nan")), "tune.objective_guidance"),
        (lambda r: r["ray"].update(placement_strategy="spread"), "ray.placement_strategy"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, edit, key):
    with pytest.raises(CdiffError) as err:
        load_params(_write(tmp_path, edit))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_duplicate_domain_is_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    block = text[text.index("    digits:") : text.index("    fashion-rot90:")]
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(block, block + block))
    with pytest.raises(CdiffError, match="duplicate key 'digits'"):
        load_params(path)


def test_broken_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(CdiffError, match="not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda r: r["data"]["domains"]["digits"]["lora"].update(alpha=float("inf")), "data.domains.digits.lora.alpha"),
        (lambda r: r["train"]["lora"].update(weight_decay=float("inf")), "train.lora.weight_decay"),
        (lambda r: r["sample"].update(eta=float("inf")), "sample.eta"),
        (lambda r: r["sample"].update(guidance_scale=-float("inf")), "sample.guidance_scale"),
        (lambda r: r["diffusion"].update(beta_end=10**400), "diffusion.beta_end"),
        (lambda r: r["ray"].update(cpus_per_worker=float("inf")), "ray.cpus_per_worker"),
        (lambda r: r["data"]["domains"]["digits"].update(transforms=["rotate:nan"]), "data.domains.digits.transforms"),
    ],
)
def test_non_finite_values_are_refused_naming_the_key(tmp_path, edit, key):
    with pytest.raises(CdiffError) as err:
        load_params(_write(tmp_path, edit))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit,key,message",
    [
        (lambda r: r["data"]["domains"]["digits"]["lora"].update(alpha=1e6), "lora.alpha", r"\(0, 4096\]"),
        (lambda r: r["train"]["base"].update(weight_decay=5.0), "train.base.weight_decay", r"\[0, 1\]"),
        (lambda r: r["train"]["base"].update(lr=10.0), "train.base.lr", r"\(0, 1\]"),
        (lambda r: r["sample"].update(eta=1.5), "sample.eta", r"\[0, 1\]"),
        (lambda r: r["model"].update(image_size=100_000), "model.image_size", "at most 1024"),
        (lambda r: r["model"].update(num_classes=10**12), "model.num_classes", "at most 100000"),
        (lambda r: r["train"]["base"].update(steps=10**30), "train.base.steps", "at most"),
    ],
)
def test_finite_values_that_would_explode_are_bounded(tmp_path, edit, key, message):
    with pytest.raises(CdiffError, match=message) as err:
        load_params(_write(tmp_path, edit))
    assert key in str(err.value)


def test_yaml_alias_bombs_are_refused_fast_with_a_short_message(tmp_path):
    import time

    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")  # 10**9 values once expanded, from 800 bytes
    start = time.perf_counter()
    with pytest.raises(CdiffError, match="aliases expand it past") as err:
        load_params(path)
    assert time.perf_counter() - start < 5 and len(str(err.value)) < 200
    path.write_text("model: &m [*m]\n")
    with pytest.raises(CdiffError, match="refers to itself"):
        load_params(path)
    path.write_text("model: " + "[" * 10_000 + "]" * 10_000 + "\n")
    with pytest.raises(CdiffError, match="nested too deeply"):
        load_params(path)


def test_a_small_alias_still_works_and_huge_values_make_short_messages(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    text = yaml.safe_dump(raw)
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("alpha: 4.0", "alpha: &g 2.5", 1).replace("alpha: 4.0", "alpha: *g"))
    assert {d.lora.alpha for d in load_params(path).data.domains.values()} == {2.5}
    path.write_text(text.replace("mlflow:", "junk: &j [" + ", ".join(["x" * 1000] * 100) + "]\nmlflow:"))
    with pytest.raises(CdiffError, match="^junk: unknown key") as err:
        load_params(path)
    assert len(str(err.value)) < 300
    path.write_text(yaml.safe_dump(raw).replace("n_ctx: 4", "n_ctx: [" + ", ".join(["y" * 1000] * 1000) + "]"))
    with pytest.raises(CdiffError, match="model.n_ctx: expected an integer") as err:
        load_params(path)
    assert len(str(err.value)) < 300


def test_image_folders_must_live_where_dvc_tracks_them(tmp_path):
    def edit(raw):
        raw["data"]["domains"]["digits"]["source"] = "imagefolder:data/images/pets"

    assert load_params(_write(tmp_path, edit)).domain("digits").source == "imagefolder:data/images/pets"
    for outside in ("/tmp/pets", "data/pets", "data/images/../raw/pets", "data/images"):

        def move(raw, outside=outside):
            raw["data"]["domains"]["digits"]["source"] = f"imagefolder:{outside}"

        with pytest.raises(CdiffError, match=r"^data\.domains\.digits\.source: image folders live under"):
            load_params(_write(tmp_path, move))


def test_library_sections_load_without_the_pipeline_sections(tmp_path):
    path = _write(tmp_path, lambda r: r.update(ray="not even a mapping", tune=None))
    sections = load_sections(path, {"model": ModelConfig, "diffusion": DiffusionConfig, "train.base": TrainConfig})
    assert sections["model"].base_channels == [24, 48, 96] and sections["train.base"].steps == 700
    with pytest.raises(CdiffError, match="^train.base.lr"):
        load_sections(_write(tmp_path, lambda r: r["train"]["base"].update(lr=-1.0)), {"train.base": TrainConfig})
    with pytest.raises(CdiffError, match="^judge.missing: missing from"):
        load_sections(path, {"judge.missing": TrainConfig})


def test_new_sampler_and_recipe_values_load(tmp_path):
    def edit(raw):
        raw["diffusion"].update(prediction="v", min_snr_gamma=5.0)
        raw["sample"].update(sampler="dpm++2m", steps=20, precision="bf16", compile=True, batch_size=1000)
        raw["evaluate"].update(sampler_sweep=["ddpm", "ddim-20", "dpm++2m-10"])
        raw["train"]["base"].update(precision="bf16", channels_last=True, compile=True)

    p = load_params(_write(tmp_path, edit))
    assert (p.diffusion.prediction, p.diffusion.min_snr_gamma, p.sample.sampler) == ("v", 5.0, "dpm++2m")
    assert p.sampler == Sampler("dpm++2m", 20, 0.0, p.sample.guidance_scale)
    assert p.train.base.precision == "bf16" and p.train.base.channels_last and p.train.base.compile
    assert Sampler.parse("dpm++2m-20") == Sampler("dpm++2m", 20) and Sampler.parse("ddpm").steps is None


def test_cross_field_checks_refuse_before_anything_trains(tmp_path):
    # samplers that would take more steps than the schedule has, and FIDs of too few images, each named by key
    cases = [
        (
            lambda r: r["sample"].update(steps=1001),
            r"^sample\.steps: dpm\+\+2m-1001 takes 1001 steps; diffusion\.timesteps is 1000$",
        ),
        (
            lambda r: r["diffusion"].update(timesteps=10),
            r"^sample\.steps: dpm\+\+2m-20 takes 20 steps; diffusion\.timesteps is 10$",
        ),
        (
            lambda r: r["evaluate"].update(sampler_sweep=["ddim-20", "ddim-2000"]),
            r"^evaluate\.sampler_sweep: ddim-2000 takes 2000",
        ),
        (lambda r: r["tune"].update(objective_sampler="ddim-5000"), r"^tune\.objective_sampler: ddim-5000 takes 5000"),
        (
            lambda r: r["evaluate"].update(fid_per_class=1),
            r"^evaluate\.fid_per_class: FID needs at least 2 images per class$",
        ),
        (lambda r: r["evaluate"].update(sweep_per_class=1), r"^evaluate\.sweep_per_class: FID needs at least 2"),
        (
            lambda r: r["tune"].update(objective="fid", objective_per_class=1),
            r"^tune\.objective_per_class: must be at least 2 for a judge objective$",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(CdiffError, match=message):
            load_params(_write(tmp_path, edit))
    fine = [
        lambda r: r["sample"].update(steps=1000),
        lambda r: r["sample"].update(sampler="ddpm", steps=1000),
        lambda r: r["tune"].update(objective="val_loss", objective_per_class=1),  # unused by a loss objective
        lambda r: r["evaluate"].update(fid_per_class=2, sweep_per_class=2),
    ]
    for edit in fine:
        load_params(_write(tmp_path, edit))


def test_a_tuned_variant_and_up_path_rank_reach_the_fine_tune(tmp_path):
    from pipelines.core.config import UP_PATH

    p = load_params(_write(tmp_path, lambda raw: None))
    lora = p.tuned("digits", 8, 16.0, 1e-3, "dora", 4).domain("digits").lora
    assert (lora.r, lora.alpha, lora.use_dora, lora.use_rslora, lora.rank_pattern) == (
        8,
        16.0,
        True,
        False,
        {UP_PATH: 4},
    )
    same = p.tuned("digits", 8, 16.0, 1e-3).domain("digits").lora  # no variant searched: the domain's own
    assert not same.use_dora and same.rank_pattern == p.domain("digits").lora.rank_pattern
    for bad, message in [({"variants": ["lora", "qlora"]}, "tune.variants"), ({"up_ranks": [0]}, "tune.up_ranks")]:
        with pytest.raises(CdiffError, match=f"^{message}"):
            load_params(_write(tmp_path, lambda raw, bad=bad: raw["tune"].update(bad)))
