"""The LLM worker on the real tritonserver, streamed over KServe gRPC: parity with Hugging Face,
concurrent streams, cancellation, the busy queue and the custom metrics."""

from __future__ import annotations

import asyncio
import logging
import platform
import queue
import random
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from llm_worker import STAGED_MODEL_NAME as MODEL_NAME
from llm_worker.engine import GenerationRequest, LLMEngine, SamplingOptions
from llm_worker.staged import ImageSpan
from llm_worker.testing import HFReference, hf_reference, llava_prompt, random_images
from llm_worker.text_tensors import finish_reason
from llm_worker.tritonserver import TritonServerError, TritonServerProcess, TritonServerSettings
from squint.app.tiny_pack import write_tiny_pack
from squint.packs import ModelPack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

logger = logging.getLogger(__name__)

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
    # The staged engine alone: these tests are about it (vLLM is tested through the stack).
    settings = TritonServerSettings(pack_dir=pack.root, run_dir=tmp_path_factory.mktemp("triton"), models=(MODEL_NAME,))
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
            stream.finish_reasons.append(finish_reason(result.as_numpy("finish_reason")))
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


# -- Concurrency, cancellation, the busy queue and metrics --

IMAGE_TOKENS = 256  # the alt pack: a 16 x 16 grid


@pytest.fixture(scope="module")
def engine(pack: ModelPack) -> LLMEngine:
    """The same engine in this process: what each request gives alone."""
    return LLMEngine.load(pack.llava_dir)


def _mixed(engine: LLMEngine, n: int, seed: int = 7) -> list[GenerationRequest]:
    """Greedy prompts with 0, 1 or 2 images among text of different lengths; some images are
    pooled inside the LLM (different layers, strides, 1d and 2d); different lengths to generate."""
    rng = random.Random(seed)
    text = [i for i in range(3, 200) if i != engine.image_token_index]
    requests = []
    for r in range(n):
        ids, spans = [1] + rng.sample(text, rng.randrange(2, 12)), []
        for _ in range(r % 3):
            if r % 4 in (1, 2):
                shape = rng.choice(["1d", "2d"])
                layer, stride = rng.randrange(engine.n_layers), rng.choice([2, 4, 8])
                spans.append(ImageSpan(len(ids), IMAGE_TOKENS, layer, stride, shape))
            ids += [engine.image_token_index] * IMAGE_TOKENS + rng.sample(text, rng.randrange(1, 6))
        n_visual = (r % 3) * IMAGE_TOKENS
        generator = torch.Generator().manual_seed(r)
        visual = torch.randn(n_visual, engine.hidden_size, generator=generator) if n_visual else None
        options = SamplingOptions(max_new_tokens=6 + (r * 5) % 17)
        requests.append(GenerationRequest(torch.tensor(ids), visual, options, tuple(spans)))
    return requests


def _request_inputs(request: GenerationRequest) -> list[grpcclient.InferInput]:
    visual = None if request.visual_embeds is None else request.visual_embeds.numpy()
    inputs = _inputs(request.input_ids.numpy(), visual, request.sampling.max_new_tokens)
    if request.image_spans:
        rows = np.array(
            [[s.start, s.length, s.layer, s.stride, 1 if s.shape == "1d" else 2] for s in request.image_spans], np.int64
        )
        spans = grpcclient.InferInput("image_spans", list(rows.shape), "INT64")
        spans.set_data_from_numpy(rows)
        inputs.append(spans)
    return inputs


@dataclass
class Timed:
    """What one aio stream got back, with when each token came."""

    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str = ""
    error: InferenceServerException | None = None


async def _aio_stream(
    client: grpcaio.InferenceServerClient,
    request_id: str,
    inputs: list[grpcclient.InferInput],
    cancel_after: int | None = None,
    cancel: asyncio.Event | None = None,
    got: Timed | None = None,
) -> Timed:
    """One request on its own stream, recorded into ``got`` as it comes; the call is cancelled
    after ``cancel_after`` tokens or once ``cancel`` is set."""

    async def requests():
        yield {"model_name": MODEL_NAME, "inputs": inputs, "request_id": request_id}

    got = Timed() if got is None else got
    stream = client.stream_infer(inputs_iterator=requests())
    try:
        async for result, error in stream:
            if error is not None:
                got.error = error
                return got
            tokens = [int(t) for t in result.as_numpy("token_ids")]
            got.tokens += tokens
            got.times += [time.monotonic()] * len(tokens)
            got.finish_reason = finish_reason(result.as_numpy("finish_reason"))
            if got.finish_reason or (cancel_after is not None and len(got.tokens) >= cancel_after):
                return got
            if cancel is not None and cancel.is_set():
                return got
    finally:
        stream.cancel()
    return got


