"""Tiny packs and loaded models shared by the LLM worker's unit tests (built once per session)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import LlavaForConditionalGeneration

from llm_worker.engine import LLMEngine
from squint.packs import ModelPack
from squint.tiny_pack import write_tiny_pack

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
