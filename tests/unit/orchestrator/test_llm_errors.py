"""What a Triton error becomes: retryable UNAVAILABLE while the LLM worker is down, starting or
stopping; INTERNAL (our fault) otherwise."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from orchestrator.llm_client import _llm_error
from squint.errors import UpstreamUnavailable


@pytest.mark.parametrize(
    "message",
    [
        "failed to connect to all addresses; last error: UNKNOWN: Connection refused",
        "Server not ready",
        "Request for unknown model: 'squint_llm' has no available versions",  # draining on SIGTERM
        "Server is stopping",
    ],
)
def test_triton_down_starting_or_stopping_is_unavailable(message):
    error = _llm_error(InferenceServerException(message), "127.0.0.1:8001")
    assert isinstance(error, UpstreamUnavailable)
    assert error.message == f"the LLM worker at 127.0.0.1:8001 is unavailable: {message}"


def test_other_triton_errors_are_internal():
    error = _llm_error(InferenceServerException("Request for unknown model: 'x' is not found"), "127.0.0.1:8001")
    assert type(error) is RuntimeError
