"""Tokens, roles, TLS and the loopback default, against real servers on loopback ports.

Certificates are made at test time with the `cryptography` package: a CA, a server certificate
for 127.0.0.1, a client certificate it signed, and a self-signed impostor.
"""

import base64
import datetime
import ipaddress
import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator.service import SecurityError, ServeOptions, Server
from coordinator.service.security import OPEN, load_tokens
from coordinator.service.security import READ as READ_ROLE
from coordinator.service.security import TRAIN as TRAIN_ROLE
from test_service import jpeg_bytes

WIDTH = 0.125
READ, TRAIN, BOTH = "r" * 8 + "read-token-0001", "t" * 8 + "train-token-001", "b" * 8 + "both-roles-0001"


def certificate(tmp_path, name, issuer=None, server=False):
    """A key and certificate for `name`, signed by issuer (a (key, cert) pair) or by itself; their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None and not server, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    key_path, cert_path = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return (key, cert), str(key_path), str(cert_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, _, ca_pem = certificate(folder, "test-ca")
    _, server_key, server_pem = certificate(folder, "server", issuer=ca, server=True)
    _, client_key, client_pem = certificate(folder, "client", issuer=ca)
    _, rogue_key, rogue_pem = certificate(folder, "impostor")
    return dict(
        ca=ca_pem, server=(server_pem, server_key), client=(client_pem, client_key), rogue=(rogue_pem, rogue_key)
    )


@pytest.fixture(scope="module")
def token_server(ray_session, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"# who may do what\nread:{READ}\ntrain:{TRAIN}\n\n{BOTH}\n")
    tokens.chmod(0o600)
    srv = Server(ServeOptions(port=0, metrics_port=-1, width=WIDTH, auth_token_file=str(tokens))).start()
    yield srv
    srv.stop()


def call(server, token, method, request, **tls):
    with AlexNetClient(f"127.0.0.1:{server.port}", timeout=30, token=token, **tls) as client:
        stub = client.training if method in ("StartTraining", "ListTrainings", "WatchTraining") else client.inference
        stub = client.model if method in ("ExportModel", "GetKernels") else stub
        if method in ("WatchTraining", "ExportModel"):  # streams
            return list(getattr(stub, method)(request, timeout=30))
        return getattr(stub, method)(request, timeout=30)


def code_of(server, token, method, request, **tls) -> grpc.StatusCode:
    try:
        call(server, token, method, request, **tls)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


CLASSIFY = pb.ClassifyRequest(images=[pb.Image(encoded=jpeg_bytes())], top_k=1)


def test_tokens_and_roles(token_server):
    ok, unauthenticated, denied = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    assert code_of(token_server, "", "Classify", CLASSIFY) == unauthenticated
    assert code_of(token_server, "not-a-token-at-all", "Classify", CLASSIFY) == unauthenticated
    assert code_of(token_server, READ, "Classify", CLASSIFY) == ok
    assert code_of(token_server, BOTH, "Classify", CLASSIFY) == ok
    assert code_of(token_server, TRAIN, "Classify", CLASSIFY) == denied
    assert code_of(token_server, "", "WatchTraining", pb.JobRef(job_id="x")) == unauthenticated  # a stream too
    assert code_of(token_server, READ, "WatchTraining", pb.JobRef(job_id="x")) == grpc.StatusCode.NOT_FOUND
    bad_spec = pb.TrainingSpec(data_dir=str(Path.home() / "no-such-folder-for-alexnet-mp"))  # inside the default root
    assert code_of(token_server, READ, "StartTraining", bad_spec) == denied
    assert code_of(token_server, TRAIN, "StartTraining", bad_spec) == grpc.StatusCode.INVALID_ARGUMENT  # past the check
    assert call(token_server, READ, "ListTrainings", pb.ListTrainingsRequest()).jobs == []  # no refused call made one
    # The weights leave only with a train token; a read token still draws their picture.
    export = pb.ExportRequest(format=pb.SAFETENSORS)
    assert code_of(token_server, READ, "ExportModel", export) == denied
    assert code_of(token_server, TRAIN, "ExportModel", export) == ok
    assert code_of(token_server, READ, "GetKernels", pb.GetKernelsRequest()) == ok
    with pytest.raises(grpc.RpcError) as refused:
        call(token_server, TRAIN, "Classify", CLASSIFY)
    assert "may train but not read: Classify needs a 'read:' token" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        call(token_server, "", "Classify", CLASSIFY)
    assert "no token: send 'authorization: Bearer <token>'" in refused.value.details()

    channel = grpc.insecure_channel(f"127.0.0.1:{token_server.port}")  # another scheme than Bearer
    classify = channel.unary_unary(
        "/alexnet.v1.InferenceService/Classify", pb.ClassifyRequest.SerializeToString, pb.ClassifyResponse.FromString
    )
    with pytest.raises(grpc.RpcError) as refused:
        classify(CLASSIFY, metadata=[("authorization", f"Basic {READ}")], timeout=30)
    assert refused.value.code() == unauthenticated
    channel.close()
    with AlexNetClient(f"127.0.0.1:{token_server.port}", timeout=30, token="") as client:  # health stays open
        assert (
            client.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )


GRPCURL = str(Path(sys.executable).parent / "grpcurl")  # the unmodified grpcurl binary, from the test extra


def grpcurl(server, *args, token=None, plaintext=True, data=None):
    """Run grpcurl against the server, args being its flags then the method (or `list`): (exit status, output)."""
    *flags, method = args
    command = [
        GRPCURL,
        *(["-plaintext"] if plaintext else []),
        *(["-H", f"authorization: Bearer {token}"] if token else []),
        *(["-d", json.dumps(data)] if data is not None else []),
        *flags,
        f"127.0.0.1:{server.port}",
        method,
    ]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return ran.returncode, ran.stdout + ran.stderr


def test_grpcurl_lists_checks_health_and_classifies_with_a_token(token_server):
    """What a user's first look with grpcurl meets: reflection and health open, the rest behind tokens."""
    status, listed = grpcurl(token_server, "list")
    assert status == 0 and {
        "alexnet.v1.InferenceService",
        "alexnet.v1.TrainingService",
        "grpc.health.v1.Health",
    } <= set(listed.split())
    status, health = grpcurl(token_server, "grpc.health.v1.Health/Check")
    assert status == 0 and json.loads(health) == {"status": "SERVING"}
    classify = {"images": [{"encoded": base64.b64encode(jpeg_bytes()).decode()}], "top_k": 2}
    status, answer = grpcurl(token_server, "alexnet.v1.InferenceService/Classify", token=READ, data=classify)
    assert status == 0, answer
    predictions = json.loads(answer)["results"][0]["top"]
    assert len(predictions) == 2 and predictions[0]["probability"] >= predictions[1]["probability"]
    status, refused = grpcurl(token_server, "alexnet.v1.InferenceService/Classify", data=classify)
    assert status != 0 and "Code: Unauthenticated" in refused and "Bearer" in refused
    status, refused = grpcurl(token_server, "alexnet.v1.InferenceService/Classify", token=TRAIN, data=classify)
    assert status != 0 and "Code: PermissionDenied" in refused


