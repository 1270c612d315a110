"""The orchestrator core against fake clients: validation, ordering, stop strings, usage."""

import asyncio
import dataclasses

import numpy as np
import pytest
from squint_test_media import make_video

from orchestrator.core import Orchestrator
from orchestrator.llm_client import LLMStep
from orchestrator.prompting import PromptBuilder
from orchestrator.settings import OrchestratorSettings
from orchestrator.types import (
    Finished,
    GenerationRequest,
    ImageChunk,
    Message,
    Sampling,
    TextChunk,
    TextDelta,
    VideoChunk,
)
from orchestrator.vision_client import EncodedMedia, MediaAnalysis
from orchestrator.visual_tokens import VisualTokens
from squint.errors import BudgetExceeded, InvalidRequest


class FakeVision:
    """Each image analyses to a ladder from ``rows`` down to 1 token; encode honours max_tokens."""

    def __init__(self, rows=4, hidden=64, smallest=1):
        self.rows, self.hidden, self.calls, self.analyzed = rows, hidden, [], []
        self.least = smallest

    async def smallest(self, context):
        return self.least

    async def analyze(self, images, keys, context):
        self.analyzed.append(images)
        descriptor = np.ones(4, np.float32) / 2
        return [
            (MediaAnalysis(self.rows, tuple(range(self.rows, 0, -1)), None, descriptor, 576, (24, 24), False, "w"), "w")
            for _ in images
        ]

    async def encode(self, images, keys, preferred, context):
        self.calls.append((images, context))
        out = []
        for i, image in enumerate(images):
            rows = min(self.rows, image.max_tokens or self.rows)
            tokens = VisualTokens(rows, np.full((rows, self.hidden), i, np.float32))
            out.append((EncodedMedia(tokens, 576, rows, False, f"k{i}", 1.0, context.compressor or "none", "w"), "w"))
        return out


class FakeLLM:
    def __init__(self, tokens):
        self.tokens, self.requests = tokens, []

    async def generate(self, request):
        self.requests.append(request)
        for token in self.tokens:
            yield LLMStep((token,), "")
        yield LLMStep((), "length")


@pytest.fixture(scope="module")
def prompts(tiny_pack):
    return PromptBuilder(tiny_pack)


def collect(orchestrator, request):
    async def run():
        return [event async for event in orchestrator.generate(request)]

    return asyncio.run(run())


def request(*chunks, **kwargs):
    return GenerationRequest(chunks=chunks, request_id="r", **kwargs)


def test_images_are_encoded_spliced_and_accounted(prompts):
    answer = prompts.tokenizer("hi", add_special_tokens=False)["input_ids"]
    vision, llm = FakeVision(rows=4), FakeLLM(answer)
    core = Orchestrator(OrchestratorSettings(), prompts, vision, llm)
    events = collect(core, request(ImageChunk(b"a"), TextChunk("q1"), ImageChunk(b"b"), compressor="avgpool"))
    [sent] = llm.requests
    assert sent.input_ids.tolist().count(prompts.image_token_id) == 8
    assert sent.visual_embeds.shape == (8, 64) and sent.visual_embeds[4:].min() == 1  # second image second
    assert [i.label for i in vision.calls[0][0]] == ["chunks[0].image", "chunks[2].image"]
    assert vision.calls[0][1].question == "q1"  # the question, for text-guided compressors
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    final = events[-1]
    assert isinstance(final, Finished) and text == "hi" and final.finish_reason == "length"
    assert [(m.chunk_index, m.tokens_after) for m in final.usage.media] == [(0, 4), (2, 4)]
    assert final.usage.visual_tokens == 8 and final.usage.completion_tokens == len(answer)


