import json
import os
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_launcher_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own check, with its defaults filled in


def test_cluster_has_cpu_head_gpu_workers_and_no_public_dashboard():
    config = yaml.safe_load(CLUSTER.read_text())
    nodes = config["available_node_types"]
    assert "GPU" not in nodes[config["head_node_type"]]["resources"]
    gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
    assert gpu and all("min_workers" in n and "max_workers" in n for n in gpu)
    assert any("pip install" in c for c in config["setup_commands"])
    text = CLUSTER.read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text and "SecurityGroupIds" not in text
