"""The LLM worker on the real tritonserver, streamed over KServe gRPC, against Hugging Face."""

from __future__ import annotations

import platform
import queue
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from llm_worker import MODEL_NAME
from llm_worker.testing import HFReference, hf_reference, llava_prompt, random_images
from llm_worker.tritonserver import TritonServerError, TritonServerProcess, TritonServerSettings
from squint.packs import ModelPack
from squint.tiny_pack import write_tiny_pack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW_TOKENS = 12


@dataclass
class Stream:
    """What one streamed request got back."""

    tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    final_flags: list[bool] = field(default_factory=list)
    error: InferenceServerException | None = None


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> ModelPack:
    return write_tiny_pack(tmp_path_factory.mktemp("pack-alt"), seed=0, shape="alt")


@pytest.fixture(scope="module")
def reference(pack: ModelPack) -> HFReference:
    return hf_reference(pack.llava_dir, random_images(2, seed=1), llava_prompt(2), MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def server(pack: ModelPack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServerProcess]:
    settings = TritonServerSettings(pack_dir=pack.root, run_dir=tmp_path_factory.mktemp("triton"))
    with TritonServerProcess(settings) as server:
        yield server


@pytest.fixture()
def client(server: TritonServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def _inputs(
    input_ids: np.ndarray, visual_embeds: np.ndarray | None, max_new_tokens: int
) -> list[grpcclient.InferInput]:
    arrays: dict[str, tuple[np.ndarray, str]] = {
        "input_ids": (input_ids.astype(np.int64), "INT64"),
        "max_new_tokens": (np.array([max_new_tokens], dtype=np.int32), "INT32"),
        "temperature": (np.array([0.0], dtype=np.float32), "FP32"),
    }
    if visual_embeds is not None:
        arrays["visual_embeds"] = (visual_embeds.astype(np.float32), "FP32")
    inputs = []
    for name, (array, datatype) in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _stream(client: grpcclient.InferenceServerClient, request_id: str, inputs: list[grpcclient.InferInput]) -> Stream:
    """Send one request on a fresh stream and collect its responses up to the final one."""
    responses: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL_NAME, inputs, request_id=request_id, enable_empty_final_response=True)
        stream = Stream()
        while True:
            result, error = responses.get(timeout=60)
            if error is not None:
                stream.error = error
                return stream
            assert result is not None
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            stream.final_flags.append(final)
            stream.tokens.extend(int(t) for t in result.as_numpy("token_ids"))
            stream.finish_reasons.append(result.as_numpy("finish_reason")[0].decode())
            if final:
                return stream
    finally:
        client.stop_stream()


def test_the_stub_runs_this_environment(server: TritonServerProcess) -> None:
    # model.py logs the stub's interpreter: it must be this virtualenv, or llm_worker would not import.
    assert f"python {platform.python_version()} at {sys.prefix}" in server.log_path.read_text()


def test_streamed_greedy_tokens_equal_hf_generate(
    client: grpcclient.InferenceServerClient, reference: HFReference
) -> None:
    assert reference.visual_embeds is not None
    stream = _stream(
        client, "parity", _inputs(reference.input_ids.numpy(), reference.visual_embeds.numpy(), MAX_NEW_TOKENS)
    )
    assert stream.error is None
    assert tuple(stream.tokens) == reference.tokens
    # One response per token, then a final one with no tokens and the reason.
    assert stream.finish_reasons == [""] * MAX_NEW_TOKENS + ["length"]
    assert stream.final_flags == [False] * MAX_NEW_TOKENS + [True]


def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(
    client: grpcclient.InferenceServerClient, reference: HFReference
) -> None:
    assert reference.visual_embeds is not None
    n = reference.visual_embeds.shape[0]
    bad = _stream(client, "bad", _inputs(reference.input_ids.numpy(), reference.visual_embeds.numpy()[:-5], 4))
    assert bad.error is not None and not bad.tokens
    assert f"visual_embeds has {n - 5} rows but input_ids holds {n} image placeholder" in bad.error.message()
    assert "Traceback" not in bad.error.message()

    good = _stream(client, "good", _inputs(reference.input_ids.numpy(), reference.visual_embeds.numpy(), 4))
    assert good.error is None and tuple(good.tokens) == reference.tokens[:4]
    assert good.finish_reasons[-1] == "length"


def test_a_server_without_a_pack_fails_fast_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SQUINT_LLM_PACK_DIR", raising=False)
    server = TritonServerProcess(TritonServerSettings(run_dir=tmp_path))
    server.start()
    try:
        with pytest.raises(TritonServerError) as excinfo:
            server.wait_ready(120)
    finally:
        server.stop()
    message = str(excinfo.value)
    assert "exited with code" in message
    assert "no model pack configured: set SQUINT_LLM_PACK_DIR" in message