def test_16_concurrent_streams_with_mixed_images_get_their_alone_tokens(
    server: TritonServerProcess, engine: LLMEngine
) -> None:
    requests = _mixed(engine, 16)
    images = {0 if r.visual_embeds is None else r.visual_embeds.shape[0] // IMAGE_TOKENS for r in requests}
    assert images == {0, 1, 2} and sum(bool(r.image_spans) for r in requests) >= 4
    expected = [[step.token_id for step in engine.generate(r)] for r in requests]

    async def run() -> list[Timed]:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            return await asyncio.gather(
                *(_aio_stream(client, f"mixed-{i}", _request_inputs(r)) for i, r in enumerate(requests))
            )
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, got in enumerate(results):
        assert got.error is None, f"request {i}: {got.error}"
        assert got.tokens == expected[i], f"request {i}"
        assert got.finish_reason in ("length", "stop")


def test_a_bad_image_span_is_refused_with_the_reason(
    client: grpcclient.InferenceServerClient, engine: LLMEngine
) -> None:
    request = next(r for r in _mixed(engine, 16) if r.image_spans)
    bad = GenerationRequest(request.input_ids, request.visual_embeds, request.sampling, (ImageSpan(0, 10, 1, 2),))
    stream = _stream(client, "bad-span", _request_inputs(bad))
    assert stream.error is not None and not stream.tokens
    assert "image_spans row 0 (start 0, length 10) covers prompt token 0, which is not an image placeholder" in (
        stream.error.message()
    )
    assert "Traceback" not in stream.error.message()


def _metrics(server: TritonServerProcess) -> dict[str, float]:
    """The staged model's custom metrics from Triton's Prometheus endpoint, by name (both engines report
    the same families, told apart by their ``model`` label)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    models = set()
    for name, labels, value in re.findall(r"^(squint_llm_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        assert 'version="1"' in labels
        models.add(re.search(r'model="(\w+)"', labels).group(1))
        if f'model="{MODEL_NAME}"' in labels:
            found[name] = float(value)
    assert models == {MODEL_NAME}
    return found


def test_custom_metrics_show_beside_tritons_own_and_move_after_a_request(
    server: TritonServerProcess, client: grpcclient.InferenceServerClient, engine: LLMEngine
) -> None:
    request = next(r for r in _mixed(engine, 16, seed=11) if r.image_spans)
    before = _metrics(server)
    assert set(before) == {
        "squint_llm_prompt_tokens_total",
        "squint_llm_generated_tokens_total",
        "squint_llm_visual_tokens_total",
        "squint_llm_kv_cache_bytes",
        "squint_llm_active_sequences",
        "squint_llm_queued_requests",
    }
    stream = _stream(client, "metrics", _request_inputs(request))
    assert stream.error is None
    prepared = engine.prepare(request)
    deadline = time.monotonic() + 10
    while True:
        after = _metrics(server)
        if after["squint_llm_active_sequences"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    grew = {name: after[name] - before[name] for name in after}
    assert grew["squint_llm_prompt_tokens_total"] == prepared.prompt_tokens
    assert grew["squint_llm_generated_tokens_total"] == len(stream.tokens)
    assert grew["squint_llm_visual_tokens_total"] == prepared.visual_tokens
    assert after["squint_llm_active_sequences"] == after["squint_llm_queued_requests"] == 0
    assert after["squint_llm_kv_cache_bytes"] == 0
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert "nv_inference_request_success" in response.read().decode()  # Triton's own, beside ours


@pytest.fixture(scope="module")
def serial_server(pack: ModelPack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServerProcess]:
    """A server with one batch slot and one queue place (set through tritonserver's environment)."""
    server = TritonServerProcess(
        TritonServerSettings(pack_dir=pack.root, run_dir=tmp_path_factory.mktemp("serial"), models=(MODEL_NAME,))
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SQUINT_LLM_MAX_BATCH", "1")
        env.setenv("SQUINT_LLM_MAX_QUEUE", "1")
        server.start()  # the environment is read here
    try:
        server.wait_ready()
        assert "max_batch 1, max_queue 1" in server.log_path.read_text()
        yield server
    finally:
        server.stop()


def _long_inputs(reference: HFReference) -> list[grpcclient.InferInput]:
    assert reference.visual_embeds is not None
    return _inputs(reference.input_ids.numpy(), reference.visual_embeds.numpy(), 3000)


def test_a_cancelled_stream_frees_its_slot_and_the_next_request_starts_at_once(
    serial_server: TritonServerProcess, reference: HFReference
) -> None:
    assert reference.visual_embeds is not None
    short = _inputs(reference.input_ids.numpy(), reference.visual_embeds.numpy(), MAX_NEW_TOKENS)

    async def run() -> tuple[Timed, Timed, float]:
        client = grpcaio.InferenceServerClient(serial_server.grpc_url)
        try:
            cancelled = await _aio_stream(client, "long", _long_inputs(reference), cancel_after=50)
            cancelled_at = time.monotonic()  # the call is cancelled as _aio_stream returns
            following = await _aio_stream(client, "next", short)
            return cancelled, following, cancelled_at
        finally:
            await client.close()

    cancelled, following, cancelled_at = asyncio.run(run())
    assert cancelled.error is None and len(cancelled.tokens) == 50 and cancelled.finish_reason == ""
    assert following.error is None and tuple(following.tokens) == reference.tokens
    first_token_s = following.times[0] - cancelled_at
    # The long stream's pace says how long it had left: 2950 more tokens.
    per_token = (cancelled.times[-1] - cancelled.times[0]) / (len(cancelled.times) - 1)
    remaining_s = 2950 * per_token
    logger.info(
        "cancelled after 50 tokens (%.2f ms/token, %.1f s left); the next request's first token came %.0f ms later",
        per_token * 1e3,
        remaining_s,
        first_token_s * 1e3,
    )
    assert first_token_s < 2.0
    assert first_token_s < remaining_s / 4
    log = serial_server.log_path.read_text()
    assert "request long cancelled after" in log and "its slot is free" in log


def test_a_full_queue_refuses_with_unavailable(serial_server: TritonServerProcess, reference: HFReference) -> None:
    assert reference.visual_embeds is not None
    short = _inputs(reference.input_ids.numpy(), reference.visual_embeds.numpy(), 2)

    async def run() -> tuple[Timed, Timed, Timed]:
        client = grpcaio.InferenceServerClient(serial_server.grpc_url)
        done, running = asyncio.Event(), Timed()
        try:
            task = asyncio.ensure_future(
                _aio_stream(client, "running", _long_inputs(reference), cancel=done, got=running)
            )
            while not running.tokens and not task.done():
                await asyncio.sleep(0.01)  # the long one holds the only slot
            queued = asyncio.ensure_future(_aio_stream(client, "queued", short))
            await asyncio.sleep(0.3)  # it waits for the slot in the only queue place
            refused = await _aio_stream(client, "refused", short)
            done.set()
            return await task, await queued, refused
        finally:
            await client.close()

    running, queued, refused = asyncio.run(run())
    assert refused.error is not None and not refused.tokens
    message = refused.error.message()
    # Streamed errors reach the client as a message only (no status code): it says "unavailable",
    # which is what the orchestrator's client maps to UpstreamUnavailable.
    assert "busy and unavailable for new requests" in message and "(max_queue 1)" in message
    assert queued.error is None and tuple(queued.tokens) == reference.tokens[:2]
    assert running.error is None and 0 < len(running.tokens) < 3000


def test_a_deployment_without_the_model_a_request_needs_says_which_and_how_to_load_it(
    serial_server: TritonServerProcess, reference: HFReference
) -> None:
    """This server loads the staged engine only: a request without spans needs squint_llm."""
    from orchestrator.llm_client import LLMRequest, TritonLLMClient
    from orchestrator.types import Sampling
    from squint.errors import Unsupported

    assert reference.visual_embeds is not None
    request = LLMRequest(
        input_ids=reference.input_ids.numpy(),
        visual_embeds=reference.visual_embeds.numpy(),
        sampling=Sampling(max_new_tokens=2),
        request_id="missing-model",
    )

    async def run() -> None:
        client = TritonLLMClient(serial_server.grpc_url, "squint_llm", 1 << 26, 30)
        try:
            async for _ in client.generate(request):
                pass
        finally:
            await client.close()

    with pytest.raises(Unsupported, match=r"does not serve the model 'squint_llm'.*--load-model"):
        asyncio.run(run())
