"""In-LLM staged pooling (LLaVolta, docs/methods.md §2) against the released code's golden data,
and the default mode against a plain layer-by-layer reference computed here.

The golden cases are every ``model_*.npz`` in ``$SQUINT_ORACLES/llavolta`` (held-back cases
included when that folder has them), run through the tiny Llama whose weights sit beside them.
Cases that start from ``inputs_embeds`` go through the engine with every prompt position an
image placeholder: the engine then splices the given embeddings as they are, and a span over
the image block pools it, so no test-only entry point is needed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from compressor_plugins.builtin.staged_pool import StagedPooling
from compressor_plugins.pooling import pool_image_spans
from compressor_plugins.protocol import ImageFeatures, resolve_params
from llm_worker.engine import GenerationRequest, GenerationSequence, LLMEngine, SamplingOptions
from llm_worker.staged import ImageSpan, StagedDecoder, cache_lengths
from squint.errors import InvalidRequest

ORACLES = Path(os.environ["SQUINT_ORACLES"]) / "llavolta"
VISUAL_LENGTH = 576  # LLaVolta's image block (llava/constants.py)
PLACEHOLDER = 127  # an id of the tiny vocabulary used as the image placeholder here
BOS = 1  # HF 4.37 puts it first in generate's output when generating from embeddings
# torch.testing.assert_close's float32 tolerances: logits and hidden states (up to ~4) after four
# layers in float32 match relative to their size, with a floor for values near 0.
FLOAT32 = dict(rtol=1.3e-6, atol=1e-5)


def _cases(kind: str) -> list[Path]:
    """The golden files of one kind, told apart by the arrays they hold."""
    found = []
    for path in sorted(ORACLES.glob("model_*.npz")):
        with np.load(path) as data:
            names = set(data.files)
        if "out_logits" in names:
            found += [path] if kind == "training" else []
        elif "in_input_ids" in names:
            found += [path] if kind == "generate" else []
        elif "out_prefill_logits" in names:
            found += [path] if kind == "prefill" else []
        else:
            raise AssertionError(f"{path.name} holds {sorted(names)}: a kind of golden case these tests do not know")
    return found


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    """The oracle's model: the README's config with ``tiny_llama_weights.npz``."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    with np.load(ORACLES / "tiny_llama_weights.npz") as weights:
        model.load_state_dict({name: torch.from_numpy(weights[name]) for name in weights.files}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def engine(tiny_llama: LlamaForCausalLM) -> LLMEngine:
    return LLMEngine(
        tiny_llama.model,
        tiny_llama.lm_head,
        None,
        image_token_index=PLACEHOLDER,
        eos_token_ids=(2,),
        max_context=tiny_llama.config.max_position_embeddings,
    )


def _span(data: np.lib.npyio.NpzFile, start: int) -> tuple[ImageSpan, ...]:
    """The golden case's image span, in reference mode (the released code's pooled positions)."""
    if "grouping" in data.files and str(data["grouping"]) == "none":
        return ()
    layer, stride = int(data["layer"]), int(data["stride"])
    return (ImageSpan(start=start, length=VISUAL_LENGTH, layer=layer, stride=stride, reference_mode=True),)


def _from_embeds(embeds: torch.Tensor, spans: tuple[ImageSpan, ...], max_new_tokens: int) -> GenerationRequest:
    """A request whose every position is a placeholder, so ``embeds`` [L, D] are spliced as given."""
    ids = torch.full((embeds.shape[0],), PLACEHOLDER, dtype=torch.long)
    return GenerationRequest(ids, embeds, SamplingOptions(max_new_tokens=max_new_tokens), spans)


def _greedy(engine: LLMEngine, request: GenerationRequest) -> tuple[GenerationSequence, dict[str, list]]:
    """Generate greedily, recording each step's scores and each decode step's position."""
    sequence = engine.start(request)
    seen: dict[str, list] = {"tokens": [], "scores": [], "positions": []}
    while True:
        seen["scores"].append(sequence.logits[0].clone())
        step = sequence.choose()
        seen["tokens"].append(step.token_id)
        if step.finish_reason is not None:
            return sequence, seen
        seen["positions"].append(sequence.position)
        engine.step([sequence])


@pytest.mark.parametrize("case", _cases("prefill"), ids=lambda p: p.stem)
def test_reference_mode_reproduces_the_released_prefill_and_generate(
    case: Path, tiny_llama: LlamaForCausalLM, engine: LLMEngine
) -> None:
    data = np.load(case)
    embeds = torch.from_numpy(data["in_inputs_embeds"])  # [1, L, 64]
    spans = _span(data, int(data["in_images_idx"][0, 0]))
    decoder = StagedDecoder(tiny_llama.model, tiny_llama.lm_head)
    cache = decoder.new_cache()
    with torch.inference_mode():
        prefill = decoder.prefill(embeds, spans, cache)
        logits = decoder.head(prefill.hidden)  # [1, L', vocab]
    np.testing.assert_allclose(logits.numpy(), data["out_prefill_logits"], **FLOAT32)
    np.testing.assert_allclose(prefill.hidden.numpy(), data["out_last_hidden"], **FLOAT32)
    assert cache_lengths(cache, decoder.n_layers) == tuple(data["out_cache_len_after_prefill"].tolist())
    if "out_position_ids_after_pool" in data.files:
        assert prefill.position_ids.tolist() == data["out_position_ids_after_pool"].tolist()

    n_new = len(data["out_generated_tokens"]) - 1
    sequence, seen = _greedy(engine, _from_embeds(embeds[0], spans, n_new))
    n_prompt = embeds.shape[1]
    assert seen["positions"] == list(range(n_prompt, n_prompt + n_new - 1))
    after_prefill = data["out_cache_len_after_prefill"]
    assert sequence.cache_lengths() == tuple((after_prefill + n_new - 1).tolist())
    if spans and spans[0].layer == 0:
        # The released code re-feeds the generated suffix at K = 0 (README: a defect, not to
        # copy): only the prefill's scores and first token are comparable.
        assert seen["tokens"][0] == data["out_generated_tokens"][1]
        np.testing.assert_allclose(seen["scores"][0].numpy(), data["out_generate_scores"][0], **FLOAT32)
        return
    assert [BOS, *seen["tokens"]] == data["out_generated_tokens"].tolist()
    np.testing.assert_allclose(torch.stack(seen["scores"]).numpy(), data["out_generate_scores"], **FLOAT32)
    assert seen["positions"] == data["out_decode_position_ids"].tolist()
    assert sequence.cache_lengths() == tuple(data["out_cache_len_after_decode"].tolist())


def _staged_pool(features: torch.Tensor, layer: int, stride: int):
    """What the vision worker's staged_pool makes of one image's 576 projected tokens."""
    params = resolve_params(StagedPooling, {"layer": layer, "stride": stride})
    side = math.isqrt(features.shape[0])
    return StagedPooling().compress(ImageFeatures(features, (side, side), llm_tokens=features), params)


@pytest.mark.parametrize("case", _cases("generate"), ids=lambda p: p.stem)
def test_reference_mode_reproduces_the_released_generate_from_input_ids(case: Path, engine: LLMEngine) -> None:
    data = np.load(case)
    ids = data["in_input_ids"][0].tolist()
    image = ids.index(-200)  # IMAGE_TOKEN_INDEX
    assert PLACEHOLDER not in ids
    compressed = _staged_pool(torch.from_numpy(data["in_image_features"][0]), int(data["layer"]), int(data["stride"]))
    n_visual = compressed.tokens.shape[0]
    spans: tuple[ImageSpan, ...] = ()
    if compressed.directive is not None:
        d = compressed.directive
        spans = (ImageSpan(image, n_visual, d.layer, d.stride, d.shape, reference_mode=True),)
    prompt = torch.tensor(ids[:image] + [PLACEHOLDER] * n_visual + ids[image + 1 :])
    n_new = len(data["out_generated_tokens"]) - 1
    request = GenerationRequest(prompt, compressed.tokens, SamplingOptions(max_new_tokens=n_new), spans)
    sequence, seen = _greedy(engine, request)

    # Layer 0 saw positions 0..L-1: K = -1 spliced the pooled tokens, K >= 1 all 576.
    assert data["out_prefill_position_ids"].tolist() == [list(range(len(prompt)))]
    assert [BOS, *seen["tokens"]] == data["out_generated_tokens"].tolist()
    np.testing.assert_allclose(torch.stack(seen["scores"]).numpy(), data["out_generate_scores"], **FLOAT32)
    assert seen["positions"] == data["out_decode_position_ids"].tolist()
    assert sequence.cache_lengths() == tuple(data["out_cache_len_after_decode"].tolist())


def test_reference_mode_reproduces_the_released_training_batch(tiny_llama: LlamaForCausalLM) -> None:
    """Right-padded batch: each sample alone gives the reference's logits at its real tokens
    (padding comes after them and they attend causally), its label ids, and the batch loss.
    The training case is among those held back from the shared folder: it runs where present."""
    for case in _cases("training"):
        _check_training_case(case, tiny_llama)


def _check_training_case(case: Path, tiny_llama: LlamaForCausalLM) -> None:
    data = np.load(case)
    decoder = StagedDecoder(tiny_llama.model, tiny_llama.lm_head)
    embeds, mask, labels = (torch.from_numpy(data[k]) for k in ("in_inputs_embeds", "in_attention_mask", "in_labels"))
    losses, counted = [], 0
    for b in range(embeds.shape[0]):
        n_real = int(mask[b].sum())
        spans = _span(data, int(data["in_images_idx"][b][0]))
        with torch.inference_mode():
            prefill = decoder.prefill(embeds[b : b + 1, :n_real], spans, decoder.new_cache())
            logits = decoder.head(prefill.hidden)[0]  # [n_kept, vocab]
        n_kept = logits.shape[0]
        np.testing.assert_allclose(logits.numpy(), data["out_logits"][b, :n_kept], **FLOAT32)
        assert prefill.position_ids[0].tolist() == data["out_label_ids"][b, :n_kept].tolist()
        gathered = labels[b][prefill.position_ids[0]]  # each kept token keeps its own label
        losses.append(F.cross_entropy(logits[:-1], gathered[1:], ignore_index=-100, reduction="sum"))
        counted += int((gathered[1:] != -100).sum())
    np.testing.assert_allclose(float(sum(losses) / counted), float(data["out_loss"]), **FLOAT32)


def test_a_right_padded_batch_gives_each_prompt_what_it_gets_alone(tiny_llama: LlamaForCausalLM) -> None:
    """Training's batched prefill: prompts of different lengths, spans at different starts and
    layers (two in one prompt, none in another) pool to different lengths and are re-padded; each
    prompt's real rows are its lone prefill's."""
    decoder = StagedDecoder(tiny_llama.model, tiny_llama.lm_head)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randn(n, 64, generator=generator) for n in (40, 57, 23)]
    spans = [
        (ImageSpan(3, 16, 1, 2, "2d"),),
        (ImageSpan(5, 16, 0, 4), ImageSpan(30, 16, 2, 2, "2d")),
        (),
    ]
    padded = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    with torch.inference_mode():
        hidden, lengths = decoder.prefill_padded(padded, [len(p) for p in prompts], spans)
        alone = [decoder.prefill(p[None], s, None).hidden[0] for p, s in zip(prompts, spans)]
    assert lengths == [len(a) for a in alone] == [40 - 12, 57 - 12 - 12, 23]
    assert hidden.shape[1] == max(lengths)
    for b, expected in enumerate(alone):
        torch.testing.assert_close(hidden[b, : lengths[b]], expected, rtol=1e-5, atol=1e-5)


