"""The one error hierarchy every DockerCoins package raises from, with its gRPC status codes."""

import grpc


class DockercoinsError(Exception):
    """Base of every error DockerCoins raises on purpose."""


class ConfigError(DockercoinsError):
    """A setting is missing or wrong; the message names the variable."""


class PortInUseError(ConfigError):
    """A configured port is taken by another program."""

    def __init__(self, setting: str, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is already in use ({setting})")
        self.port = port


class RequestError(DockercoinsError):
    """A request that the server refuses; `code` is the gRPC status it is answered with."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArgument(RequestError):
    """The request asks for something outside the documented range."""


class ResourceExhausted(RequestError):
    """The request is larger than the server is configured to accept."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
