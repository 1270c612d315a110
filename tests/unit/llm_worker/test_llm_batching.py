"""Batched decode steps give every sequence exactly what it gets alone (logits bit for bit), the
growing KV cache holds what HF's holds, and stop strings are found with a bounded decode window."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from llm_worker.engine import GenerationRequest, GenerationSequence, LLMEngine, SamplingOptions, StopStrings
from llm_worker.staged import DECODE_TILE, GrowingLayer, ImageSpan, row_invariant
from squint.packs import ModelPack

IMAGE_TOKENS = {"default": 576, "alt": 256}


def _run(engine: LLMEngine, requests: list[GenerationRequest]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Start every request, then step all unfinished sequences together until each is done.

    Returns, per request, its tokens and the logits each token was chosen from.
    """
    sequences = [engine.start(r) for r in requests]
    seen: list[tuple[list[int], list[torch.Tensor]]] = [([], []) for _ in requests]
    running: list[tuple[int, GenerationSequence]] = list(enumerate(sequences))
    while running:
        still = []
        for i, sequence in running:
            seen[i][1].append(sequence.logits.clone())
            step = sequence.choose()
            seen[i][0].append(step.token_id)
            if step.finish_reason is None:
                still.append((i, sequence))
        running = still
        engine.step([sequence for _, sequence in running])
    return seen


@pytest.mark.parametrize("shape", ["default", "alt"])
def test_a_batched_step_gives_each_sequence_its_alone_logits_bit_for_bit(
    shape: str, engine_for: Callable[[str], LLMEngine], mixed: Callable[..., list[GenerationRequest]]
) -> None:
    engine = engine_for(shape)
    requests = mixed(engine, IMAGE_TOKENS[shape], n=16)
    assert any(r.image_spans for r in requests) and any(r.visual_embeds is None for r in requests)
    alone = [_run(engine, [r])[0] for r in requests]
    together = _run(engine, requests)
    # In another order too: a sequence's row in the tile does not matter.
    order = list(range(len(requests)))
    random.Random(1).shuffle(order)
    shuffled = _run(engine, [requests[i] for i in order])
    for i, (tokens, logits) in enumerate(alone):
        assert together[i][0] == tokens, f"request {i}"
        assert all(torch.equal(a, b) for a, b in zip(logits, together[i][1], strict=True)), f"request {i}"
        j = order.index(i)
        assert shuffled[j][0] == tokens and all(torch.equal(a, b) for a, b in zip(logits, shuffled[j][1]))
    # The mix really batched sequences that left at different steps.
    assert len({len(tokens) for tokens, _ in alone}) > 3


def test_sequences_keep_their_own_sampling_state_in_a_batch(
    engine_for: Callable[[str], LLMEngine], mixed: Callable[..., list[GenerationRequest]]
) -> None:
    engine = engine_for("alt")
    base = mixed(engine, 256, n=4)[1]
    hot = [
        GenerationRequest(base.input_ids, base.visual_embeds, s, base.image_spans)
        for s in (
            SamplingOptions(max_new_tokens=12, temperature=1.5, seed=1),
            SamplingOptions(max_new_tokens=12, temperature=1.5, seed=2),
            SamplingOptions(max_new_tokens=12, temperature=1.5, seed=1, repetition_penalty=2.0),
            SamplingOptions(max_new_tokens=12),
        )
    ]
    alone = [_run(engine, [r])[0][0] for r in hot]
    assert [tokens for tokens, _ in _run(engine, hot)] == alone
    assert alone[0] != alone[1], "different seeds should sample differently at temperature 1.5"


def test_the_tile_splits_batches_larger_than_it(
    engine_for: Callable[[str], LLMEngine], mixed: Callable[..., list[GenerationRequest]]
) -> None:
    engine = engine_for("default")
    requests = mixed(engine, 576, n=2 * engine.decoder.decode_tile + 3, seed=5)
    alone = [_run(engine, [r])[0][0] for r in requests]
    assert [tokens for tokens, _ in _run(engine, requests)] == alone


def _first_stop(tokenizer, tokens: list[int], stop: str) -> int | None:
    """The reference semantics: the first n whose full decode of tokens[:n] contains ``stop``."""
    for n in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:n], skip_special_tokens=True):
            return n
    return None


def test_stop_strings_match_the_full_decode_with_a_bounded_window(llm_pack: Callable[[str], ModelPack]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llm_pack("alt").llava_dir)
    rng = random.Random(0)
    # Plain characters, spaces and byte-fallback pieces of multi-byte characters, and a special token.
    text = tokenizer("héllo wörld 😀 ok, the cat sat. ünïcode", add_special_tokens=False).input_ids
    vocabulary = sorted(set(text)) + [2]
    checked = 0
    for _ in range(60):
        tokens = text[:] if rng.random() < 0.3 else [rng.choice(vocabulary) for _ in range(40)]
        decoded = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(decoded) < 6:
            continue
        start = rng.randrange(len(decoded) - 3)
        stop = decoded[start : start + rng.randrange(1, 5)]
        if "\ufffd" in stop:
            continue  # a broken byte sequence's replacement character is matched once whole text follows
        expected = _first_stop(tokenizer, tokens, stop)
        watcher = StopStrings(tokenizer, ("never-said", stop))
        found = next((n for n, t in enumerate(tokens, 1) if watcher.add(t)), None)
        assert found == expected, (tokens, stop)
        checked += 1
    assert checked > 30


