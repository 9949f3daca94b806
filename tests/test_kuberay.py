"""deploy/kuberay.yaml is a RayCluster that KubeRay accepts, with GPU workers and the server on
the head, started by deploy/start-server.sh; and a Service that reaches gRPC and /metrics there.

The schema below is ours: the part of KubeRay's RayCluster API (ray.io/v1) and of Kubernetes'
pod template that the manifest uses, written from their API references, with their names, types
and required fields. KubeRay's API server prunes unknown fields and `kubectl apply` (strict field
validation) refuses them: here every object the schema spells out refuses fields it does not name,
so a typo fails too.
"""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def strict(node):
    """The schema with additionalProperties: false wherever it lists properties and allows no others."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: ({n: strict(s) for n, s in v.items()} if k == "properties" else strict(v)) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


STRING, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STRINGS, STRING_MAP = {"type": "array", "items": STRING}, {"type": "object", "additionalProperties": STRING}
QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}  # "8", 32Gi, 1
EXEC = {"type": "object", "properties": {"exec": {"type": "object", "properties": {"command": STRINGS}}}}
CONTAINER = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": STRING,
        "image": STRING,
        "command": STRINGS,
        "args": STRINGS,
        "imagePullPolicy": STRING,
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": STRING, "value": STRING, "valueFrom": {"type": "object"}},
            },
        },
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": INT, "name": STRING, "protocol": STRING},
            },
        },
        "resources": {"type": "object", "properties": {"limits": QUANTITIES, "requests": QUANTITIES}},
        "lifecycle": {"type": "object", "properties": {"postStart": EXEC, "preStop": EXEC}},
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "properties": {"name": STRING, "mountPath": STRING, "readOnly": BOOL},
            },
        },
    },
}
VOLUME = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": STRING,
        "emptyDir": {"type": "object"},
        "secret": {"type": "object", "properties": {"secretName": STRING, "defaultMode": INT}},
        "persistentVolumeClaim": {"type": "object", "required": ["claimName"], "properties": {"claimName": STRING}},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": STRING_MAP, "annotations": STRING_MAP}},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "volumes": {"type": "array", "items": VOLUME},
                "securityContext": {
                    "type": "object",
                    "properties": {"fsGroup": INT, "runAsUser": INT, "runAsGroup": INT},
                },
                "nodeSelector": STRING_MAP,
                "tolerations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "key": STRING,
                            "operator": {"enum": ["Exists", "Equal"]},
                            "value": STRING,
                            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                        },
                    },
                },
            },
        },
    },
}
RAYCLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": STRING, "namespace": STRING, "labels": STRING_MAP},
        },
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": STRING,
                "enableInTreeAutoscaling": BOOL,
                "suspend": BOOL,
                "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "properties": {"serviceType": STRING, "rayStartParams": STRING_MAP, "template": POD_TEMPLATE},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "template"],
                        "properties": {
                            "groupName": STRING,
                            "replicas": INT,
                            "minReplicas": INT,
                            "maxReplicas": INT,
                            "numOfHosts": INT,
                            "rayStartParams": STRING_MAP,
                            "template": POD_TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def manifests() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def validator():
    schema = strict(RAYCLUSTER)
    return jsonschema.Draft7Validator(schema)


def test_the_raycluster_passes_the_schema_of_what_kuberay_accepts(manifests, validator):
    cluster = manifests["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cluster)]
    assert errors == []


def test_the_schema_check_catches_a_misspelt_field(manifests, validator):
    cluster = json.loads(json.dumps(manifests["RayCluster"]))
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    cluster["spec"]["authOptions"]["mode"] = "on"
    assert len(list(validator.iter_errors(cluster))) == 2


def test_gpu_workers_ray_token_and_the_server_on_the_head(manifests):
    spec = manifests["RayCluster"]["spec"]
    assert spec["authOptions"]["mode"] == "token"
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] >= 2  # two towers, one GPU each
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    hook = " ".join(head["lifecycle"]["postStart"]["exec"]["command"])
    assert hook.endswith("/home/ray/alexnet-mp/deploy/start-server.sh")
    assert "COPY --chown=ray:users . /home/ray/alexnet-mp" in (ROOT / "deploy" / "Dockerfile").read_text()
    env = {item["name"]: item["value"] for item in head["env"]}
    if env["ALEXNET_MP_HOST"] not in ("127.0.0.1", "localhost"):  # the server would refuse to start without
        assert env["ALEXNET_MP_AUTH_TOKEN_FILE"] and env["ALEXNET_MP_TLS_CERT"] and env["ALEXNET_MP_TLS_KEY"]
    mounted = {m["mountPath"] for m in head["volumeMounts"]}
    assert all(
        any(env[name].startswith(path + "/") for path in mounted)
        for name in ("ALEXNET_MP_AUTH_TOKEN_FILE", "ALEXNET_MP_TLS_CERT")
    )


def test_the_service_reaches_grpc_and_metrics_on_the_head(manifests):
    service, cluster = manifests["Service"], manifests["RayCluster"]
    assert service["apiVersion"] == "v1" and service["metadata"]["name"]
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    env = {item["name"]: item["value"] for item in head["env"]}
    exposed = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    assert container_ports["grpc"] == int(env["ALEXNET_MP_PORT"]) == exposed["grpc"] == 50051
    assert container_ports["metrics"] == int(env["ALEXNET_MP_METRICS_PORT"]) == exposed["metrics"]