def test_stop_string_ends_generation_early(prompts):
    llm = FakeLLM(prompts.tokenizer("ab STOP cd", add_special_tokens=False)["input_ids"])
    core = Orchestrator(OrchestratorSettings(), prompts, FakeVision(), llm)
    events = collect(core, request(TextChunk("q"), sampling=Sampling(stop=("STOP",))))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "ab "
    assert events[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("req", "error", "message"),
    [
        (request(), InvalidRequest, "chunks is empty"),
        (request(VideoChunk(b"")), InvalidRequest, r"chunks\[0\].video.data is empty"),
        (
            request(TextChunk("q"), allocation_policy="greedy"),
            InvalidRequest,
            "allocation_policy 'greedy' is not one of",
        ),
        (request(TextChunk("q"), sampling=Sampling(max_new_tokens=10**6)), InvalidRequest, "the limit is 2048"),
        (request(TextChunk("q"), sampling=Sampling(top_p=2.0)), InvalidRequest, "top_p is 2.0"),
        (request(TextChunk("x" * 70_000)), InvalidRequest, "max_text_chars"),
        (request(TextChunk("q"), pixel_dedup_threshold=float("nan")), InvalidRequest, "pixel_dedup_threshold is nan"),
        (request(TextChunk("q"), pixel_dedup_threshold=-0.5), InvalidRequest, "pixel_dedup_threshold is -0.5"),
        (request(TextChunk("q"), system_prompt="y" * 70_000), InvalidRequest, "max_text_chars"),
        (
            request(TextChunk("q"), sampling=Sampling(repetition_penalty=float("nan"))),
            InvalidRequest,
            "repetition_penalty is nan",
        ),
        (request(TextChunk("q"), sampling=Sampling(temperature=float("inf"))), InvalidRequest, "temperature is inf"),
        (request(TextChunk("q"), sampling=Sampling(top_k=2**40)), InvalidRequest, "at most the vocabulary size"),
        (request(TextChunk("q"), sampling=Sampling(stop_token_ids=(10**6,))), InvalidRequest, "outside the vocabulary"),
        (request(TextChunk("q"), sampling=Sampling(stop=("s" * 300,))), InvalidRequest, "max_stop_chars"),
        (request(TextChunk("look: <image>")), InvalidRequest, r"chunks\[0\].text contains '<image>'"),
        (request(TextChunk("q"), system_prompt="<image>"), InvalidRequest, "system_prompt contains '<image>'"),
    ],
)
def test_bad_requests_are_refused_before_any_work(prompts, req, error, message):
    vision, llm = FakeVision(), FakeLLM([])
    core = Orchestrator(OrchestratorSettings(), prompts, vision, llm)
    with pytest.raises(error, match=message):
        collect(core, req)
    assert not vision.calls and not llm.requests


def test_the_budget_is_allocated_across_images(prompts):
    vision = FakeVision(rows=10)
    core = Orchestrator(OrchestratorSettings(), prompts, vision, FakeLLM([]))
    events = collect(core, request(ImageChunk(b"a"), ImageChunk(b"b"), TextChunk("q"), visual_token_budget=13))
    assert [i.max_tokens for i in vision.calls[0][0]] == [7, 6]  # uniform: earlier items keep more
    usage = events[-1].usage
    assert usage.visual_tokens == 13 and usage.allocation_policy == "uniform" and usage.visual_token_budget == 13
    assert [m.allocated_tokens for m in usage.media] == [7, 6]


def test_a_budget_below_one_token_per_image_is_resource_exhausted(prompts):
    core = Orchestrator(OrchestratorSettings(), prompts, FakeVision(), FakeLLM([]))
    with pytest.raises(BudgetExceeded, match="need at least 2 visual tokens"):
        collect(core, request(ImageChunk(b"a"), ImageChunk(b"b"), visual_token_budget=1))


def test_what_cannot_fit_is_refused_before_any_image_is_analysed(prompts):
    # Each image can get no smaller than 4 tokens: three need 12, more than the budget of 10.
    vision = FakeVision(rows=10, smallest=4)
    core = Orchestrator(OrchestratorSettings(), prompts, vision, FakeLLM([]))
    with pytest.raises(BudgetExceeded, match="the 3 media items need at least 12 visual tokens"):
        collect(core, request(ImageChunk(b"a"), ImageChunk(b"b"), ImageChunk(b"c"), visual_token_budget=10))
    assert not vision.analyzed
    # Two fit (8 <= 10): analysed and allocated as before.
    collect(core, request(ImageChunk(b"a"), ImageChunk(b"b"), visual_token_budget=10))
    assert len(vision.analyzed) == 1
    # A compressor whose smallest count only an image can tell (0): no early refusal.
    unknown = FakeVision(rows=10, smallest=0)
    collect(
        Orchestrator(OrchestratorSettings(), prompts, unknown, FakeLLM([])),
        request(ImageChunk(b"a"), visual_token_budget=10),
    )
    assert len(unknown.analyzed) == 1