def test_stop_strings_decode_a_window_not_the_whole_output(llm_pack: Callable[[str], ModelPack]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llm_pack("alt").llava_dir)
    lengths: list[int] = []

    class Counting:
        def decode(self, tokens, **kwargs):
            lengths.append(len(tokens))
            return tokenizer.decode(tokens, **kwargs)

    watcher = StopStrings(Counting(), ("zzz",))
    token = tokenizer("a", add_special_tokens=False).input_ids[-1]
    for _ in range(500):
        assert not watcher.add(token)
    assert max(lengths) <= 2


@pytest.mark.parametrize(
    ("hidden", "intermediate", "heads", "kv_heads"),
    [(64, 102, 4, 4), (18, 46, 3, 1)],
    ids=["silu-row-by-row", "rotary-and-silu-row-by-row"],
)
def test_batch_invariance_holds_where_elementwise_maths_runs_row_by_row(
    hidden: int, intermediate: int, heads: int, kv_heads: int
) -> None:
    # 8 x 102 and 8 x 46 activations, 8 x 6 rotary values: sizes that leave a scalar tail on CPU
    # (not a multiple of 32), where SiLU rounds differently than on the vector path.
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    engine = LLMEngine(
        model.model, model.lm_head.eval(), None, image_token_index=299, eos_token_ids=(), max_context=2048
    )
    requests = [
        GenerationRequest(
            torch.tensor([1] + [5 + (7 * r + i) % 280 for i in range(3 + r)] + [299] * 64),
            torch.randn(64, hidden, generator=torch.Generator().manual_seed(r)),
            SamplingOptions(max_new_tokens=10 + r),
            (ImageSpan(4 + r, 64, r % 2, 4, "2d" if r % 3 else "1d"),),
        )
        for r in range(11)
    ]
    alone = [_run(engine, [r])[0] for r in requests]
    together = _run(engine, requests)
    for (tokens, logits), (batched_tokens, batched_logits) in zip(alone, together, strict=True):
        assert batched_tokens == tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, batched_logits, strict=True))


def test_growing_cache_layers_hold_what_dynamic_layers_hold_with_room_to_spare() -> None:
    growing, dynamic = GrowingLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(0)
    prefill = torch.randn(1, 2, 100, 8, generator=generator), torch.randn(1, 2, 100, 8, generator=generator)
    for layer in (growing, dynamic):
        layer.update(*prefill)
    # The prefill is stored as it came: no room yet, so the prefill's attention reads the same tensors.
    assert growing.nbytes == 2 * prefill[0].numel() * 4
    for _ in range(150):
        step = torch.randn(1, 2, 1, 8, generator=generator), torch.randn(1, 2, 1, 8, generator=generator)
        keys, values = growing.update(*step)
        expected_keys, expected_values = dynamic.update(*step)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert growing.get_seq_length() == dynamic.get_seq_length() == 250
    held = growing.nbytes // (2 * 2 * 8 * 4)  # positions allocated
    assert 250 <= held <= 250 + max(64, 250 // 4)


class _PlacingLinear(torch.nn.Linear):
    """A linear layer whose rows depend on where they sit, as a BLAS edge kernel's do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if x.shape[0] > 1:
            out = out + torch.arange(x.shape[0], dtype=out.dtype).view(-1, *[1] * (out.dim() - 1)) * 1e-6
        return out


def test_linear_layers_that_place_rows_run_row_by_row_and_stay_batch_invariant() -> None:
    assert row_invariant(torch.nn.Linear(32, 64), 1)
    assert not row_invariant(_PlacingLinear(32, 64), DECODE_TILE)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    placing = _PlacingLinear(32, 32, bias=False)
    placing.load_state_dict(model.model.layers[0].self_attn.k_proj.state_dict())
    model.model.layers[0].self_attn.k_proj = placing
    engine = LLMEngine(
        model.model, model.lm_head.eval(), None, image_token_index=299, eos_token_ids=(), max_context=512
    )
    requests = [
        GenerationRequest(torch.tensor([1, 5 + r, 9, 11 + r]), None, SamplingOptions(max_new_tokens=6 + r))
        for r in range(5)
    ]
    alone = [_run(engine, [r])[0] for r in requests]
    together = _run(engine, requests)
    for (tokens, logits), (batched_tokens, batched_logits) in zip(alone, together, strict=True):
        assert batched_tokens == tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, batched_logits, strict=True))
