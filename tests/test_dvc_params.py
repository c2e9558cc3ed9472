"""dvc.yaml declares every params section a stage reads: a changed setting reruns each stage it reaches.

The reads are found in the code, not listed by hand: every `p.<section>...` chain in the stage's script, and in
each pipelines.core function the script hands `p` to (followed through the calls it makes with `p` in turn).
"""

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from functools import cache

from pipelines.core.config import load_params
from tests.helpers import ROOT

PARAMS = load_params(ROOT / "params.yaml")  # a real Params, to find a section's methods and properties

# Read but not declared, by design: where MLflow logs to changes no output DVC tracks; a dataset's name is
# already part of the stage's definition (its paths interpolate ${data.base.name} or the domain's key).
UNTRACKED = re.compile(r"mlflow(\..*)?|data\.base\.name|data\.domains\.[^.]+\.name")


def declared() -> dict[str, tuple[str, set[str]]]:
    """Every stage as DVC resolves it: name -> (command, the params keys it declares)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {
            s.name: (s.cmd, {k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params})
            for s in repo.index.stages
        }


def _chain(node: ast.AST, roots: dict[str, list[str]]) -> list[str] | None:
    """`p.a.b` -> ['a', 'b'], `p.domain(x).lora` -> ['domain()', 'lora']; None unless rooted at one of `roots`
    (`p` -> [], an alias such as `e = p.evaluate` -> ['evaluate'])."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            parts.append(node.func.attr + "()")
            node = node.func.value
        elif isinstance(node, ast.Name) and node.id in roots:
            return roots[node.id] + parts[::-1]
        else:
            return None


def _aliases(body: ast.AST, root: str) -> dict[str, list[str]]:
    """Names bound to a part of the params (`e, cfg = p.evaluate, p.train.lora`), besides the root itself."""
    roots = {root: []}
    for node in ast.walk(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = (
                zip(target.elts, value.elts, strict=False)
                if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                else [(target, value)]
            )
            for name, part in pairs:
                if isinstance(name, ast.Name) and name.id != root and (chain := _chain(part, {root: []})):
                    roots[name.id] = chain
    return roots


def _key(chain: list[str], key: str) -> set[str]:
    """A chain of attributes on Params -> the params.yaml keys it reads. A method or property of a section
    (`p.evaluate.cas(...)`, `p.tune.sampler`) reads the fields its code reads through `self`."""
    head, rest = chain[0], chain[1:]
    if head == "tuned()":  # the same params with tuned values: read on
        return _key(rest, key) if rest else set()
    if head == "sampler":  # one value built from the whole section
        return {"sample"}
    if head in ("domain()", "dataset()"):
        path, obj = ["data.base" if key == "base" else f"data.domains.{key}"], None
    elif head.endswith("()"):
        return set()
    else:
        path, obj = [head], getattr(PARAMS, head, None)
    for name in rest:
        member = getattr(type(obj), name.removesuffix("()"), None) if obj is not None else None
        code = member.fget if isinstance(member, property) else member
        if inspect.isfunction(code):  # a method or property of the section: what it reads of `self`
            return {".".join(path + [r]) for r in _self_reads(code)} or {".".join(path)}
        if name.endswith("()"):
            break
        path.append(name)
        obj = getattr(obj, name, None) if obj is not None and dataclasses.is_dataclass(obj) else None
    return {".".join(path)}


def _self_reads(method) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


@cache
def _function(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def reads(fn, root: str, key: str, seen: set | None = None) -> set[str]:
    """The params keys `fn` reads through its argument `root`, and through the pipelines functions it passes it to."""
    seen = set() if seen is None else seen
    if fn in seen:
        return set()
    seen.add(fn)
    tree = ast.parse(inspect.getsource(inspect.getmodule(fn)))
    body = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == fn.__name__
    )
    names = {**vars(inspect.getmodule(fn))}
    roots = _aliases(body, root)
    found, methods = set(), {id(n.func) for n in ast.walk(body) if isinstance(n, ast.Call)}
    checks = {id(n.value) for n in ast.walk(body) if isinstance(n, ast.Expr)}  # `p.domain(name)` alone: a check
    for node in ast.walk(body):
        if id(node) in methods or id(node) in checks:  # `p.domain` of `p.domain(name)`: the call is the read
            continue
        if isinstance(node, ast.Attribute | ast.Call) and (chain := _chain(node, roots)):
            found |= _key(chain, key)
        if isinstance(node, ast.Call):
            for i, arg in enumerate(node.args):
                if isinstance(arg, ast.Name) and arg.id == root:
                    callee = _callee(node.func, names)
                    if callee is not None:
                        params = list(inspect.signature(callee).parameters)
                        if i < len(params):
                            found |= reads(callee, params[i], key, seen)
    # a longer chain is one read: keep only the keys no other read extends (p.train.lora, not also p.train)
    return {k for k in found if not any(o.startswith(k + ".") for o in found)}


def _callee(func: ast.AST, names: dict):
    """The pipelines function a call names (module.func or an imported func); None for anything else."""
    target = None
    if isinstance(func, ast.Name):
        target = names.get(func.id)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        target = getattr(names.get(func.value.id), func.attr, None)
    module = getattr(target, "__module__", "") or ""
    wrapped = inspect.unwrap(target) if callable(target) else None
    if module.startswith("pipelines") and inspect.isfunction(wrapped):
        return wrapped
    return None


def covered(key: str, keys: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in keys) or bool(UNTRACKED.fullmatch(key))


def test_every_stage_declares_the_params_it_reads():
    missing = {}
    for stage, (cmd, keys) in declared().items():
        words = cmd.split()
        module, key = words[2], (words[3] if len(words) > 3 else "base")
        main = inspect.unwrap(importlib.import_module(module).main)
        root = "p"
        read = reads(main, root, key)
        if not read and "params" in inspect.getsource(main):  # a script that loads params under another name
            raise AssertionError(f"{stage}: found no reads of `p` in {module}.main")
        if gaps := sorted(k for k in read if not covered(k, keys)):
            missing[stage] = gaps
    assert not missing, f"stages read params dvc.yaml does not declare for them: {missing}"


def test_the_read_finder_sees_what_a_stage_reads():
    # the finder itself: finetune reads its domain's lora, train.lora, the sampler, and ray and the model
    # through the functions it hands `p` to (distributed.fit, jobs.job_for)
    from pipelines import finetune

    got = reads(inspect.unwrap(finetune.main), "p", "inverted")
    for section in (
        "data.domains.inverted.lora",
        "train.lora",
        "sample",
        "evaluate.val_images",
        "ray",
        "seed",
        "model",
    ):
        assert any(g == section or g.startswith(section + ".") for g in got), (section, got)
    _, keys = declared()["finetune@digits"]
    digits = reads(inspect.unwrap(finetune.main), "p", "digits")
    assert not [k for k in digits if not covered(k, keys)]
    assert [k for k in digits if not covered(k, keys - {"sample"})] == ["sample"]  # a dropped section is caught
