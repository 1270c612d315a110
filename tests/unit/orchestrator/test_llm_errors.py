"""What a Triton error becomes: retryable UNAVAILABLE while the LLM worker is down, starting or
stopping; INVALID_ARGUMENT with its reason when it refuses the request; INTERNAL (our fault) otherwise."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from llm_worker import INVALID_REQUEST_PREFIX
from orchestrator.llm_client import _llm_error
from squint.errors import InvalidRequest, UpstreamUnavailable


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


def test_a_request_the_llm_worker_refuses_is_invalid_with_its_reason():
    reason = "image_spans row 0 (start 5, length 576): layer 40 is not a decoder layer of this model (0..31)"
    error = _llm_error(InferenceServerException(INVALID_REQUEST_PREFIX + reason), "127.0.0.1:8001")
    assert isinstance(error, InvalidRequest)
    assert error.message == f"the LLM refused the request: {reason}"