def test_a_context_limit_derives_the_budget(prompts):
    vision = FakeVision(rows=50)
    core = Orchestrator(OrchestratorSettings(), prompts, vision, FakeLLM([]))
    text_only = len(prompts.render((ImageChunk(b"a"), TextChunk("q"))).token_ids) - 1
    events = collect(
        core,
        request(
            ImageChunk(b"a"), TextChunk("q"), context_limit=text_only + 8 + 20, sampling=Sampling(max_new_tokens=8)
        ),
    )
    assert events[-1].usage.visual_tokens == 20 and events[-1].usage.visual_token_budget == 20


def conversation(*messages, **kwargs):
    return GenerationRequest.of_conversation(
        tuple(Message(role, tuple(chunks)) for role, chunks in messages), "r", **kwargs
    )


def test_a_conversation_is_rendered_with_its_roles_and_one_budget_covers_every_image(prompts):
    answer = prompts.tokenizer("ok", add_special_tokens=False)["input_ids"]
    vision, llm = FakeVision(rows=10), FakeLLM(answer)
    core = Orchestrator(OrchestratorSettings(), prompts, vision, llm)
    req = conversation(
        ("system", [TextChunk("Be brief.")]),
        ("user", [ImageChunk(b"a"), TextChunk("What is this?")]),
        ("assistant", [TextChunk("A circle.")]),
        ("user", [ImageChunk(b"b"), TextChunk("And this one?")]),
        visual_token_budget=13,
    )
    events = collect(core, req)
    [sent] = llm.requests
    text = prompts.tokenizer.decode([t for t in sent.input_ids.tolist() if t != prompts.image_token_id])
    assert (
        text.index("Be brief.")
        < text.index("USER: ")
        < text.index("What is this?")
        < text.index("ASSISTANT: A circle.")
    )
    assert text.index("A circle.") < text.index("And this one?") < text.rindex("ASSISTANT:")
    assert [i.label for i in vision.calls[0][0]] == ["messages[1].content[0].image", "messages[3].content[0].image"]
    assert [i.max_tokens for i in vision.calls[0][0]] == [7, 6]  # one budget over both messages' images
    assert vision.calls[0][1].question == "And this one?"  # the last user message
    assert [m.chunk_index for m in events[-1].usage.media] == [1, 4]  # positions among all the parts


def test_one_user_message_renders_as_the_single_turn_form(prompts):
    single, as_conversation = FakeLLM([]), FakeLLM([])
    for llm, req in (
        (single, request(ImageChunk(b"a"), TextChunk("q"))),
        (as_conversation, conversation(("user", [ImageChunk(b"a"), TextChunk("q")]))),
    ):
        collect(Orchestrator(OrchestratorSettings(), prompts, FakeVision(), llm), req)
    assert single.requests[0].input_ids.tolist() == as_conversation.requests[0].input_ids.tolist()


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [("user", [TextChunk("q")]), ("assistant", [TextChunk("a")])],
            r"messages\[1\] is a assistant message; the last",
        ),
        ([("assistant", [ImageChunk(b"a")]), ("user", [TextChunk("q")])], r"messages\[0\].content\[0\]: a assistant"),
        ([("robot", [TextChunk("q")])], r"messages\[0\].role is 'robot'"),
        ([("user", [])], r"messages\[0\].content is empty"),
        ([("user", [TextChunk("see <image>")])], r"messages\[0\].content\[0\].text contains '<image>'"),
    ],
)
def test_bad_conversations_are_refused_naming_the_message(prompts, messages, message):
    vision, llm = FakeVision(), FakeLLM([])
    with pytest.raises(InvalidRequest, match=message):
        collect(Orchestrator(OrchestratorSettings(), prompts, vision, llm), conversation(*messages))
    assert not vision.calls and not llm.requests


