"""The copy of deploy/onprem.yaml that deploy/smoke.sh runs against this machine.

It is the shipped file with only what must differ here changed: the machines (127.0.0.1, no
workers), the SSH user and key, the token's source, a CPU torch, and ports that no other Ray on
this machine uses. Every command stays, `ray stop` included: the smoke user is an unprivileged
user of its own, whose `ray stop` cannot signal anyone else's Ray (smoke.sh says why that matters).
Each change must find its one place in onprem.yaml, so that the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import argparse
import copy
import sys

import yaml

SERVE_WIDTH = 0.25  # the served network at a quarter width: two shared vCPUs, and the training matches it
NUM_CPUS = 8  # logical: the serving pair, a training pair and its data loaders (ensure_ray's own minimum)
OBJECT_STORE_BYTES = 500_000_000  # the machine is shared: Ray would take 30% of its memory


def replace_once(commands: list[str], old: str, new: str) -> list[str]:
    hits = [i for i, command in enumerate(commands) if old in command]
    if len(hits) != 1:
        raise ValueError(f"expected one command with {old!r} in onprem.yaml, found {len(hits)}")
    return [command.replace(old, new) if i == hits[0] else command for i, command in enumerate(commands)]


def smoke_config(onprem: dict, *, user: str, key: str, token: str, ports: dict, ssh_port: int, torch_spec: str) -> dict:
    config = copy.deepcopy(onprem)
    config["cluster_name"] = "alexnet-mp-smoke"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": user, "ssh_private_key": key}
    if ssh_port != 22:  # Ray's SSH has no port option: netcat carries the connection to sshd's port
        config["auth"]["ssh_proxy_command"] = f"nc %h {ssh_port}"
    if "~/.ray/auth_token" not in config["file_mounts"]:
        raise ValueError("onprem.yaml no longer mounts ~/.ray/auth_token")
    config["file_mounts"]["~/.ray/auth_token"] = token
    config["setup_commands"] = replace_once(config["setup_commands"], "TORCH_SPEC=torch", f"TORCH_SPEC={torch_spec}")
    head_flags = (
        f"--port={ports['ray']} --dashboard-port={ports['dashboard']} --ray-client-server-port={ports['client']}"
        f" --dashboard-agent-listen-port={ports['agent']} --num-cpus={NUM_CPUS}"
        f" --object-store-memory={OBJECT_STORE_BYTES}"
    )
    head = replace_once(config["head_start_ray_commands"], "--port=6379", head_flags)
    # This machine is shared and busy: at Ray's default niceness (15) the towers starve behind
    # everyone else's processes; a node of your own has no one to yield to.
    head = replace_once(
        head, "RAY_AUTH_MODE=token ray start --head", "RAY_worker_niceness=0 RAY_AUTH_MODE=token ray start --head"
    )
    server_env = f"ALEXNET_MP_PORT={ports['grpc']} ALEXNET_MP_METRICS_PORT={ports['metrics']}"
    script = "~/alexnet-mp/deploy/start-server.sh"
    config["head_start_ray_commands"] = replace_once(head, script, f"{server_env} {script} -- --width {SERVE_WIDTH}")
    config["worker_start_ray_commands"] = replace_once(config["worker_start_ray_commands"], ":6379", f":{ports['ray']}")
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onprem")
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ssh-port", type=int, default=22)
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument(
        "--port", action="append", default=[], metavar="NAME=PORT", help="ray, dashboard, client, agent, grpc, metrics"
    )
    args = parser.parse_args(argv)
    ports = {name: int(port) for name, port in (item.split("=", 1) for item in args.port)}
    with open(args.onprem) as file:
        onprem = yaml.safe_load(file)
    config = smoke_config(
        onprem,
        user=args.user,
        key=args.key,
        token=args.token,
        ports=ports,
        ssh_port=args.ssh_port,
        torch_spec=args.torch_spec,
    )
    yaml.safe_dump(config, sys.stdout, sort_keys=False, width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
