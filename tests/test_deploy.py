"""deploy/cluster.yaml is a valid Ray cluster launcher config that starts the service."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "cluster.yaml"


def test_cluster_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # what `ray up` does first: raises on anything it would reject
    assert config["head_node_type"] in config["available_node_types"]
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] >= 2  # two towers, one GPU each


def test_the_head_starts_the_server_on_the_cluster():
    config = yaml.safe_load(CLUSTER.read_text())
    commands = " ".join(config["head_start_ray_commands"])
    assert "alexnet-mp serve --ray-address auto" in commands
    assert "--host 127.0.0.1" in commands  # loopback: users port-forward, so no token or TLS is needed
    assert "0.0.0.0" not in commands