def test_an_image_cap_takes_its_largest_level_within_whatever_the_budget(prompts):
    vision = FakeVision(rows=10)
    core = Orchestrator(OrchestratorSettings(), prompts, vision, FakeLLM([]))
    collect(core, request(ImageChunk(b"a", max_tokens=3), ImageChunk(b"b"), TextChunk("q"), visual_token_budget=100))
    assert [i.max_tokens for i in vision.calls[0][0]] == [3, 10]


# Video frames: repeats skipped before CLIP, near-duplicates dropped after


class FeatureVision(FakeVision):
    """Like FakeVision, with a descriptor per distinct frame (a one-hot of its content hash):
    identical frames are duplicates after CLIP, different ones are not."""

    async def analyze(self, images, keys, context):
        analyses = await super().analyze(images, keys, context)
        out = []
        for (analysis, worker), key in zip(analyses, keys, strict=True):
            descriptor = np.zeros(256, np.float32)
            descriptor[int(key[:2], 16)] = 1.0
            out.append((dataclasses.replace(analysis, descriptor=descriptor), worker))
        return out


def four_scenes() -> VideoChunk:
    """32 frames: 4 flat colours, each held for 8 frames."""
    return VideoChunk(make_video(32, size=(96, 64), hold=8), max_frames=32)


def test_frames_repeating_pixels_are_skipped_before_clip_and_the_same_frames_kept(prompts):
    skipping, read_all = FeatureVision(), FeatureVision()
    core = Orchestrator(OrchestratorSettings(), prompts, skipping, FakeLLM([1]))
    usage = collect(core, request(four_scenes(), TextChunk("What happens?")))[-1].usage
    baseline = Orchestrator(OrchestratorSettings(), prompts, read_all, FakeLLM([1]))
    before = collect(baseline, request(four_scenes(), TextChunk("What happens?"), pixel_dedup_threshold=2.0))[-1].usage

    assert [len(images) for images in skipping.analyzed] == [4]  # one CLIP forward per scene
    assert [len(images) for images in read_all.analyzed] == [32]
    assert (usage.frames.sampled, usage.frames.analysed, usage.frames.kept) == (32, 4, 4)
    assert (before.frames.sampled, before.frames.analysed, before.frames.kept) == (32, 32, 4)
    kept = [i for i, m in enumerate(usage.media) if m.tokens_after]
    assert kept == [i for i, m in enumerate(before.media) if m.tokens_after] == [0, 8, 16, 24]
    for i, m in enumerate(usage.media):
        if i not in kept:
            assert m.skipped_before_clip and m.duplicate_of == 8 * (i // 8) and m.tokens_after == 0
    assert not any(m.skipped_before_clip for m in before.media)
    assert core.metrics.clip_forwards_saved._value.get() == 28
    assert baseline.metrics.clip_forwards_saved._value.get() == 0


def test_a_skipped_frame_names_the_frame_kept_when_the_one_it_repeats_is_dropped_after_clip(prompts):
    # FakeVision gives every frame the same features: after CLIP only the first frame is kept.
    vision = FakeVision()
    core = Orchestrator(OrchestratorSettings(), prompts, vision, FakeLLM([1]))
    usage = collect(core, request(four_scenes(), TextChunk("What happens?")))[-1].usage
    assert [len(images) for images in vision.analyzed] == [4]
    assert (usage.frames.analysed, usage.frames.kept) == (4, 1)
    assert {m.duplicate_of for m in usage.media[1:]} == {0}


def test_de_duplication_off_analyses_every_frame(prompts):
    vision = FakeVision()
    core = Orchestrator(OrchestratorSettings(), prompts, vision, FakeLLM([1]))
    usage = collect(core, request(four_scenes(), TextChunk("What happens?"), dedup_threshold=1.5))[-1].usage
    assert [len(images) for images in vision.analyzed] == [32]
    assert (usage.frames.sampled, usage.frames.analysed, usage.frames.kept) == (32, 32, 32)