def test_the_inference_protocol_needs_a_read_token_but_for_its_probes(token_server):
    from test_kserve import encoded, v2, v2_rpc

    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        stub = v2_rpc.GRPCInferenceServiceStub(channel)

        def code(method, request, token):
            try:
                getattr(stub, method)(request, metadata=[("authorization", f"Bearer {token}")], timeout=30)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        infer, model = encoded(jpeg_bytes()), v2.ModelMetadataRequest(name="alexnet")
        assert [code("ModelInfer", infer, token) for token in ("", READ, TRAIN)] == [
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.OK,
            grpc.StatusCode.PERMISSION_DENIED,
        ]
        assert code("ModelMetadata", model, "") == grpc.StatusCode.UNAUTHENTICATED
        assert code("ServerReady", v2.ServerReadyRequest(), "") == grpc.StatusCode.OK  # probes stay open, like health
        assert stub.ServerLive(v2.ServerLiveRequest(), timeout=30).live
    status, ready = grpcurl(token_server, "inference.GRPCInferenceService/ServerReady")  # the README's command
    assert status == 0 and json.loads(ready) == {"ready": True}


def test_mutual_tls(ray_session, pki):
    cert, key = pki["server"]
    srv = Server(
        ServeOptions(port=0, metrics_port=-1, width=WIDTH, tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"])
    ).start()
    try:
        client_cert, client_key = pki["client"]
        assert (
            code_of(srv, "", "Classify", CLASSIFY, tls_ca=pki["ca"], tls_cert=client_cert, tls_key=client_key)
            == grpc.StatusCode.OK
        )
        refused = [
            code_of(srv, "", "Classify", CLASSIFY),  # plaintext
            code_of(srv, "", "Classify", CLASSIFY, tls_ca=pki["ca"]),  # TLS, but no client certificate
            code_of(srv, "", "Classify", CLASSIFY, tls_ca=pki["ca"], tls_cert=pki["rogue"][0], tls_key=pki["rogue"][1]),
        ]
        assert refused == [grpc.StatusCode.UNAVAILABLE] * 3
    finally:
        srv.stop()
    tls_only = Server(ServeOptions(port=0, metrics_port=-1, width=WIDTH, tls_cert=cert, tls_key=key)).start()
    try:
        assert code_of(tls_only, "", "Classify", CLASSIFY, tls_ca=pki["ca"]) == grpc.StatusCode.OK
        assert code_of(tls_only, "", "Classify", CLASSIFY) == grpc.StatusCode.UNAVAILABLE  # plaintext
        status, health = grpcurl(tls_only, "-cacert", pki["ca"], "grpc.health.v1.Health/Check", plaintext=False)
        assert status == 0 and json.loads(health) == {"status": "SERVING"}
        status, refused = grpcurl(tls_only, "grpc.health.v1.Health/Check")  # plaintext against TLS
        assert status != 0 and "Failed to dial" in refused
    finally:
        tls_only.stop()


def test_a_network_address_without_tokens_is_refused_before_anything_listens(tmp_path, capsys):
    from client.cli import main

    with pytest.raises(SecurityError, match="refusing to listen on 0.0.0.0 without authentication"):
        Server(ServeOptions(host="0.0.0.0", port=0, metrics_port=-1)).start()
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", ""]) == 2
    assert "--auth-token-file FILE" in capsys.readouterr().out
    with pytest.raises(SecurityError, match="TLS needs both --tls-cert and --tls-key"):
        Server(ServeOptions(port=0, metrics_port=-1, tls_cert=str(tmp_path / "x.pem"))).start()
    with pytest.raises(SecurityError, match="--log-root /etc/tensorboard is outside the server's checkpoints roots"):
        Server(
            ServeOptions(port=0, metrics_port=-1, log_root="/etc/tensorboard", checkpoint_roots=[str(tmp_path)])
        ).start()
    assert main(["serve", "--port", "0", "--state-dir", "", "--log-root", "/etc/tensorboard"]) == 2
    assert "--checkpoint-root" in capsys.readouterr().out
    short = tmp_path / "short"
    short.write_text("read:abc\n")
    with pytest.raises(SecurityError, match="line 1: a token needs at least 16 characters"):
        load_tokens(short)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SecurityError, match="holds no token"):
        load_tokens(tmp_path / "empty")
    roles = load_tokens(_write(tmp_path / "t", f"read:{READ}\ntrain:{READ}\n{BOTH}\n"))
    assert roles == {READ: {"read", "train"}, BOTH: {"read", "train"}}


