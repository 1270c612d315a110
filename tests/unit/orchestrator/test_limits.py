"""Request limits, per-client streams and deadlines: the core with fake clients, and the
servicer on a real loopback gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import grpc.aio
import numpy as np
import pytest

from orchestrator.admission import StreamLimiter
from orchestrator.core import Orchestrator
from orchestrator.llm_client import LLMRequest, LLMStep, TritonLLMClient
from orchestrator.prompting import PromptBuilder
from orchestrator.server import SERVICE_NAME
from orchestrator.service import GenerationServicer
from orchestrator.settings import OrchestratorSettings, RequestLimits
from orchestrator.types import GenerationRequest, ImageChunk, Sampling, TextChunk
from orchestrator.vision_client import EncodedMedia, ImageToEncode, MediaAnalysis, VisionClient, VisionContext
from orchestrator.visual_tokens import VisualTokens
from squint.errors import BudgetExceeded, DeadlineExceeded, InvalidRequest, QuotaExceeded
from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.rpc import AuthSettings, GrpcServerSettings, create_server


class FakeVision:
    """Every image analyses to ``rows`` tokens (or fewer); records the deadline of each call."""

    def __init__(self, rows: int = 4, hidden: int = 64) -> None:
        self.rows, self.hidden = rows, hidden
        self.deadlines: list[tuple[str, float | None]] = []

    async def smallest(self, context):
        return 1

    async def analyze(self, images, keys, context):
        self.deadlines.append(("analyze", context.deadline))
        descriptor = np.ones(4, np.float32) / 2
        levels = tuple(range(self.rows, 0, -1))
        return [(MediaAnalysis(self.rows, levels, None, descriptor, 576, (24, 24), False, "w"), "w") for _ in images]

    async def encode(self, images, keys, preferred, context):
        self.deadlines.append(("encode", context.deadline))
        out = []
        for image in images:
            rows = min(self.rows, image.max_tokens or self.rows)
            tokens = VisualTokens(rows, np.zeros((rows, self.hidden), np.float32))
            out.append((EncodedMedia(tokens, 576, rows, False, "k", 1.0, context.compressor or "none", "w"), "w"))
        return out


class SlowLLM:
    """Streams one token every ``pace`` seconds until ``max_new_tokens``; counts open streams."""

    def __init__(self, pace: float = 0.0, token: int = 5) -> None:
        self.pace, self.token = pace, token
        self.requests: list[LLMRequest] = []
        self.open = 0

    async def generate(self, request: LLMRequest):
        self.requests.append(request)
        self.open += 1
        try:
            for _ in range(request.sampling.max_new_tokens - 1):
                await asyncio.sleep(self.pace)
                yield LLMStep((self.token,), "")
            yield LLMStep((self.token,), "length")
        finally:
            self.open -= 1


@pytest.fixture(scope="module")
def prompts(tiny_pack):
    return PromptBuilder(tiny_pack)


def settings(**limits) -> OrchestratorSettings:
    return OrchestratorSettings(limits=RequestLimits(**limits))


def request(*chunks, **kwargs) -> GenerationRequest:
    return GenerationRequest(chunks=chunks, request_id="r", **kwargs)


def collect(core: Orchestrator, req: GenerationRequest) -> list:
    async def run():
        return [event async for event in core.generate(req)]

    return asyncio.run(run())


# -- Limits checked by the core ------------------------------------------------------------


def test_an_image_over_max_image_bytes_is_refused_before_it_is_sent_on(prompts):
    vision = FakeVision()
    core = Orchestrator(settings(max_image_bytes=1024), prompts, vision, SlowLLM())
    with pytest.raises(InvalidRequest) as caught:
        collect(core, request(TextChunk("q"), ImageChunk(b"x" * 1025)))
    assert caught.value.message == "chunks[1].image.data is 0.0 MiB; the limit is 0.0 MiB (max_image_bytes=1024)"
    assert not vision.deadlines
    assert collect(core, request(TextChunk("q"), ImageChunk(b"x" * 1024)))[-1].finish_reason == "length"


def test_too_many_stop_token_ids_are_refused(prompts):
    core = Orchestrator(settings(max_stop_token_ids=2), prompts, FakeVision(), SlowLLM())
    with pytest.raises(
        InvalidRequest, match=r"sampling.stop_token_ids has 3 ids; the limit is 2 \(max_stop_token_ids\)"
    ):
        collect(core, request(TextChunk("q"), sampling=Sampling(stop_token_ids=(1, 2, 3))))
    collect(core, request(TextChunk("q"), sampling=Sampling(max_new_tokens=1, stop_token_ids=(1, 2))))


def test_an_empty_stop_string_is_refused_here_not_by_the_llm_worker(prompts):
    core = Orchestrator(settings(), prompts, FakeVision(), SlowLLM())
    with pytest.raises(
        InvalidRequest, match=r"sampling.stop\[1\] is empty; every stop string needs at least one character"
    ):
        collect(core, request(TextChunk("q"), sampling=Sampling(stop=("END", ""))))


def test_text_over_max_prompt_tokens_is_refused_before_any_media_work(prompts):
    text = "word " * 50
    text_tokens = len(prompts.render((ImageChunk(b"png"), TextChunk(text))).token_ids) - 1  # less the placeholder
    vision, llm = FakeVision(), SlowLLM()
    core = Orchestrator(settings(max_prompt_tokens=text_tokens - 1), prompts, vision, llm)
    with pytest.raises(InvalidRequest) as caught:
        collect(core, request(ImageChunk(b"png"), TextChunk(text)))
    assert caught.value.message == (
        f"the prompt is {text_tokens} tokens of text after the chat template; the limit is {text_tokens - 1} "
        "prompt tokens (max_prompt_tokens)"
    )
    assert not vision.deadlines and not llm.requests
    # At the limit, the text passes (and its image's tokens are checked with it later).
    core = Orchestrator(settings(max_prompt_tokens=text_tokens + 1), prompts, FakeVision(rows=1), llm)
    collect(core, request(ImageChunk(b"png"), TextChunk(text), sampling=Sampling(max_new_tokens=1)))
    assert len(llm.requests[-1].input_ids) == text_tokens + 1


def test_visual_tokens_count_towards_max_prompt_tokens(prompts):
    with_one_placeholder = len(prompts.render((ImageChunk(b"a"), TextChunk("q"))).token_ids)
    limit = with_one_placeholder - 1 + 9  # the text and 9 visual tokens
    llm = SlowLLM()
    core = Orchestrator(settings(max_prompt_tokens=limit), prompts, FakeVision(rows=10), llm)
    with pytest.raises(BudgetExceeded) as caught:
        collect(core, request(ImageChunk(b"a"), TextChunk("q")))
    assert caught.value.message.startswith(f"the prompt is {limit + 1} tokens (10 visual) after the chat template")
    assert f"the limit is {limit} prompt tokens (max_prompt_tokens)" in caught.value.message
    assert not llm.requests
    # A budget that fits is served.
    collect(core, request(ImageChunk(b"a"), TextChunk("q"), visual_token_budget=9, sampling=Sampling(max_new_tokens=1)))
    assert len(llm.requests[-1].input_ids) == limit


# -- Concurrent streams per client ---------------------------------------------------------


def test_the_stream_limiter_counts_each_client_apart():
    limiter = StreamLimiter(2)
    with limiter.hold("a"), limiter.hold("a"), limiter.hold("b"):
        with pytest.raises(QuotaExceeded) as caught:
            with limiter.hold("a"):
                pass
        assert caught.value.message == (
            "a already has 2 generation calls in flight; the limit is 2 per client (max_streams_per_client); "
            "retry when one finishes"
        )
        assert (limiter.active("a"), limiter.active("b")) == (2, 1)
    assert limiter.active("a") == limiter.active("b") == 0
    with StreamLimiter(0).hold("a"), StreamLimiter(0).hold("a"):
        pass  # 0: no limit
    with pytest.raises(ValueError, match="max_streams_per_client is -1"):
        StreamLimiter(-1)


def test_the_core_holds_a_clients_slot_until_its_stream_is_closed(prompts):
    core = Orchestrator(settings(max_streams_per_client=1), prompts, FakeVision(), SlowLLM())

    async def run():
        first = core.generate(request(TextChunk("q"), client="alice", sampling=Sampling(max_new_tokens=5)))
        await anext(first)  # alice's one slot is taken
        with pytest.raises(QuotaExceeded, match="alice already has 1 generation calls in flight"):
            await anext(core.generate(request(TextChunk("q"), client="alice")))
        bob = [
            e async for e in core.generate(request(TextChunk("q"), client="bob", sampling=Sampling(max_new_tokens=1)))
        ]
        await first.aclose()  # a client gone: its slot is free at once
        again = [
            e async for e in core.generate(request(TextChunk("q"), client="alice", sampling=Sampling(max_new_tokens=1)))
        ]
        return bob, again

    bob, again = asyncio.run(run())
    assert bob[-1].finish_reason == again[-1].finish_reason == "length"
    assert core.streams.active("alice") == 0


# -- Deadlines -----------------------------------------------------------------------------


def test_the_requests_deadline_reaches_every_downstream_call(prompts):
    vision, llm = FakeVision(), SlowLLM()
    core = Orchestrator(settings(), prompts, vision, llm)
    deadline = time.monotonic() + 30
    collect(core, request(ImageChunk(b"a"), TextChunk("q"), deadline=deadline, sampling=Sampling(max_new_tokens=1)))
    assert vision.deadlines == [("analyze", deadline), ("encode", deadline)]
    assert llm.requests[0].deadline == deadline


class RecordingStub:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    async def Analyze(self, request, timeout, metadata):
        self.timeouts.append(timeout)
        raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "late")


def test_a_vision_call_times_out_with_the_clients_deadline():
    async def run():
        client = VisionClient("127.0.0.1:1", 1 << 20, timeout_seconds=300)
        client._stub = stub = RecordingStub()
        image = [ImageToEncode(b"png", "chunks[0].image")]
        try:
            with pytest.raises(DeadlineExceeded, match="did not answer before the deadline"):
                await client.analyze(image, VisionContext("none", {}, "", "r", deadline=time.monotonic() + 2))
            with pytest.raises(DeadlineExceeded):
                await client.analyze(image, VisionContext("none", {}, "", "r"))  # no deadline: the configured timeout
            with pytest.raises(DeadlineExceeded, match="the request's deadline passed before vision worker"):
                await client.analyze(image, VisionContext("none", {}, "", "r", deadline=time.monotonic() - 1))
        finally:
            await client.close()
        return stub.timeouts

    timeouts = asyncio.run(run())
    assert len(timeouts) == 2  # a passed deadline makes no call
    assert 1.5 < timeouts[0] <= 2 and timeouts[1] == 300


class FakeTriton:
    """Stands in for tritonclient's aio client: records the stream timeout, fails as told."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code, self.timeouts, self.cancelled = code, [], 0

    def stream_infer(self, inputs_iterator, stream_timeout=None):
        self.timeouts.append(stream_timeout)
        fake = self

        class Stream:
            def __aiter__(self):
                return self

            async def __anext__(self):
                raise grpc.aio.AioRpcError(fake.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "stream ended")

            def cancel(self):
                fake.cancelled += 1

        return Stream()

    async def close(self):
        pass


