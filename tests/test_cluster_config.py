"""cluster.yaml validates against the cluster-launcher schema shipped inside the installed ray package."""
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema(config):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config
    schema = json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    assert errors == []
    validate_config(prepare_config(config))  # provider defaults merged: head type, worker counts, node types


def test_cluster_shape(config):
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = nodes["gpu_8xh100"]
    assert gpu["resources"] == {"CPU": 192, "GPU": 8} and gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


def test_a_misspelled_key_is_caught(config):
    import ray.autoscaler
    schema = json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))
    bad = {**config, "max_wrkers": 3}
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad)]
    assert any("max_wrkers" in e for e in errors)
