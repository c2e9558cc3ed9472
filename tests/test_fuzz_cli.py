"""Fuzzing `cdiff.cli.main(argv)` in-process: valid command lines, mutated token by token."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import FUZZ, assert_contract, copy_of, make_workspace, output_of, run_cli, tree

COMMANDS = [
    ["sample", "model", "--n", "1", "--steps", "2", "-o", "out.png"],
    ["sample", "model", "--adapter", "adapter", "--class", "y", "--n", "1", "--sampler", "ddpm", "-o", "out.png"],
    ["info", "adapter"],
    ["info", "model"],
    ["merge", "model", "adapter", "-o", "merged"],
    ["train", "--params", "params.yaml", "--source", "imagefolder:images", "-o", "trained"],
    ["compare", "summary.json"],
]

TOKENS = [
    "", "-", "--", "-h", "0", "1", "-1", "2", "3", "19", "20", "21", "256", "257", "1e3", "0x10", "nan", "inf",
    "-inf", "1e309", "99999999999999999999", "cpu", "cuda", "cuda:1", "meta", "mps", "ddpm", "ddim", "cat", "y",
    "model", "adapter", "other", "grid.png", "notes.txt", "folder", "empty", "fifo.png", "sock.png", "link.png",
    "/dev/null", ".", "..", "/", "model/config.json", "model/x.png", "adapter/x", "missing", "missing/x.png",
    "~", "~/x.png", "out.png", "merged", "caf\udce9.png", "x\ny.png", "x" * 300 + ".png", "--overwrite", "--json",
    "--n", "--steps", "--seed", "--eta", "--guidance", "--device", "--class", "--adapter", "--sampler", "-o",
    "--source", "sklearn-digits", "mnist", "cifar", "imagefolder:", "imagefolder:images", "imagefolder:folder",
    "imagefolder:missing", "imagefolder:~/images", "--params", "params.yaml", "summary.json", "--data-root",
]  # fmt: skip

FLAGS = {
    "sample": [
        "--adapter",
        "--class",
        "--n",
        "--sampler",
        "--steps",
        "--eta",
        "--guidance",
        "--seed",
        "--device",
        "-o",
    ],
    "info": [],
    "merge": ["-o", "--overwrite"],
    "train": ["--source", "--params", "--data-root", "--seed", "-o", "--overwrite"],
    "compare": ["--json"],
}

# mostly values and options of the command itself (deep paths), sometimes any token anywhere (the parser)
mutation = st.one_of(
    st.tuples(st.just("value"), st.integers(0, 20), st.sampled_from(TOKENS)),
    st.tuples(st.just("option"), st.integers(0, 20), st.sampled_from(TOKENS)),
    st.tuples(st.just("option"), st.integers(0, 20), st.sampled_from(TOKENS)),
    st.tuples(st.sampled_from(["insert", "delete", "anywhere"]), st.integers(0, 20), st.sampled_from(TOKENS)),
)


def _mutate(argv: list[str], mutations) -> list[str]:
    argv = list(argv)
    for op, i, token in mutations:
        flags = FLAGS.get(argv[0] if argv else "", [])
        if op == "value" and len(argv) > 1:
            argv[1 + i % (len(argv) - 1)] = token  # the command itself stays
        elif op == "option" and flags:
            argv += [flags[i % len(flags)], token]
        elif op == "insert":
            argv.insert(i % (len(argv) + 1), token)
        elif op == "delete" and argv:
            del argv[i % len(argv)]
        elif op == "anywhere" and argv:
            argv[i % len(argv)] = token
    if argv and argv[0] == "train":
        argv += ["--steps", "1"]  # argparse keeps the last: training stays one step, whatever was mutated
    return argv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli-workspace"))


@settings(FUZZ, max_examples=160)
@given(base=st.sampled_from(COMMANDS), mutations=st.lists(mutation, min_size=1, max_size=3))
def test_fuzzed_command_lines_keep_the_contract(workspace, base, mutations):
    argv = _mutate(base, mutations)
    with copy_of(workspace) as work:
        before = tree(work)
        code, _, err = run_cli(argv)
        assert_contract(code, err, work, before, output_of(argv) if argv and argv[0] != "info" else None)


@pytest.mark.parametrize("argv", COMMANDS)
def test_the_unmutated_command_lines_succeed(workspace, argv):
    """The fuzz starts from command lines that work: otherwise it would only ever test refusals."""
    with copy_of(workspace) as work:
        before = tree(work)
        code, _, err = run_cli(_mutate(argv, []))
        assert code == 0, err
        assert_contract(code, err, work, before, output_of(argv))