def test_the_triton_stream_ends_at_the_clients_deadline():
    async def run(code, deadline):
        client = TritonLLMClient("127.0.0.1:1", "squint_llm", 1 << 20, timeout_seconds=300)
        await client._client.close()
        client._client = fake = FakeTriton(code)
        sampling = Sampling(max_new_tokens=4)
        request = LLMRequest(np.array([1, 2, 3]), None, sampling, "r", deadline=deadline)
        with pytest.raises(Exception) as caught:
            async for _ in client.generate(request):
                pass
        return fake, caught.value

    fake, error = asyncio.run(run(grpc.StatusCode.DEADLINE_EXCEEDED, time.monotonic() + 3))
    assert isinstance(error, DeadlineExceeded) and "did not finish before the deadline" in error.message
    assert 2.5 < fake.timeouts[0] <= 3 and fake.cancelled == 1
    fake, error = asyncio.run(run(grpc.StatusCode.UNAVAILABLE, None))
    assert type(error).__name__ == "UpstreamUnavailable" and fake.timeouts == [300]


# -- Through the servicer on a real server -------------------------------------------------


@contextlib.asynccontextmanager
async def serving(core: Orchestrator, tokens: tuple[str, ...] = ()):
    def add(server):
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(core), server)
        return [SERVICE_NAME]

    server = create_server(GrpcServerSettings(port=0), "orchestrator", add, auth=AuthSettings(tokens=tokens))
    await server.start()
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield pb_grpc.GenerationServiceStub(channel)
    finally:
        await server.stop(0)