def _write(path, text):
    path.write_text(text)
    return path


def test_every_path_a_request_names_must_lie_in_the_roots(tmp_path):
    from test_training import saved_by

    from coordinator.service.errors import InvalidRequest, PermissionDenied
    from coordinator.service.requests import Roots, TrainingRequest, check_request

    inside, outside = tmp_path / "inside", tmp_path / "outside"
    (inside / "data" / "a").mkdir(parents=True)
    (outside / "data" / "a").mkdir(parents=True)
    os.symlink(outside / "data", inside / "link")  # a symlink inside that leads out
    saved_by(outside / "ckpt", [(1, 0.5)], keep=1)
    roots = Roots.of([inside], [inside])
    escapes = [
        dict(data_dir=str(outside / "data")),  # absolute
        dict(data_dir=str(inside / ".." / "outside" / "data")),  # ..
        dict(data_dir=str(inside / "link")),  # symlink
        dict(data_dir=str(inside / "data"), val_dir=str(inside / "link")),
        dict(data_dir=str(inside / "data"), class_names_file="/etc/passwd"),
        dict(data_dir=str(inside / "data"), checkpoint_dir=str(outside / "ckpt")),
        dict(resume_from=str(outside / "ckpt")),
        dict(builtin=True, checkpoint_dir="relative/to/the/server"),
    ]
    for fields in escapes:
        with pytest.raises(PermissionDenied, match="outside the server's"):
            check_request(TrainingRequest(**fields), roots=roots)
    assert not (tmp_path / "relative").exists() and not list(outside.glob("**/.write-test-*"))  # nothing was made
    with pytest.raises(InvalidRequest, match="holds a NUL byte"):
        check_request(TrainingRequest(data_dir=str(inside) + "/\0x"), roots=roots)
    with pytest.raises(PermissionDenied, match=r"\(none are configured\): .* `serve --checkpoint-root`"):
        check_request(TrainingRequest(builtin=True, checkpoint_dir=str(inside)), roots=Roots.of([inside], []))
    long = "/x" * 5000
    with pytest.raises(PermissionDenied) as refused:
        check_request(TrainingRequest(data_dir=long), roots=roots)
    assert len(str(refused.value)) < 600  # what is echoed is cut short


