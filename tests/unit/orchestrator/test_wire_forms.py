"""One typed form per side of each wire, one conversion each: the vision worker's record to the
orchestrator's, and the compressor's in-LLM directive through the orchestrator to the LLM
worker's spans, its reference mode kept per image."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from compressor_plugins.protocol import LLMDirective
from llm_worker.spans import ImageSpan, spans_from_tensors
from orchestrator.core import Orchestrator
from orchestrator.llm_client import LLMRequest, LLMStep, TritonLLMClient
from orchestrator.prompting import PromptBuilder
from orchestrator.service import media_usage_to_proto
from orchestrator.settings import OrchestratorSettings
from orchestrator.types import GenerationRequest, ImageChunk, MediaUsage, Sampling, TextChunk
from orchestrator.vision_client import EncodedMedia, MediaAnalysis, encoded_media_from_proto
from orchestrator.visual_tokens import VisualTokens
from squint.generate.v1 import generate_pb2
from squint.vision.v1 import vision_worker_pb2 as pb
from vision_worker.encoder import EncodedItem
from vision_worker.service import encoded_image_to_proto

HIDDEN = 64


def _item(directive: LLMDirective | None, complexity: float | None) -> EncodedItem:
    tokens = np.arange(3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN)
    return EncodedItem(
        tokens=tokens,
        tokens_before=576,
        tokens_after=3,
        cache_hit=True,
        cache_key="squint:tokens:v1:abc",
        encode_ms=12.5,
        compressor="staged_pool",
        content_hash="f00d",
        covers=((0, 1), (2,), (3, 4, 5)),
        complexity=complexity,
        directive=directive,
        grid=(24, 24),
    )


@pytest.mark.parametrize(
    ("directive", "complexity"),
    [(LLMDirective(layer=2, stride=4, shape="2d", reference_mode=True), 0.25), (None, None)],
)
def test_an_encoded_item_crosses_the_vision_wire_whole(directive, complexity):
    item = _item(directive, complexity)
    wire = pb.EncodedImage.FromString(encoded_image_to_proto(item, with_coverage=True).SerializeToString())
    media = encoded_media_from_proto(wire, "vision-0:50051", "chunks[0].image")
    np.testing.assert_array_equal(media.tokens.materialize(), item.tokens)
    assert media.directive == directive  # the compressor's own dataclass on this side too
    assert (media.tokens_before, media.tokens_after, media.cache_hit, media.cache_key, media.encode_ms) == (
        576,
        3,
        True,
        "squint:tokens:v1:abc",
        12.5,
    )
    assert (media.compressor, media.grid, media.complexity, media.coverage) == (
        "staged_pool",
        (24, 24),
        complexity,
        item.covers,
    )
    assert media.worker == "vision-0:50051"
    without = encoded_image_to_proto(item, with_coverage=False)
    assert encoded_media_from_proto(without, "w", "chunks[0].image").coverage == ()


def test_a_media_usage_crosses_the_public_wire_whole():
    usage = MediaUsage(3, "video_frame", 576, 36, "dfmr", True, "k", 4.5, "vision-1", grid=(24, 24), complexity=0.5)
    usage = dataclasses.replace(
        usage, coverage=((0,), (1, 2)), allocated_tokens=36, duplicate_of=1, timestamp=2.25, features_cached=True
    )
    wire = generate_pb2.MediaUsage.FromString(media_usage_to_proto(usage).SerializeToString())
    same_names = [f.name for f in dataclasses.fields(MediaUsage) if f.name not in ("grid", "coverage", "timestamp")]
    assert {name: getattr(wire, name) for name in same_names} == {name: getattr(usage, name) for name in same_names}
    assert (wire.grid_height, wire.grid_width) == usage.grid and wire.timestamp_seconds == usage.timestamp
    assert tuple(tuple(c.patches) for c in wire.coverage) == usage.coverage
    bare = media_usage_to_proto(MediaUsage(0, "image", 576, 576, "none", False, "", 0.0, "w"))
    assert not bare.HasField("complexity") and not bare.HasField("duplicate_of")
    assert not bare.HasField("timestamp_seconds")


class DirectedVision:
    """Every image comes back with the next of ``directives`` (None: pooled before the LLM)."""

    def __init__(self, directives, rows: int = 16) -> None:
        self.directives, self.rows, self.contexts = list(directives), rows, []

    async def smallest(self, context):
        return 1

    async def analyze(self, images, keys, context):
        self.contexts.append(context)
        descriptor = np.ones(4, np.float32) / 2
        analysis = MediaAnalysis(self.rows, (self.rows,), None, descriptor, 576, (24, 24), False, "w")
        return [(analysis, "w") for _ in images]

    async def encode(self, images, keys, preferred, context):
        self.contexts.append(context)
        out = []
        for _image, directive in zip(images, self.directives, strict=True):
            tokens = VisualTokens(self.rows, np.zeros((self.rows, HIDDEN), np.float32))
            media = EncodedMedia(tokens, 576, self.rows, False, "k", 1.0, "staged_pool", "w", directive=directive)
            out.append((media, "w"))
        return out


class RecordingLLM:
    def __init__(self) -> None:
        self.requests: list[LLMRequest] = []

    async def generate(self, request):
        self.requests.append(request)
        yield LLMStep((), "length")


@pytest.fixture(scope="module")
def prompts(tiny_pack):
    return PromptBuilder(tiny_pack)


def _generate(core: Orchestrator, *chunks, **kwargs) -> None:
    async def run():
        request = GenerationRequest(chunks=chunks, request_id="r-1", **kwargs)
        return [event async for event in core.generate(request)]

    asyncio.run(run())


def _sent_tensors(request: LLMRequest) -> dict[str, np.ndarray]:
    """The span tensors the Triton client puts on the wire for ``request`` (no server needed)."""

    async def inputs():
        client = TritonLLMClient("127.0.0.1:1", "squint_llm", 1 << 20, 30)
        # What a CPU model's metadata says; a request with spans goes to the staged engine.
        assert client.model_for(request) == ("squint_llm_staged" if request.image_spans else "squint_llm")
        client._visual_dtypes[client.model_for(request)] = np.dtype(np.float32)
        try:
            return await client._inputs(request)
        finally:
            await client.close()

    dtypes = {"INT64": np.int64, "BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32}
    return {
        t.name(): np.frombuffer(t._get_content(), dtypes[t.datatype()]).reshape(t.shape())
        for t in asyncio.run(inputs())
        if t.name() in ("image_spans", "reference_mode")
    }


def test_each_images_directive_reaches_the_llm_worker_with_its_own_reference_mode(prompts):
    directives = [
        LLMDirective(layer=1, stride=4, shape="1d", reference_mode=True),
        None,  # this image was pooled before the LLM: no span
        LLMDirective(layer=3, stride=2, shape="2d", reference_mode=False),
    ]
    vision, llm = DirectedVision(directives), RecordingLLM()
    core = Orchestrator(OrchestratorSettings(), prompts, vision, llm)
    _generate(core, ImageChunk(b"a"), ImageChunk(b"b"), ImageChunk(b"c"), TextChunk("q"), compressor="staged_pool")
    [request] = llm.requests
    starts = [i for i, t in enumerate(request.input_ids.tolist()) if t == prompts.image_token_id][::16]
    assert request.image_spans == (
        ImageSpan(starts[0], 16, 1, 4, "1d", reference_mode=True),
        ImageSpan(starts[2], 16, 3, 2, "2d", reference_mode=False),
    )
    tensors = _sent_tensors(request)
    assert tensors["reference_mode"].tolist() == [True, False]
    assert spans_from_tensors(tensors) == request.image_spans  # what the LLM worker reads back


def test_without_directives_no_span_tensors_are_sent(prompts):
    vision, llm = DirectedVision([None]), RecordingLLM()
    _generate(Orchestrator(OrchestratorSettings(), prompts, vision, llm), ImageChunk(b"a"), TextChunk("q"))
    assert llm.requests[0].image_spans == () and _sent_tensors(llm.requests[0]) == {}


def test_one_vision_context_serves_every_call_of_a_request(prompts):
    vision = DirectedVision([None, None])
    settings = OrchestratorSettings(default_compressor="avgpool")
    core = Orchestrator(settings, prompts, vision, RecordingLLM())
    deadline = 10.0**9
    _generate(
        core,
        TextChunk("what"),
        ImageChunk(b"a"),
        TextChunk("is this"),
        ImageChunk(b"b"),
        compressor_params={"stride": 3},
        deadline=deadline,
    )
    analyze, encode = vision.contexts
    assert analyze is encode
    assert (analyze.compressor, dict(analyze.params), analyze.question) == ("avgpool", {"stride": 3}, "what is this")
    assert (analyze.request_id, analyze.deadline) == ("r-1", deadline)


def test_the_prompt_is_rendered_once_per_request(prompts, monkeypatch):
    renders = []
    render = prompts.render
    monkeypatch.setattr(prompts, "render", lambda *args, **kw: renders.append(args) or render(*args, **kw))
    core = Orchestrator(OrchestratorSettings(), prompts, DirectedVision([None, None]), RecordingLLM())
    _generate(core, ImageChunk(b"a"), ImageChunk(b"b"), TextChunk("q"), context_limit=4096)
    assert len(renders) == 1
    _generate(core, TextChunk("q"), sampling=Sampling(max_new_tokens=1))
    assert len(renders) == 2


def test_a_conversation_crosses_the_wire_and_the_single_turn_form_still_does():
    from orchestrator.service import request_from_proto
    from orchestrator.types import Message
    from squint.errors import InvalidRequest

    pb_ = generate_pb2
    old = request_from_proto(pb_.GenerateRequest(chunks=[pb_.Chunk(text="q")]), "id")
    assert old.chunks == (TextChunk("q"),) and old.messages == () and old.turns == (Message("user", (TextChunk("q"),)),)
    new = request_from_proto(
        pb_.GenerateRequest(
            messages=[
                pb_.Message(role="user", content=[pb_.Chunk(image=pb_.Image(data=b"png")), pb_.Chunk(text="q1")]),
                pb_.Message(role="assistant", content=[pb_.Chunk(text="a1")]),
                pb_.Message(role="user", content=[pb_.Chunk(text="q2")]),
            ]
        ),
        "id",
    )
    assert [m.role for m in new.messages] == ["user", "assistant", "user"]
    assert new.chunks == (ImageChunk(b"png"), TextChunk("q1"), TextChunk("a1"), TextChunk("q2"))
    assert new.chunk_labels()[2] == "messages[1].content[0]" and new.question() == "q2"
    with pytest.raises(InvalidRequest, match="set chunks .* or messages .*, not both"):
        request_from_proto(pb_.GenerateRequest(chunks=[pb_.Chunk(text="q")], messages=[pb_.Message(role="user")]), "id")
    with pytest.raises(InvalidRequest, match=r"messages\[0\].content\[0\] is empty"):
        request_from_proto(pb_.GenerateRequest(messages=[pb_.Message(role="user", content=[pb_.Chunk()])]), "id")
