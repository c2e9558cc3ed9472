"""A two-node Ray cluster on loopback with an MLflow server: the pipeline run as the README tells cluster users.

Two raylets on this machine (Ray's cluster_utils, as `ray start --head` then `ray start --address` would
start them), an `mlflow server` with its artefacts in a folder it serves (`--artifacts-destination`), and
`ray.storage_path` on a folder every node reaches. The stages join the cluster through RAY_ADDRESS and log
through MLFLOW_TRACKING_URI. Checked: Ray Train's workers and Tune's trials ran on both nodes, checkpoints
landed in the shared storage, MLflow holds the runs, curves, artefacts and registry versions through the
server, a second `dvc repro` is a no-op, and a node lost mid-training costs a restart, not the run.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import make_project, mlflow_server, registered_checkpoint, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node of 1 CPU each: two Train workers or two Tune trials can only run one per node."""
    from ray.cluster_utils import Cluster

    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must stay short
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": str(temp), "include_dashboard": False},
    )
    second = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, second
    c.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on loopback; artefacts go through it into a folder only the server writes."""
    root = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(root, "--artifacts-destination", str(root / "served")) as uri:
        yield uri, root


@pytest.fixture(scope="module")
def project(tmp_path_factory, cluster, server):
    c, _ = cluster
    uri, _ = server
    work = tmp_path_factory.mktemp("multinode")
    shared = tmp_path_factory.mktemp("shared")  # NFS or s3:// on a real cluster

    def edit(params):
        del params["data"]["domains"]["rotated"]
        params["ray"].update(num_workers=2, cpus_per_worker=1.0, storage_path=str(shared), max_failures=2)
        params["train"]["base"].update(steps=150, checkpoint_every=50, log_every=10)
        params["tune"].update(num_samples=2, max_concurrent=2)

    env = make_project(work, edit)
    env.update(RAY_ADDRESS=c.address, MLFLOW_TRACKING_URI=uri)
    return work, env, shared


def _nodes(cluster) -> dict[str, str]:
    c, second = cluster
    return {c.head_node.node_id: "head", second.node_id: "second"}


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str, stage: str) -> list:
    client = _client(uri)
    experiment = client.get_experiment_by_name("cdiff-test")
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")


def test_pipeline_runs_on_both_nodes_and_logs_through_the_server(project, cluster, server):
    work, env, shared = project
    uri, mlflow_root = server
    out = run(["dvc", "repro", "finetune@inverted"], work, env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Grad strides do not match" not in out.stdout + out.stderr  # DDP's harmless layout warning, once per worker
    nodes = _nodes(cluster)

    (pretrain,) = _runs(uri, "pretrain")
    assert pretrain.info.status == "FINISHED"
    train_nodes = json.loads(pretrain.data.tags["ray_train_nodes"])
    assert {nodes[n] for n in train_nodes} == {"head", "second"}  # two workers of 1 CPU: one on each node
    (finetune,) = _runs(uri, "finetune")
    assert {nodes[n] for n in json.loads(finetune.data.tags["ray_train_nodes"])} == {"head", "second"}
    trials = _runs(uri, "tune-trial")
    assert len(trials) == 2
    assert {nodes[t.data.tags["ray_node"]] for t in trials} == {"head", "second"}  # 2 at once, 1 CPU each

    assert sorted(p.name for p in shared.glob("base-*/checkpoint_*"))  # checkpoints in the shared storage
    assert not (work / "ray_results").exists() and not (work / "mlflow.db").exists()

    client = _client(uri)
    steps = [m.step for m in client.get_metric_history(pretrain.info.run_id, "loss")]
    assert steps == list(range(10, 151, 10))
    served = mlflow_root / "served"
    assert list(served.rglob("model.safetensors")) and list(served.rglob("adapter.safetensors"))
    assert [v.version for v in client.search_model_versions("name = 'cdiff-base'")] == ["1"]
    assert [v.version for v in client.search_model_versions("name = 'cdiff-adapter-inverted'")] == ["1"]

    again = run(["dvc", "repro", "finetune@inverted"], work, env)
    assert "didn't change, skipping" in again and "Running stage" not in again
    assert len(_runs(uri, "pretrain")) == 1


def _raylet(node) -> psutil.Process:
    import ray._private.ray_constants as rc

    return psutil.Process(node.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid)


def test_a_node_lost_mid_training_costs_a_restart_not_the_run(project, cluster, server):
    """A new pretraining runs a worker on each node; after its first registered checkpoint a third node joins
    and the second node's raylet is killed: Ray Train restarts the group on the nodes that are left
    (FailureConfig) from that checkpoint, and the stage ends with the whole curve, nothing lost."""
    import yaml

    work, env, shared = project
    uri, _ = server
    c, second = cluster
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["base"]["steps"] = 600  # a new Ray run (its name hashes the job), long enough to lose a node
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = work / "lost-node.log"
    before = set(shared.glob("base-*"))
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=work, env=env, stdout=out, stderr=out)
    deadline = time.time() + 600
    while not any(registered_checkpoint(run) for run in set(shared.glob("base-*")) - before):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    third = c.add_node(num_cpus=1)  # room for the restarted group (1 CPU per worker)
    _raylet(second).kill()
    c.remove_node(second, allow_graceful=False)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "resuming from the checkpoint at step" in log.read_text()
    last = max(_runs(uri, "pretrain"), key=lambda r: r.info.start_time)
    assert last.info.status == "FINISHED"
    ran_on = set(json.loads(last.data.tags["ray_train_nodes"]))
    assert {second.node_id, third.node_id} <= ran_on  # a worker was lost with the second node, one replaced it
    steps = [m.step for m in _client(uri).get_metric_history(last.info.run_id, "loss")]
    assert steps == list(range(10, 601, 10))  # one continuous curve across the restart
    assert (work / "models" / "base" / "model.safetensors").is_file()


def test_a_local_run_never_joins_a_cluster_found_running_on_the_machine(cluster, tmp_path):
    """Without RAY_ADDRESS a stage starts a Ray instance of its own, even while another runs here (ray.init
    with no address would join it, and refuse the stage's num_cpus)."""
    code = """
import ray
from pipelines.core.config import load_params
from pipelines.core.distributed import session
p = load_params("tests/tiny_params.yaml")
with session(p):
    print("nodes", len(ray.nodes()), "cpus", ray.cluster_resources()["CPU"])
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = run([sys.executable, "-c", code], Path(__file__).resolve().parents[1], env)
    assert "nodes 1 cpus 2.0" in out