def test_the_local_ray_a_server_starts_keeps_its_token_private_and_its_workers_at_full_priority(tmp_path):
    """With Ray's token authentication on (as outside the tests), the token file ends up 0600. Its
    workers run at niceness 0, not Ray's 15, so that --serving-nice has all 19 steps below them."""
    import stat
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    script = (
        "import os, ray; from coordinator.engine import ensure_ray; from coordinator.engine.placement import "
        "worker_niceness; ensure_ray(num_cpus=1); nice = ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)); "
        "print('workers at', ray.get(nice.remote()), 'believed', worker_niceness()); ray.shutdown()"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=Path(__file__).parents[1],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert "workers at 0 believed 0" in ran.stdout
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600


def test_every_method_the_server_answers_has_a_declared_role(token_server):
    """Every method of every service the server lists through reflection, as grpcurl finds them."""
    address = f"127.0.0.1:{token_server.port}"
    listed = subprocess.run([GRPCURL, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60)
    services = listed.stdout.split()
    assert listed.returncode == 0 and "alexnet.v1.ModelService" in services and "grpc.health.v1.Health" in services
    methods = []
    for service in services:
        ran = subprocess.run(
            [GRPCURL, "-plaintext", address, "list", service], capture_output=True, text=True, timeout=60
        )
        methods += ["/" + line.strip().replace(f"{service}.", f"{service}/") for line in ran.stdout.split()]
    assert "/alexnet.v1.ModelService/ExportModel" in methods and "/grpc.health.v1.Health/Check" in methods
    assert sorted(methods) == sorted(token_server.roles)  # a role for each, and each role for a method
    assert set(token_server.roles.values()) == {OPEN, READ_ROLE, TRAIN_ROLE}
    assert token_server.roles["/alexnet.v1.ModelService/ExportModel"] == TRAIN_ROLE


def test_a_service_registered_without_a_role_for_each_method_stops_the_server():
    from alexnet_api.v1 import alexnet_pb2_grpc as rpc

    server = Server(ServeOptions(port=0, metrics_port=-1))  # not started: only its registration is used
    server._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(RuntimeError, match="no role declared for alexnet.v1.ModelService: GetKernels, ExportModel"):
            server._add(
                rpc.add_ModelServiceServicer_to_server,
                None,
                pb.DESCRIPTOR.services_by_name["ModelService"],
                GetModelInfo=READ_ROLE,
            )
        assert server.roles == {}  # nothing of it registered
    finally:
        server._grpc.stop(None)