def text_request(max_new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(chunks=[pb.Chunk(text="q")], sampling=pb.SamplingParams(max_new_tokens=max_new_tokens))


async def first_token(call) -> None:
    async for reply in call:
        if reply.token_ids:
            return


@pytest.mark.parametrize("authenticated", [False, True], ids=["by-address", "by-token"])
def test_a_client_over_max_streams_per_client_gets_resource_exhausted(prompts, authenticated):
    llm = SlowLLM(pace=0.02)
    core = Orchestrator(settings(max_streams_per_client=1), prompts, FakeVision(), llm)
    tokens = ("alice-token", "bob-token") if authenticated else ()
    alice = (("authorization", "Bearer alice-token"),) if authenticated else ()
    bob = (("authorization", "Bearer bob-token"),) if authenticated else ()

    async def run():
        async with serving(core, tokens) as stub:
            held = stub.GenerateStream(text_request(500), metadata=alice, timeout=30)
            await first_token(held)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(text_request(1), metadata=alice, timeout=30)
            other = await stub.Generate(text_request(1), metadata=bob, timeout=30) if authenticated else None
            held.cancel()
            for _ in range(100):  # the slot is given back as the cancelled call ends
                if not llm.open:
                    break
                await asyncio.sleep(0.02)
            after = await stub.Generate(text_request(1), metadata=alice, timeout=30)
            return refused.value, other, after

    refused, other, after = asyncio.run(run())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 1 per client (max_streams_per_client)" in refused.details()
    assert ("token " if authenticated else "peer ipv4:127.0.0.1 ") in refused.details()
    assert "alice-token" not in refused.details()
    if authenticated:
        assert other.finish_reason == "length"  # another token is another client
    assert after.finish_reason == "length" and not llm.open


def test_the_client_deadline_reaches_the_core_and_cancelling_stops_the_llm_stream(prompts):
    llm = SlowLLM(pace=0.02)
    core = Orchestrator(settings(), prompts, FakeVision(), llm)

    async def run():
        async with serving(core) as stub:
            started = time.monotonic()
            call = stub.GenerateStream(text_request(2000), timeout=20)
            await first_token(call)
            assert llm.open == 1
            call.cancel()
            for _ in range(500):
                if not llm.open:
                    break
                await asyncio.sleep(0.01)
            stopped = time.monotonic()
            unlimited = await stub.Generate(text_request(1))
            return started, stopped, unlimited

    started, stopped, unlimited = asyncio.run(run())
    assert llm.open == 0 and stopped - started < 10  # 2000 tokens would take 40 s
    remaining = llm.requests[0].deadline - started
    assert 18 < remaining <= 20.5  # gRPC's clock and ours differ by milliseconds, more on a loaded machine
    assert unlimited.finish_reason == "length" and llm.requests[1].deadline is None


def test_a_deadline_shorter_than_the_generation_ends_it(prompts):
    llm = SlowLLM(pace=0.02)
    core = Orchestrator(settings(), prompts, FakeVision(), llm)

    async def run():
        async with serving(core) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Generate(text_request(2000), timeout=0.5)
            for _ in range(100):
                if not llm.open:
                    break
                await asyncio.sleep(0.01)
            return late.value, llm.open

    late, still_open = asyncio.run(run())
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED and still_open == 0


def test_the_vision_workers_request_limit_admits_the_largest_batch_the_orchestrator_sends():
    from orchestrator.vision_workers import MAX_BATCH_BYTES
    from vision_worker.settings import vision_settings

    vision = vision_settings(env={})
    # A batch holds at most MAX_BATCH_BYTES of images, or one larger image alone; and the frames of
    # a video (PNG, at most VideoLimits.max_frame_pixels) are images too.
    frame_png = 3 * settings().video.max_frame_pixels * 1.01
    largest_batch = max(MAX_BATCH_BYTES, vision.limits.max_image_bytes, frame_png)
    assert vision.grpc.max_receive_message_bytes >= largest_batch + (1 << 20)  # and the message's own fields
    assert settings().limits.max_image_bytes <= vision.limits.max_image_bytes
