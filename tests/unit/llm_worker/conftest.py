"""Tiny packs, loaded models and request mixes shared by the LLM worker's unit tests."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llm_worker.engine import GenerationRequest, LLMEngine, SamplingOptions
from llm_worker.staged import ImageSpan
from squint.app.tiny_pack import write_tiny_pack
from squint.packs import ModelPack

SHAPES = ("default", "alt")


@pytest.fixture(scope="session")
def llm_pack(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ModelPack]:
    """``llm_pack(shape)``: a seeded tiny pack of that shape, written once."""
    packs: dict[str, ModelPack] = {}

    def get(shape: str) -> ModelPack:
        if shape not in packs:
            packs[shape] = write_tiny_pack(tmp_path_factory.mktemp(f"llm-pack-{shape}"), seed=0, shape=shape)
        return packs[shape]

    return get


@pytest.fixture(scope="session")
def engine_for(llm_pack: Callable[[str], ModelPack]) -> Callable[[str], LLMEngine]:
    """``engine_for(shape)``: an engine on that tiny pack, loaded once."""
    engines: dict[str, LLMEngine] = {}

    def get(shape: str) -> LLMEngine:
        if shape not in engines:
            engines[shape] = LLMEngine.load(llm_pack(shape).llava_dir)
        return engines[shape]

    return get


@pytest.fixture(scope="session")
def hf_model_for(llm_pack: Callable[[str], ModelPack]) -> Callable[[str], LlavaForConditionalGeneration]:
    """``hf_model_for(shape)``: the whole Hugging Face LLaVA model of that pack, the reference."""
    models: dict[str, LlavaForConditionalGeneration] = {}

    def get(shape: str) -> LlavaForConditionalGeneration:
        if shape not in models:
            models[shape] = LlavaForConditionalGeneration.from_pretrained(llm_pack(shape).llava_dir).eval()
        return models[shape]

    return get


def mixed_requests(engine: LLMEngine, image_tokens: int, n: int = 16, seed: int = 0) -> list[GenerationRequest]:
    """``n`` prompts unlike each other, for batching tests.

    They hold 0, 1 or 2 images (``image_tokens`` placeholders each, a square grid) among text of
    different lengths; some images carry in-LLM directives (different layers, strides, 1d and
    2d); lengths to generate differ, so sequences leave the batch at different steps; most are
    greedy, some sample with a seed, one has a repetition penalty, one stop token ids.
    """
    rng = random.Random(seed)
    text = [i for i in range(3, min(engine.vocab_size, 200)) if i != engine.image_token_index]
    requests = []
    for r in range(n):
        ids = [1] + rng.sample(text, rng.randrange(2, 12))
        spans = []
        for _ in range(r % 3):
            if r % 4 in (1, 2):
                layer = rng.randrange(engine.n_layers)
                if rng.random() < 0.5:
                    spans.append(ImageSpan(len(ids), image_tokens, layer, rng.choice([2, 4, 8]), "1d"))
                else:
                    spans.append(ImageSpan(len(ids), image_tokens, layer, rng.choice([2, 3, 4]), "2d"))
            ids += [engine.image_token_index] * image_tokens + rng.sample(text, rng.randrange(1, 6))
        n_visual = (r % 3) * image_tokens
        generator = torch.Generator().manual_seed(seed * 1000 + r)
        visual = torch.randn(n_visual, engine.hidden_size, generator=generator) if n_visual else None
        options: dict[str, object] = {"max_new_tokens": 6 + (r * 5) % 17}
        if r % 5 == 3:
            options.update(temperature=0.9, top_p=0.9, top_k=20, seed=r)
        if r == 7:
            options.update(repetition_penalty=1.3)
        if r == 11:
            options.update(stop_token_ids=(rng.choice(text),))
        requests.append(GenerationRequest(torch.tensor(ids), visual, SamplingOptions(**options), tuple(spans)))
    return requests


@pytest.fixture(scope="session")
def mixed() -> Callable[..., list[GenerationRequest]]:
    """:func:`mixed_requests`, as a fixture (test modules do not import conftest)."""
    return mixed_requests
