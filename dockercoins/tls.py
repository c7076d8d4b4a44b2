"""Optional TLS for every gRPC server and client: PEM files from settings to gRPC credentials."""

from pathlib import Path
from typing import Any

import grpc

from dockercoins.errors import ConfigError
from dockercoins.settings import env_name


def read_pem(path: Path, field: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming the variable if it is unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{env_name(field)}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{env_name(field)}: {path} is not a PEM file")
    return data


def _paths(settings: Any) -> tuple[Path | None, Path | None, Path | None]:
    """cert, key and CA of any settings object; None for the fields it does not have."""
    return (
        getattr(settings, "tls_cert", None),
        getattr(settings, "tls_key", None),
        getattr(settings, "tls_ca", None),
    )


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """TLS credentials for a gRPC server, or None for plaintext (no certificate configured).

    With a CA configured too, clients must present a certificate signed by it (mutual TLS).
    """
    cert, key, ca = _paths(settings)
    if cert is None or key is None:
        return None
    pair = (read_pem(key, "tls_key"), read_pem(cert, "tls_cert"))
    if ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=read_pem(ca, "tls_ca"), require_client_auth=True
    )


def channel_credentials(settings: Any) -> grpc.ChannelCredentials | None:
    """TLS credentials for a gRPC client, or None for plaintext (no CA configured).

    The server is verified against the CA; the client presents its own certificate and key,
    when configured, for mutual TLS.
    """
    cert, key, ca = _paths(settings)
    if ca is None:
        return None
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=read_pem(ca, "tls_ca"))
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "tls_ca"),
        private_key=read_pem(key, "tls_key"),
        certificate_chain=read_pem(cert, "tls_cert"),
    )


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Any = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: TLS with `credentials`, plaintext without."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
