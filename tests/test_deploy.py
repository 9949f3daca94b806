"""Every config in deploy/ passes the schema of what would run it, and starts the server through
deploy/start-server.sh with its safe defaults.

cluster.yaml (AWS) and onprem.yaml (on-prem over SSH) go through Ray's own cluster launcher
checks; kuberay.yaml goes through tests/test_kuberay.py. `make deploy-smoke` runs onprem.yaml for
real (not here: it needs root and minutes)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
START = DEPLOY / "start-server.sh"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def rays_checks(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)  # what `ray up` does first: raises on anything it would reject
    return prepared


def test_cluster_config_passes_rays_own_schema():
    config = load("cluster.yaml")
    rays_checks(config)
    assert config["head_node_type"] in config["available_node_types"]
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] >= 2  # two towers, one GPU each


def test_onprem_config_passes_rays_own_schema():
    config = load("onprem.yaml")
    prepared = rays_checks(config)
    assert config["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == len(config["provider"]["worker_ips"])  # every listed machine joins


@pytest.mark.parametrize("name", ["cluster.yaml", "onprem.yaml"])
def test_each_ray_up_config_starts_the_server_through_the_script_with_rays_token(name):
    config = load(name)
    head = config["head_start_ray_commands"]
    assert head[-1].endswith("alexnet-mp/deploy/start-server.sh")  # after `ray start`, with its safe defaults
    assert not any("alexnet-mp serve" in command or "0.0.0.0" in command for command in head)
    starts = [c for c in head + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    mounts = config["file_mounts"].items()  # the launcher's token, to where Ray looks on each node
    assert next(remote for remote, local in mounts if local == "~/.ray/auth_token").endswith("/.ray/auth_token")


def test_the_smoke_copy_of_onprem_changes_only_machines_access_and_ports():
    spec = importlib.util.spec_from_file_location("smoke_config", DEPLOY / "smoke_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    smoke_config = module.smoke_config
    onprem = load("onprem.yaml")
    ports = {"ray": 26379, "dashboard": 28265, "client": 20001, "agent": 25365, "grpc": 25051, "metrics": 29464}
    smoke = smoke_config(onprem, user="u", key="/k", token="/t", ports=ports, ssh_port=22, torch_spec="torch==2.13.0")
    rays_checks(smoke)
    assert smoke["provider"]["head_ip"] == "127.0.0.1" and smoke["auth"] == {"ssh_user": "u", "ssh_private_key": "/k"}
    assert smoke["head_start_ray_commands"][0] == "ray stop"  # kept: it runs as the smoke user alone
    assert "--port=26379" in smoke["head_start_ray_commands"][1] and "=6379 " not in smoke["head_start_ray_commands"][1]
    assert smoke["head_start_ray_commands"][2].startswith("ALEXNET_MP_PORT=25051 ALEXNET_MP_METRICS_PORT=29464 ")
    assert smoke["setup_commands"][1:] == onprem["setup_commands"][1:]


# Stands in for the server process alone: it records its arguments, which the real CLI parser then
# takes (so a flag the script builds that `serve` lacks fails here), and stays up like a server.
RECORD_THEN_STAY = """import json, sys, time
open(sys.argv[0] + ".args", "w").write(json.dumps(sys.argv[1:]))
time.sleep(120)
"""


def start_script(tmp_path, *args, **env) -> str:
    server = tmp_path / "bin" / "alexnet-mp"  # the name the script checks before it stops a pid
    server.parent.mkdir(exist_ok=True)
    server.write_text(f"#!{sys.executable}\n{RECORD_THEN_STAY}")
    server.chmod(0o755)
    environment = {**os.environ, "ALEXNET_MP_RUN_DIR": str(tmp_path), "ALEXNET_MP_BIN": str(server), **env}
    return subprocess.run(
        ["bash", str(START), *args], env=environment, capture_output=True, text=True, check=True
    ).stdout


def parsed_arguments(tmp_path) -> dict:
    from client.cli import build_parser

    recorded = tmp_path / "bin" / "alexnet-mp.args"
    for _ in range(300):
        if recorded.exists() and recorded.read_text():
            return vars(build_parser().parse_args(json.loads(recorded.read_text())))
        time.sleep(0.05)
    raise AssertionError(f"the server did not start: {(tmp_path / 'serve.log').read_text()}")


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_the_start_script_defaults_to_loopback_passes_the_security_settings_and_replaces_its_server(tmp_path):
    start_script(tmp_path)
    defaults = parsed_arguments(tmp_path)
    assert (defaults["ray_address"], defaults["host"], defaults["port"], defaults["metrics_port"]) == (
        "auto",
        "127.0.0.1",
        50051,
        9464,
    )
    assert defaults["auth_token_file"] is None and defaults["tls_cert"] is None
    first = int((tmp_path / "serve.pid").read_text())
    (tmp_path / "bin" / "alexnet-mp.args").unlink()

    output = start_script(
        tmp_path,
        "--",
        "--width",
        "0.5",
        ALEXNET_MP_HOST="0.0.0.0",
        ALEXNET_MP_AUTH_TOKEN_FILE="/t",
        ALEXNET_MP_TLS_CERT="/c",
        ALEXNET_MP_TLS_KEY="/k",
        ALEXNET_MP_DATA_ROOTS="/d1:/d2",
        ALEXNET_MP_PORT="1",
    )
    exposed = parsed_arguments(tmp_path)
    assert (exposed["host"], exposed["port"], exposed["auth_token_file"], exposed["tls_cert"], exposed["tls_key"]) == (
        "0.0.0.0",
        1,
        "/t",
        "/c",
        "/k",
    )
    assert exposed["data_roots"] == ["/d1", "/d2"] and exposed["width"] == 0.5
    second = int((tmp_path / "serve.pid").read_text())
    assert f"stopped the server (pid {first})" in output and not running(first) and running(second)  # idempotent

    start_script(tmp_path, "stop")
    assert not running(second) and not (tmp_path / "serve.pid").exists()
