"""dvc.yaml does not lie: each stage depends on all the code it loads, its paths are the layout's, and a
change to the library or to an image folder makes `dvc status` report the stages it reaches."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.core.layout import Layout
from tests.helpers import ROOT, make_project, run

CODE = ["cdiff", "pipelines/core", "pipelines/__init__.py"]


def stages(root: Path) -> dict:
    """Every stage of dvc.yaml as DVC resolves it: name -> (command, deps, outs), paths relative to root."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {
            s.name: (
                s.cmd,
                {d.def_path for d in s.deps if not isinstance(d, ParamsDependency)},
                {o.def_path for o in s.outs},
            )
            for s in repo.index.stages
        }


LOADED = """
import json, os, sys
import dvc.repo, mlflow, numpy, pandas, ray, ray.train.torch, ray.tune, torch, torchvision  # what every stage shares
root = {root!r}
envs = tuple({{p + "/" for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}})  # a venv inside the clone is not code
found = {{}}
for module in {modules!r}:
    read, write = os.pipe()
    if os.fork() == 0:  # a child per stage module: it loads only what that module imports, on top of the above
        os.close(read)
        __import__(module)
        files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
        ours = [f for f in files if f.startswith(root + "/") and not f.startswith(envs) and "/site-packages/" not in f]
        with os.fdopen(write, "w") as out:
            json.dump(sorted(f[len(root) + 1:] for f in ours), out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as got:
        found[module] = json.loads(got.read())
    os.wait()
print(json.dumps(found))
"""


def loaded_files(modules: list[str]) -> dict[str, list[str]]:
    """module -> the repository's own files (not its .venv) an interpreter has loaded after importing it.

    One interpreter imports the third-party libraries the stages share (none of them loads a file of this
    repository) and forks a child per module: seconds, not a fresh interpreter's ten per stage.
    """
    code = LOADED.format(root=str(ROOT), modules=modules)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_module_a_stage_loads_is_one_of_its_deps():
    every = stages(ROOT)
    loads = loaded_files(sorted({cmd.split()[2] for cmd, _, _ in every.values()}))  # python -m pipelines.STAGE
    for name, (cmd, deps, _) in every.items():
        module = cmd.split()[2]
        loaded = loads[module]
        assert any(f.startswith("cdiff/") for f in loaded) and f"{module.replace('.', '/')}.py" in loaded
        uncovered = [f for f in loaded if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
        assert not uncovered, f"{name} loads {uncovered}, which dvc.yaml does not list as its deps"


def layout_paths(stage: str, L: Layout, base: str) -> tuple[set, set]:
    """(data deps, outs) of a stage, from the layout."""
    name, _, item = stage.partition("@")
    d = item or base
    return {
        "index_base": ({L.images}, {L.image_index(base)}),
        "index": ({L.images}, {L.image_index(d)}),
        "prepare_base": ({L.image_index(base)}, {L.prepared(base)}),
        "prepare": ({L.image_index(d)}, {L.prepared(d)}),
        "pretrain": (
            {L.prepared(base)},
            {L.base_model, L.base_grid, L.pretrain_run, L.pretrain_metrics, L.pretrain_curve},
        ),
        "judge_base": ({L.prepared(d)}, {L.judge(d), L.judge_metrics(d), L.per_class(L.judge_metrics(d))}),
        "judge": ({L.prepared(d)}, {L.judge(d), L.judge_metrics(d), L.per_class(L.judge_metrics(d))}),
        "evaluate_base": (
            {L.base_model, L.judge(d), L.judge_metrics(d), L.prepared(d), L.pretrain_run},
            {L.base_metrics, L.per_class(L.base_metrics), L.sweep("guidance"), L.sweep("sampler")},
        ),
        "tune": ({L.base_model, L.judge(d), L.prepared(d)}, {L.tune_best(d), L.tune_trials(d)}),
        "finetune": (
            {L.base_model, L.prepared(d), L.tune_best(d)},
            {L.adapter(d), L.finetune_run(d), L.finetune_curve(d)},
        ),
        "sample": ({L.base_model, L.adapter(d), L.finetune_run(d)}, {L.domain_grid(d, "adapter").parent}),
        "full_finetune": (
            {L.base_model, L.judge(d), L.prepared(d)},
            {L.full_model(d), L.full_grid(d), L.full_metrics(d), L.per_class(L.full_metrics(d)), L.full_curve(d)}
            | {L.judged(d, "full")},
        ),
        "evaluate": (
            {L.base_model, L.judge(d), L.judge_metrics(d), L.adapter(d), L.prepared(d), L.finetune_run(d)},
            {L.domain_metrics(d), L.per_class(L.domain_metrics(d)), L.judged(d, "real").parent},
        ),
        "report": (
            {
                L.pretrain_metrics.parent,
                L.pretrain_curve.parent,
                L.base_grid.parent,
                L.tune_best(d).parent.parent,
                L.prepared(d).parent,  # the real training images of each domain
                L.pretrain_run.parent,
            },
            {L.reports},
        ),  # fmt: skip
    }[name]


def test_dvc_yaml_deps_and_outs_are_the_layouts_paths():
    from pipelines.core.config import load_params

    L = Layout(ROOT)
    base = load_params(ROOT / "params.yaml").data.base.name
    for name, (cmd, deps, outs) in stages(ROOT).items():
        data, made = layout_paths(name, L, base)
        script = cmd.split()[2].replace(".", "/") + ".py"
        assert deps == set(CODE) | {script} | {L.show(p) for p in data}, name
        assert outs == {L.show(p) for p in made}, name


# ---- dvc status on a tiny project: no repro, a lock committed as things stand ------------------


def _images(folder: Path, per_class: int) -> None:
    for k, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.random.default_rng([k, i]).integers(0, 255, (10, 10), dtype=np.uint8)  # the same each time
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def locked_project(tmp_path_factory):
    """The tiny project plus an image-folder domain, with a dvc.lock of its current deps (nothing run)."""
    work = tmp_path_factory.mktemp("deps")

    def edit(params):
        params["data"]["domains"]["pets"] = {
            "source": "imagefolder:data/images/pets",
            "transforms": [],
            "lora": {"r": 2, "alpha": 2.0, "extra_trainable": ["prompt"]},
        }

    _images(work / "data" / "images" / "pets", 3)
    env = make_project(work, edit)
    _reindex(work, env)
    run([sys.executable, "-c", LOCK_AS_IT_STANDS], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], work, env)
    assert _changed_deps(work, env) == {}
    return work, env


