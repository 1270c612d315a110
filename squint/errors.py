"""Domain errors, free of any transport.

Cores raise these; ``squint.rpc`` maps each class to one gRPC status in a single interceptor,
and maps a downstream service's status back to the same class. Messages are for the client:
they name the field and the limit, and never carry a traceback.
"""

from __future__ import annotations


class SquintError(Exception):
    """Base of every error a client may see, with a message written for that client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SquintError):
    """The request is malformed or breaks a limit; the message names the field and the limit."""


class InvalidMedia(InvalidRequest):
    """An image or video cannot be decoded, or is too large by bytes or pixels."""


class CompressorNotFound(SquintError):
    """No compressor is registered under the requested name."""


class BudgetExceeded(SquintError):
    """The visual tokens the request needs do not fit its budget or context."""


class QuotaExceeded(SquintError):
    """A client holds as many calls in flight as a per-client limit allows; retry when one ends."""


class ModelNotReady(SquintError):
    """The model is still loading, or failed to load."""


class UpstreamUnavailable(SquintError):
    """A service this one depends on cannot be reached; retrying may succeed."""


class DeadlineExceeded(SquintError):
    """The request's deadline passed before the work was done."""


class Unsupported(SquintError):
    """The request asks for something this server does not implement (yet)."""


class StartupError(Exception):
    """A server cannot start for a reason its operator fixes: a port taken, a certificate that
    cannot be read. Not a request's error (no status): the process says it in one line and exits."""