def test_the_golden_cases_are_found() -> None:
    assert _cases("prefill") and _cases("generate"), f"no model_*.npz in {ORACLES}"


# -- The default mode (exact floor positions) against a layer-by-layer reference written here --


def _reference_positions_2d(positions: list[int], side: int, stride: int) -> list[int]:
    """Floor of the mean id of each stride x stride window of a side x side grid, windows in raster order."""
    out = []
    for wy in range(side // stride):
        for wx in range(side // stride):
            ids = [
                positions[(wy * stride + dy) * side + wx * stride + dx] for dy in range(stride) for dx in range(stride)
            ]
            out.append(sum(ids) // len(ids))
    return out


def _reference_pool(hidden: torch.Tensor, positions: torch.Tensor, span: ImageSpan, start: int):
    if span.shape == "1d":
        return pool_image_spans(hidden, positions, [[start]], span.length, span.stride, reference_mode=False)
    side, end = span.side, start + span.length
    grid = hidden[0, start:end].T.reshape(1, -1, side, side)
    pooled = F.avg_pool2d(grid, span.stride).flatten(2)[0].T  # [(side // stride)^2, D]
    ids = torch.tensor(_reference_positions_2d(positions[0, start:end].tolist(), side, span.stride))
    hidden = torch.cat([hidden[:, :start], pooled[None], hidden[:, end:]], dim=1)
    positions = torch.cat([positions[:, :start], ids[None], positions[:, end:]], dim=1)
    return hidden, positions


def _reference_generate(model: LlamaForCausalLM, embeds: torch.Tensor, spans: tuple[ImageSpan, ...], n_new: int):
    """Greedy tokens without a cache: every step re-runs the whole sequence through HF's decoder
    layers, pooling each span at the entry of its layer; generated tokens take positions L, L+1, ..."""
    sequence, tokens = embeds[None], []  # [1, L, D]
    with torch.inference_mode():
        for _ in range(n_new):
            hidden = sequence
            positions = torch.arange(sequence.shape[1])[None]
            for index, layer in enumerate(model.model.layers):
                # Spans last to first, so the earlier ones keep their starts; earlier pooling shifted them.
                for span in sorted((s for s in spans if s.layer == index), key=lambda s: -s.start):
                    shift = sum(s.length - s.pooled_length for s in spans if s.layer < index and s.start < span.start)
                    hidden, positions = _reference_pool(hidden, positions, span, span.start - shift)
                hidden = layer(
                    hidden,
                    attention_mask=None,
                    position_ids=positions,
                    position_embeddings=model.model.rotary_emb(hidden, positions),
                )
            logits = model.lm_head(model.model.norm(hidden))[0, -1]
            tokens.append(int(logits.argmax()))
            sequence = torch.cat([sequence, model.model.embed_tokens(torch.tensor([[tokens[-1]]]))], dim=1)
    return tokens


def _prompt_embeds(n_images: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Text, then ``n_images`` blocks of 576 'visual' rows, each followed by text: embeds [L, 64], starts."""
    generator = torch.Generator().manual_seed(seed)
    pieces, starts, at = [torch.randn(5, 64, generator=generator) * 0.5], [], 5
    for _ in range(n_images):
        starts.append(at)
        pieces += [torch.randn(VISUAL_LENGTH, 64, generator=generator) * 0.5, torch.randn(7, 64, generator=generator)]
        at += VISUAL_LENGTH + 7
    return torch.cat(pieces), starts


@pytest.mark.parametrize(
    "directives",
    [
        [(0, 8, "1d")],
        [(2, 8, "1d")],
        [(0, 4, "2d")],
        [(2, 3, "2d")],
        [(1, 8, "1d"), (3, 2, "2d")],
        [(2, 4, "1d"), (0, 6, "2d")],
    ],
    ids=lambda d: "+".join(f"K{k}S{s}{shape}" for k, s, shape in d),
)
def test_default_mode_generation_matches_a_layer_by_layer_reference(
    directives: list[tuple[int, int, str]], tiny_llama: LlamaForCausalLM, engine: LLMEngine
) -> None:
    n_new = 8
    embeds, starts = _prompt_embeds(len(directives))
    spans = tuple(ImageSpan(start, VISUAL_LENGTH, k, s, shape) for start, (k, s, shape) in zip(starts, directives))
    expected = _reference_generate(tiny_llama, embeds, spans, n_new)
    sequence, seen = _greedy(engine, _from_embeds(embeds, spans, n_new))
    assert seen["tokens"] == expected
    # Decoding went on from the unpooled length, K = 0 included.
    assert seen["positions"] == list(range(embeds.shape[0], embeds.shape[0] + n_new - 1))
    # Each layer caches what it saw: the spans pooled at or before it shortened it.
    lengths = tuple(
        embeds.shape[0] + n_new - 1 - sum(s.length - s.pooled_length for s in spans if s.layer <= layer)
        for layer in range(engine.n_layers)
    )
    assert sequence.cache_lengths() == lengths


def test_pooled_positions_are_window_means_and_text_keeps_its_ids(tiny_llama: LlamaForCausalLM) -> None:
    embeds, (start,) = _prompt_embeds(1)
    decoder = StagedDecoder(tiny_llama.model, tiny_llama.lm_head)
    with torch.inference_mode():
        one_d = decoder.prefill(embeds[None], (ImageSpan(start, 576, 1, 8),), decoder.new_cache())
        two_d = decoder.prefill(embeds[None], (ImageSpan(start, 576, 1, 4, "2d"),), decoder.new_cache())
    ids = one_d.position_ids[0].tolist()
    assert ids[:5] == [0, 1, 2, 3, 4]
    assert ids[5:77] == [start + 8 * j + 3 for j in range(72)]  # floor((8j + 8j+7) / 2)
    assert ids[77:] == list(range(start + 576, start + 583))  # text after the image: not renumbered
    ids = two_d.position_ids[0].tolist()
    # Window (0, 0) of the 24 x 24 grid covers rows 0-3, columns 0-3: mean offset (1.5 * 24 + 1.5).
    assert ids[5] == start + 37 and ids[6] == start + 41 and ids[5 + 6] == start + 4 * 24 + 37
    assert len(ids) == 5 + 36 + 7 and ids[-7:] == list(range(start + 576, start + 583))


def test_reference_mode_truncates_pooled_positions_in_float16(tiny_llama: LlamaForCausalLM) -> None:
    # docs/methods.md §2.8: a block at 2045 with S = 2 pools to 2046, 2048, 2048, 2052, ... in the released code.
    decoder = StagedDecoder(tiny_llama.model, tiny_llama.lm_head)
    embeds = torch.randn(1, 2045 + 16 + 1, 64) * 0.5
    span = ImageSpan(2045, 16, 1, 2)
    with torch.inference_mode():
        released = (dataclasses.replace(span, reference_mode=True),)
        reference = decoder.prefill(embeds, released, decoder.new_cache()).position_ids[0, 2045:2049]
        exact = decoder.prefill(embeds, (span,), decoder.new_cache()).position_ids[0, 2045:2049]
    assert reference.tolist() == [2046, 2048, 2048, 2052]
    assert exact.tolist() == [2045, 2047, 2049, 2051]


def test_each_span_pools_its_position_ids_in_its_own_mode(tiny_llama: LlamaForCausalLM) -> None:
    # Two images of one prompt, one in the released code's mode and one exact: neither mode leaks.
    decoder = StagedDecoder(tiny_llama.model, tiny_llama.lm_head)
    embeds = torch.randn(1, 2100, 64) * 0.5
    released, exact = ImageSpan(2045, 16, 1, 2, reference_mode=True), ImageSpan(2070, 16, 1, 2)
    with torch.inference_mode():
        both = decoder.prefill(embeds, (released, exact), decoder.new_cache()).position_ids[0]
        alone = [decoder.prefill(embeds, (s,), decoder.new_cache()).position_ids[0] for s in (released, exact)]
    assert both[2045:2049].tolist() == [2046, 2048, 2048, 2052]  # float16 means, truncated
    assert both[2062:2066].tolist() == [2070, 2072, 2074, 2076]  # exact floors (2070 - 8 pooled away before it)
    assert both[2045:2053].tolist() == alone[0][2045:2053].tolist()
    assert both[2062:2070].tolist() == alone[1][2070:2078].tolist()


def test_spans_with_different_layers_leave_each_layer_its_own_cache_length(engine: LLMEngine) -> None:
    embeds, starts = _prompt_embeds(2)
    spans = (ImageSpan(starts[0], 576, 1, 8), ImageSpan(starts[1], 576, 3, 4))
    sequence = engine.start(_from_embeds(embeds, spans, 4))
    n = embeds.shape[0]
    assert sequence.cache_lengths() == (n, n - 504, n - 504, n - 504 - 432)
    assert sequence.position == n


def test_a_request_without_spans_is_unchanged_by_the_staged_path(engine: LLMEngine, tiny_llama) -> None:
    # No spans: the layer loop is LlamaModel.forward, so the prefill's last logits are HF's own
    # (the head on the last position only, as generate's logits_to_keep=1).
    embeds, _ = _prompt_embeds(1)
    with torch.inference_mode():
        expected = tiny_llama(inputs_embeds=embeds[None], logits_to_keep=1).logits[0, -1]
    sequence = engine.start(_from_embeds(embeds, (), 1))
    assert torch.equal(sequence.logits[0], expected)


@pytest.fixture(scope="module")
def image_prompt() -> Callable[..., GenerationRequest]:
    """``image_prompt(*spans)``: 3 text tokens, a 576-placeholder image (a 24 x 24 grid), 2 text tokens."""
    ids = torch.tensor([5, 6, 7] + [PLACEHOLDER] * 576 + [8, 9])
    visual = torch.zeros(576, 64)
    return lambda *spans: GenerationRequest(ids, visual, image_spans=tuple(spans))


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        (
            (ImageSpan(3, 577, 1, 8),),
            r"image_spans row 0 \(start 3, length 577\) covers prompt token 579, which is not an image placeholder",
        ),
        ((ImageSpan(2, 576, 1, 8),), "covers prompt token 2, which is not an image placeholder"),
        ((ImageSpan(3, 600, 1, 8),), "does not lie inside the prompt's 581 tokens"),
        ((ImageSpan(-1, 10, 1, 8),), "does not lie inside the prompt"),
        ((ImageSpan(3, 576, 4, 8),), r"layer 4 is not a decoder layer of this model \(0..3\)"),
        ((ImageSpan(3, 576, -1, 8),), r"pooling before the LLM \(layer -1\) is the vision worker's"),
        ((ImageSpan(3, 576, 1, 0),), r"stride 0 must be in 1..576 \(the span's length\)"),
        ((ImageSpan(3, 576, 1, 25, "2d"),), r"stride 25 must be in 1..24 \(the span's grid side\)"),
        ((ImageSpan(3, 575, 1, 2, "2d"),), "2d pooling needs a square grid, and 575 is not a square"),
        ((ImageSpan(3, 576, 1, 2, "3d"),), "shape '3d' is neither 1d nor 2d"),
        (
            (ImageSpan(300, 100, 1, 2), ImageSpan(3, 300, 2, 2)),
            r"rows 1 and 0 overlap: tokens \[3, 303\) and \[300, 400\)",
        ),
    ],
)
def test_bad_image_spans_are_refused_with_the_reason(
    spans: tuple[ImageSpan, ...], message: str, engine: LLMEngine, image_prompt
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        engine.generate(image_prompt(*spans))


def test_adjacent_spans_and_spans_over_part_of_an_image_are_accepted(engine: LLMEngine, image_prompt) -> None:
    request = image_prompt(ImageSpan(3, 288, 1, 8), ImageSpan(291, 144, 2, 4, "2d"))
    prepared = engine.prepare(request)
    assert [s.start for s in prepared.image_spans] == [3, 291]
    assert prepared.visual_tokens == 576 - (288 - 36) - (144 - 9)
