"""Who may reach the server and do what: bearer tokens with roles, TLS, and the loopback default.

A token file holds one token per line, optionally prefixed by its role:

    read:3f0c...      Classify, GetModelInfo, GetKernels, GetTraining, ListTrainings, WatchTraining
    train:9a71...     StartTraining, StopTraining, ExportModel (the weights leave with it)
    5be2...           both

Clients send `authorization: Bearer <token>`. A missing or unknown token is UNAUTHENTICATED, a
known one without the method's role PERMISSION_DENIED. Health and reflection stay open, so load
balancers and grpcurl can find the server, and so do the inference protocol's ServerLive and
ServerReady (its probes); its other methods, ModelInfer among them, need "read". Tokens are
compared in constant time, and never taken from the command line, where `ps` would show them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

log = logging.getLogger(__name__)

ROLES = ("read", "train")
# What a method needs (server.py declares one for each): a token with that role, or nothing at all.
OPEN, READ, TRAIN = "open", "read", "train"
MIN_TOKEN_LENGTH = 16
TOKEN_FILE_ENV = "ALEXNET_MP_AUTH_TOKEN_FILE"


class SecurityError(ValueError):
    """A server configuration that would be unsafe or cannot work; the message says what to change."""


def load_tokens(path) -> dict[str, frozenset[str]]:
    """Each token in the file, with its roles."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecurityError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by others: chmod 600 it", path)
    tokens: dict[str, frozenset[str]] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, token = line.partition(":")
        roles = frozenset({role}) if token and role in ROLES else frozenset(ROLES)
        token = token if token and role in ROLES else line
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise SecurityError(
                f"{path} line {number}: a token needs at least {MIN_TOKEN_LENGTH} characters and no "
                "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        tokens[token] = tokens.get(token, frozenset()) | roles
    if not tokens:
        raise SecurityError(f"the token file {path} holds no token")
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    client_ca: Optional[str] = None  # set: clients must present a certificate it signed (mutual TLS)

    def server_credentials(self) -> grpc.ServerCredentials:
        try:
            key, cert = Path(self.key).read_bytes(), Path(self.cert).read_bytes()
            ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as exc:
            raise SecurityError(f"cannot read a TLS file: {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def check_exposure(host: str, has_tokens: bool, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond loopback without credentials (as Jupyter does), unless told to."""
    if is_loopback(host) or has_tokens or insecure_no_auth:
        return
    raise SecurityError(
        f"refusing to listen on {host} without authentication: anyone who reaches it could train on this "
        f"machine's files and read its models. Give --auth-token-file FILE (or ${TOKEN_FILE_ENV}), and "
        "--tls-cert/--tls-key, or listen on 127.0.0.1 and forward the port, or pass --insecure-no-auth "
        "if the network is trusted"
    )


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token and its role on every method: `roles` gives each method's (full names,
    /package.Service/Method: OPEN, READ or TRAIN). A method with none declared is refused."""

    def __init__(self, tokens: dict[str, frozenset[str]], roles: dict[str, str]):
        self.tokens = [(token.encode(), roles) for token, roles in tokens.items()]
        self.roles = roles

    def roles_of(self, presented: str) -> Optional[frozenset[str]]:
        """The token's roles, None if unknown; every known token is compared, each in constant time."""
        found = None
        candidate = presented.encode()
        for token, roles in self.tokens:
            if hmac.compare_digest(token, candidate):
                found = roles
        return found

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        needed = self.roles.get(method)
        if handler is None or needed == OPEN:
            return handler  # an unknown method gets gRPC's UNIMPLEMENTED
        if needed is None:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, f"no role is declared for {method}")
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        roles = self.roles_of(presented.strip()) if scheme.lower() == "bearer" else None
        if roles is None:
            why = "no token" if not header else "an unknown token"
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{why}: send 'authorization: Bearer <token>' with a token from the server's token file",
            )
        if needed not in roles:
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token may {', '.join(sorted(roles))} but not {needed}: "
                f"{method.rsplit('/', 1)[1]} needs a '{needed}:' token",
            )
        return handler


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that refuses the call before it runs."""

    def refuse(request, context):
        context.abort(code, message)

    kind = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
    return kind(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def token_file_from_env() -> Optional[str]:
    return os.environ.get(TOKEN_FILE_ENV) or None
