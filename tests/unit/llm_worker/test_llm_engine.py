"""The engine against Hugging Face's own LLaVA ``generate`` on tiny packs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from llm_worker.engine import GenerationRequest, GenerationStep, LLMEngine, SamplingOptions
from llm_worker.testing import HFReference, hf_reference, llava_prompt, random_images
from squint.errors import InvalidRequest
from squint.packs import ModelPack

MAX_NEW_TOKENS = 12


def _run(engine: LLMEngine, ref: HFReference, **options: object) -> list[GenerationStep]:
    sampling = SamplingOptions(**{"max_new_tokens": MAX_NEW_TOKENS, **options})
    return list(engine.generate(GenerationRequest(ref.input_ids, ref.visual_embeds, sampling)))


def _tokens(steps: list[GenerationStep]) -> tuple[int, ...]:
    return tuple(step.token_id for step in steps)


@pytest.fixture(scope="module")
def reference(
    llm_pack: Callable[[str], ModelPack], hf_model_for: Callable[[str], LlavaForConditionalGeneration]
) -> Callable[[str, int], HFReference]:
    """``reference(shape, image_seed)``: HF greedy output for two images drawn with that seed."""
    refs: dict[tuple[str, int], HFReference] = {}

    def get(shape: str, image_seed: int) -> HFReference:
        if (shape, image_seed) not in refs:
            refs[shape, image_seed] = hf_reference(
                llm_pack(shape).llava_dir,
                random_images(2, seed=image_seed),
                llava_prompt(2),
                MAX_NEW_TOKENS,
                model=hf_model_for(shape),
            )
        return refs[shape, image_seed]

    return get


@pytest.mark.parametrize("shape", ["default", "alt"])
def test_greedy_equals_hf_generate_token_for_token(
    shape: str, engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    engine = engine_for(shape)
    outputs = {}
    for image_seed in (1, 2):
        ref = reference(shape, image_seed)
        assert ref.visual_embeds is not None and ref.visual_embeds.shape[1] == engine.hidden_size
        assert int((ref.input_ids == engine.image_token_index).sum()) == ref.visual_embeds.shape[0]
        steps = _run(engine, ref)
        assert _tokens(steps) == ref.tokens
        outputs[image_seed] = _tokens(steps)
    # The answer depends on the images; a model that ignored them would prove nothing above.
    assert outputs[1] != outputs[2]


def test_text_only_prompt_equals_hf_generate(
    llm_pack: Callable[[str], ModelPack],
    engine_for: Callable[[str], LLMEngine],
    hf_model_for: Callable[[str], LlavaForConditionalGeneration],
) -> None:
    processor = AutoProcessor.from_pretrained(llm_pack("alt").llava_dir)
    input_ids = processor(text="USER: Say something nice. ASSISTANT:", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = hf_model_for("alt").generate(input_ids=input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    for visual in (None, torch.zeros(0, engine_for("alt").hidden_size)):
        request = GenerationRequest(input_ids[0], visual, SamplingOptions(max_new_tokens=MAX_NEW_TOKENS))
        steps = list(engine_for("alt").generate(request))
        assert _tokens(steps) == tuple(expected[0, input_ids.shape[1] :].tolist())


def test_sampling_equals_hf_generate_with_the_same_seed(
    engine_for: Callable[[str], LLMEngine],
    hf_model_for: Callable[[str], LlavaForConditionalGeneration],
    llm_pack: Callable[[str], ModelPack],
) -> None:
    options = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3)
    processor = AutoProcessor.from_pretrained(llm_pack("alt").llava_dir)
    inputs = processor(images=random_images(2, seed=1), text=llava_prompt(2), return_tensors="pt")
    torch.manual_seed(7)
    with torch.inference_mode():
        expected = hf_model_for("alt").generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, **options)
    ref = hf_reference(
        llm_pack("alt").llava_dir, random_images(2, seed=1), llava_prompt(2), 1, model=hf_model_for("alt")
    )
    steps = _run(engine_for("alt"), ref, seed=7, **options)
    assert _tokens(steps) == tuple(expected[0, inputs["input_ids"].shape[1] :].tolist())


def test_sampling_is_reproducible_with_a_seed(
    engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    engine, ref = engine_for("alt"), reference("alt", 1)
    options = dict(temperature=1.5, top_p=0.95)
    first = _tokens(_run(engine, ref, seed=123, **options))
    assert first == _tokens(_run(engine, ref, seed=123, **options))
    others = {_tokens(_run(engine, ref, seed=seed, **options)) for seed in (1, 2, 3)}
    assert others != {first}
    # Hot sampling must leave the greedy path somewhere, or the test samples nothing.
    assert any(tokens != ref.tokens for tokens in others | {first})


def test_max_new_tokens_ends_with_length(
    engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    steps = _run(engine_for("alt"), reference("alt", 1), max_new_tokens=5)
    assert _tokens(steps) == reference("alt", 1).tokens[:5]
    assert [s.finish_reason for s in steps] == [None, None, None, None, "length"]


def test_stop_token_id_ends_with_stop_and_yields_that_token(
    engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    ref = reference("alt", 1)
    stop_id = ref.tokens[3]
    first = ref.tokens.index(stop_id)
    steps = _run(engine_for("alt"), ref, stop_token_ids=(stop_id,))
    assert _tokens(steps) == ref.tokens[: first + 1]
    assert steps[-1].finish_reason == "stop"
    assert all(s.finish_reason is None for s in steps[:-1])


def test_eos_ends_with_stop(
    engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    engine, ref = engine_for("alt"), reference("alt", 1)
    # The tiny model rarely says </s>; declare the third greedy token an end-of-sequence id.
    as_eos = LLMEngine(
        engine._language_model,
        engine._lm_head,
        engine._tokenizer,
        image_token_index=engine.image_token_index,
        eos_token_ids=(ref.tokens[2],),
        max_context=engine.max_context,
    )
    steps = _run(as_eos, ref)
    assert _tokens(steps) == ref.tokens[: ref.tokens.index(ref.tokens[2]) + 1]
    assert steps[-1].finish_reason == "stop"


def test_stop_string_ends_with_stop(
    llm_pack: Callable[[str], ModelPack],
    engine_for: Callable[[str], LLMEngine],
    reference: Callable[[str, int], HFReference],
) -> None:
    ref = reference("alt", 1)
    tokenizer = AutoTokenizer.from_pretrained(llm_pack("alt").llava_dir)
    text = tokenizer.decode(list(ref.tokens), skip_special_tokens=True)
    stop = text[4:6]
    assert stop.strip(), f"pick another slice of {text!r}"
    # The first step whose decoded output contains the stop string is the last.
    expected = next(
        n
        for n in range(1, len(ref.tokens) + 1)
        if stop in tokenizer.decode(list(ref.tokens[:n]), skip_special_tokens=True)
    )
    steps = _run(engine_for("alt"), ref, stop=("never said", stop))
    assert _tokens(steps) == ref.tokens[:expected]
    assert steps[-1].finish_reason == "stop"


def test_cancellation_ends_the_stream_without_a_reason(
    engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    ref = reference("alt", 1)
    seen: list[GenerationStep] = []
    request = GenerationRequest(ref.input_ids, ref.visual_embeds, SamplingOptions(max_new_tokens=MAX_NEW_TOKENS))
    for step in engine_for("alt").generate(request, is_cancelled=lambda: len(seen) >= 3):
        seen.append(step)
    assert _tokens(seen) == ref.tokens[:3]
    assert seen[-1].finish_reason is None


def test_placeholder_and_visual_row_mismatch_names_both_numbers(
    engine_for: Callable[[str], LLMEngine], reference: Callable[[str, int], HFReference]
) -> None:
    engine, ref = engine_for("alt"), reference("alt", 1)
    assert ref.visual_embeds is not None
    n = ref.visual_embeds.shape[0]
    with pytest.raises(InvalidRequest, match=f"visual_embeds has {n - 1} rows but input_ids holds {n} image"):
        engine.generate(GenerationRequest(ref.input_ids, ref.visual_embeds[:-1]))
    with pytest.raises(InvalidRequest, match=f"visual_embeds has 0 rows but input_ids holds {n} image placeholder"):
        engine.generate(GenerationRequest(ref.input_ids, None))
    text_ids = ref.input_ids[ref.input_ids != engine.image_token_index]
    with pytest.raises(InvalidRequest, match=f"visual_embeds has {n} rows but input_ids holds 0 image placeholder"):
        engine.generate(GenerationRequest(text_ids, ref.visual_embeds))


def test_malformed_requests_are_rejected_with_the_reason(engine_for: Callable[[str], LLMEngine]) -> None:
    engine = engine_for("alt")
    ids = torch.tensor([1, 5, 6], dtype=torch.long)
    cases = [
        (
            GenerationRequest(torch.tensor([engine.image_token_index]), torch.zeros(1, engine.hidden_size + 1)),
            rf"shape \[1, {engine.hidden_size + 1}\]; expected \[n_visual_tokens, {engine.hidden_size}\]",
        ),
        (
            GenerationRequest(
                torch.tensor([engine.image_token_index]), torch.zeros(1, engine.hidden_size, dtype=torch.long)
            ),
            "visual_embeds must be floating point",
        ),
        (GenerationRequest(torch.zeros(0, dtype=torch.long)), "non-empty 1-D"),
        (GenerationRequest(ids[None]), "non-empty 1-D"),
        (GenerationRequest(ids.float()), "integer token ids"),
        (GenerationRequest(torch.tensor([1, engine.vocab_size])), f"token id {engine.vocab_size}, outside"),
        (
            GenerationRequest(ids, sampling=SamplingOptions(max_new_tokens=engine.max_context)),
            f"above this model's context of {engine.max_context}; lower max_new_tokens to {engine.max_context - 3}",
        ),
        (GenerationRequest(ids, sampling=SamplingOptions(stop_token_ids=(-1,))), "stop_token_ids holds -1"),
    ]
    for request, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            engine.generate(request)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens is 0"),
        (dict(temperature=-1.0), "temperature is -1.0"),
        (dict(temperature=float("nan")), "temperature is nan"),
        (dict(top_k=-1), "top_k is -1"),
        (dict(top_p=0.0), r"top_p is 0.0; it must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p is 1.5"),
        (dict(repetition_penalty=0.0), "repetition_penalty is 0.0"),
        (dict(seed=-1), "seed is -1"),
        (dict(stop=("",)), "empty string"),
    ],
)
def test_sampling_options_check_their_bounds(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        SamplingOptions(**options)


def test_load_keeps_only_the_language_half(
    engine_for: Callable[[str], LLMEngine], llm_pack: Callable[[str], ModelPack]
) -> None:
    engine = engine_for("alt")
    names = [name for name, _ in engine._language_model.named_modules()]
    assert names and not any("vision" in name or "projector" in name for name in names)
    assert engine.eos_token_ids == (2,)
    assert engine.dtype == torch.float32 and engine.device == torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LLMEngine.load(llm_pack("alt").root)
    half = LLMEngine.load(llm_pack("alt").llava_dir, dtype="float16")
    assert half.dtype == torch.float16