LOCK_AS_IT_STANDS = """
from dvc.repo import Repo
with Repo(".") as repo, repo.lock:  # `dvc commit` without running anything: missing outputs stay missing
    stages = list(repo.index.stages)
    for stage in stages:
        stage.save(allow_missing=True, run_cache=False)
    stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
"""


def _changed_deps(work: Path, env: dict) -> dict[str, set]:
    """stage -> the deps `dvc status` reports changed; nothing ran, so outputs and deps made by stages are missing."""
    status = json.loads(run(["dvc", "status", "--json"], work, env))
    changed = {}
    for stage, entries in status.items():
        deps = {
            p
            for e in entries
            if isinstance(e, dict)
            for p, how in e.get("changed deps", {}).items()
            if how != "deleted"
        }
        if deps:
            changed[stage] = deps
    return changed


@pytest.mark.slow
def test_a_change_anywhere_in_the_library_reaches_every_stage(locked_project):
    work, env = locked_project
    every = set(stages(work))
    for file in ("cdiff/checkpoint.py", "cdiff/data.py", "cdiff/model/unet.py", "pipelines/core/layout.py"):
        original = (work / file).read_text()
        try:
            (work / file).write_text(original + "\n# changed\n")
            changed = _changed_deps(work, env)
            assert set(changed) == every, (file, every - set(changed))
        finally:
            (work / file).write_text(original)
    assert _changed_deps(work, env) == {}


def _reindex(work: Path, env: dict) -> None:
    """Run the index stages alone (seconds): each prepare stage depends on its own dataset's index."""
    stages = [s for s in run(["dvc", "stage", "list", "--name-only"], work, env).split() if s.startswith("index")]
    run(["dvc", "repro", "--single-item", *stages], work, env)


@pytest.mark.slow
def test_a_domains_images_reach_its_own_prepare_stage_alone(locked_project):
    work, env = locked_project
    folder = work / "data" / "images" / "pets"
    _images(folder, 4)  # one more image per class
    indexes = {"index_base", "index@inverted", "index@rotated", "index@pets"}
    assert _changed_deps(work, env) == dict.fromkeys(indexes, {"data/images"})  # each hashes the folder again
    _reindex(work, env)
    assert _changed_deps(work, env) == {"prepare@pets": {"data/image_index/pets.json"}}  # not the base's, nor others'
    for extra in folder.glob("*/3.png"):
        extra.unlink()
    _reindex(work, env)
    assert _changed_deps(work, env) == {}  # back as it was
    (folder / "cat" / "notes.txt").write_text("not an image: the prepare stage does not read it")
    _reindex(work, env)
    assert _changed_deps(work, env) == {}
    (folder / "cat" / "notes.txt").unlink()
    (folder / "cat" / "0.png").unlink()
    _reindex(work, env)
    assert _changed_deps(work, env) == {"prepare@pets": {"data/image_index/pets.json"}}
    _images(folder, 3)  # the same pixels again
    _reindex(work, env)
    assert _changed_deps(work, env) == {}
