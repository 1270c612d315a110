"""What the vLLM engine is given, checked without starting vLLM: the pack's language-model folder,
the embedding table the prompt is built with, the sampling parameters, the checks, the text
tensors. (The engine itself answers in tests/integration/test_parity.py, inside Triton.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from squint_test_sinks import RecordingSink
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from llm_worker.engine import LLMEngine
from llm_worker.requests import GenerationRequest, PromptChecks, SamplingOptions, prompt_embeddings
from llm_worker.settings import LLMWorkerSettings
from llm_worker.spans import ImageSpan
from llm_worker.text_tensors import finish_reason, finish_reason_tensor, stop_strings, stop_tensor
from llm_worker.vllm_engine import (
    CPU_IDLE_SPIN_SECONDS,
    CPU_KV_CACHE_BYTES,
    VLLMGenerationLoop,
    cpu_reserved_cores,
    engine_args,
    idle_spin_seconds,
    load_input_embeddings,
    sampling_params,
)
from llm_worker.vllm_worker_idle import EXTENSION, IDLE_SPIN_ENV
from squint.errors import InvalidRequest, ModelNotReady
from squint.packs import ModelPack, PackError, write_manifest

SHAPES = ("default", "alt")


@pytest.mark.parametrize("shape", SHAPES)
def test_the_language_model_folder_is_the_llavas_decoder_and_head(
    shape: str, llm_pack: Callable[[str], ModelPack]
) -> None:
    pack = llm_pack(shape)
    assert pack.language_model_dir == pack.root / "language_model"
    llava = LlavaForConditionalGeneration.from_pretrained(pack.llava_dir).eval()
    causal_lm = AutoModelForCausalLM.from_pretrained(pack.language_model_dir).eval()
    assert type(causal_lm).__name__ == "LlamaForCausalLM"
    assert causal_lm.config.head_dim >= 32, "vLLM's CPU attention refuses head sizes under 32"
    ids = torch.tensor([[1, 5, llava.config.image_token_index, 7, 9]])
    visual = torch.randn(1, llava.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = prompt_embeddings(llava.get_input_embeddings(), ids[0], visual, llava.config.image_token_index)
        expected = llava(inputs_embeds=embeds).logits
        got = causal_lm(inputs_embeds=embeds).logits
    assert torch.equal(got, expected)
    assert causal_lm.generation_config.eos_token_id == llava.generation_config.eos_token_id


def test_the_embedding_table_alone_is_read_from_the_folder(llm_pack: Callable[[str], ModelPack]) -> None:
    pack = llm_pack("default")
    llava = LlavaForConditionalGeneration.from_pretrained(pack.llava_dir)
    table = load_input_embeddings(pack.language_model_dir, torch.float32)
    assert torch.equal(table.weight, llava.get_input_embeddings().weight)
    assert not table.weight.requires_grad


def test_both_engines_build_the_prompt_hugging_face_builds(engine_for: Callable[[str], LLMEngine]) -> None:
    engine = engine_for("default")
    table = engine._embed_tokens
    image = engine.image_token_index
    ids = torch.tensor([1, image, image, 4])
    visual = torch.arange(2 * engine.hidden_size, dtype=torch.float32).reshape(2, -1)
    with torch.no_grad():
        embeds = prompt_embeddings(table, ids, visual, image)[0]
    assert torch.equal(embeds[1:3], visual)
    assert torch.equal(embeds[[0, 3]], table(ids[[0, 3]]))


def test_a_pack_without_the_folder_says_how_to_write_it(llm_pack: Callable[[str], ModelPack], tmp_path) -> None:
    pack = llm_pack("default")
    older = write_manifest(tmp_path, clip=pack.clip_dir, llava=pack.llava_dir, name="older", pack_id="older-1")
    assert older.language_model_dir is None
    with pytest.raises(PackError, match="squint pack language-model"):
        older.require_language_model()


def test_sampling_maps_one_to_one() -> None:
    options = SamplingOptions(
        max_new_tokens=7,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        seed=2**64 - 1,
        repetition_penalty=1.2,
        stop_token_ids=(3, 4),
        stop=("\n", "User:"),
    )
    params = sampling_params(options)
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p) == (7, 0.7, 5, 0.9)
    assert params.repetition_penalty == pytest.approx(1.2)
    assert params.stop == ["\n", "User:"] and params.stop_token_ids == [3, 4]
    assert 0 <= params.seed < 2**63 and params.n == 1
    assert params.output_kind.name == "DELTA"
    greedy = sampling_params(SamplingOptions())
    assert greedy.temperature == 0 and greedy.seed is None and not greedy.stop


def test_an_engine_without_in_llm_pooling_refuses_spans_naming_the_staged_one() -> None:
    checks = PromptChecks(
        vocab_size=100, hidden_size=4, image_token_index=9, max_context=512, n_layers=0, has_tokenizer=True
    )
    ids = torch.tensor([1, 9, 9, 9, 9, 2])
    request = GenerationRequest(ids, torch.zeros(4, 4), image_spans=(ImageSpan(1, 4, 0, 2, "1d"),))
    with pytest.raises(InvalidRequest, match="squint_llm_staged"):
        checks.prepare(request)
    assert checks.prepare(GenerationRequest(ids, torch.zeros(4, 4))).visual_tokens == 4


def test_text_tensors_round_trip_and_name_what_is_wrong() -> None:
    strings = ("\n", "User:", "é🙂")
    tensor = stop_tensor(strings)
    assert tensor.dtype == np.uint8 and tensor.ndim == 1
    assert stop_strings(tensor) == strings
    assert stop_strings(stop_tensor([])) == ()
    assert finish_reason(finish_reason_tensor("length")) == "length"
    assert finish_reason(finish_reason_tensor("")) == "" and finish_reason(None) == ""
    for bad, message in (
        (np.frombuffer(b"[1, 2]", np.uint8), "JSON array of strings"),
        (np.frombuffer(b"not json", np.uint8), "not a JSON array"),
        (np.zeros((2, 2), np.uint8), "1-D UINT8"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            stop_strings(bad)


def test_engine_arguments_keep_the_checkpoints_dtype_and_a_bounded_cpu_cache(
    llm_pack: Callable[[str], ModelPack],
) -> None:
    pack = llm_pack("default")
    args = engine_args(LLMWorkerSettings(), pack.language_model_dir)
    # vLLM's own "auto" runs a float32 checkpoint in bfloat16 on CPU.
    assert args.dtype == "float32"
    assert args.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES and args.enforce_eager
    assert args.enable_prompt_embeds and args.max_num_seqs == LLMWorkerSettings().max_batch
    tuned = engine_args(
        LLMWorkerSettings(dtype="float16", vllm_kv_cache_bytes=1 << 20, vllm_prefix_caching=True, max_batch=3),
        pack.language_model_dir,
    )
    assert (tuned.dtype, tuned.kv_cache_memory_bytes, tuned.enable_prefix_caching, tuned.max_num_seqs) == (
        "float16",
        1 << 20,
        True,
        3,
    )


def test_a_small_cpu_machine_computes_on_every_core() -> None:
    assert cpu_reserved_cores(-1, 2) == 0 and cpu_reserved_cores(-1, 4) == 0
    assert cpu_reserved_cores(-1, 16) is None  # vLLM's own default: one core for its frontend
    assert cpu_reserved_cores(2, 16) == 2 and cpu_reserved_cores(0, 64) == 0


# What vLLM's worker process runs when it imports the extension the engine names: a queue reader
# made afterwards, as the worker makes its own, with the window it then polls for.
_READER_WINDOW = """
import zmq
import llm_worker.vllm_worker_idle
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
reader = SpinCondition(is_reader=True, context=zmq.Context(), notify_address="ipc://{path}")
print(reader.busy_loop_s)
"""


def test_vllms_worker_on_cpu_stops_polling_soon_after_its_last_step(
    llm_pack: Callable[[str], ModelPack], tmp_path
) -> None:
    # vLLM's worker polls for a second after each step; on CPU that takes a core CLIP shares.
    assert idle_spin_seconds(LLMWorkerSettings()) == CPU_IDLE_SPIN_SECONDS
    assert idle_spin_seconds(LLMWorkerSettings(device="cuda")) is None  # vLLM's own
    assert idle_spin_seconds(LLMWorkerSettings(device="cuda", vllm_idle_spin_seconds=0.25)) == 0.25
    pack = llm_pack("default")
    assert engine_args(LLMWorkerSettings(), pack.language_model_dir).worker_extension_cls == EXTENSION
    assert not engine_args(LLMWorkerSettings(device="cuda"), pack.language_model_dir).worker_extension_cls

    def window(env: dict[str, str]) -> float:
        code = _READER_WINDOW.format(path=tmp_path / "notify")
        done = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        return float(done.stdout.split()[-1])

    assert window({IDLE_SPIN_ENV: "0.05"}) == 0.05
    assert window({}) == 1.0  # vLLM's own window: the variable is what changes it


# --------------------------------------------------------------------------- the loop's books


class StandInEngine:
    """``AsyncLLM``'s ``generate`` and ``shutdown``: a token every 10 ms, never finishing. Records
    the request ids it was given and the streams that were closed."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.closed: list[str] = []

    async def generate(self, prompt, params, request_id: str):
        self.request_ids.append(request_id)
        try:
            for n in itertools.count(1):
                await asyncio.sleep(0.01)
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[n], finish_reason=None)], finished=False)
        finally:
            self.closed.append(request_id)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def stand_in_loop(llm_pack: Callable[[str], ModelPack]):
    """A vLLM loop serving from a :class:`StandInEngine` (no vLLM), stopped after the test."""
    pack = llm_pack("default")
    image_token_index = int(json.loads((pack.llava_dir / "config.json").read_text())["image_token_index"])
    loop = VLLMGenerationLoop(LLMWorkerSettings(), pack.require_language_model(), image_token_index)
    engine = StandInEngine()
    loop.start(engine)
    yield loop, engine
    loop.stop()


def prompt() -> dict[str, np.ndarray]:
    return {"input_ids": np.array([1, 5, 6], dtype=np.int64), "max_new_tokens": np.array([64], dtype=np.int32)}


def test_two_requests_under_one_client_id_are_two_requests_to_the_engine(stand_in_loop) -> None:
    # A client's id can repeat (a retry while the first try still runs, two clients): cancelling
    # the first must stop the first, and the second go on.
    loop, engine = stand_in_loop
    first, second = RecordingSink(), RecordingSink()
    loop.submit("same", prompt(), first)
    loop.submit("same", prompt(), second)
    assert first.started.wait(30) and second.started.wait(30)
    assert len(set(engine.request_ids)) == 2 and all(i.startswith("same") for i in engine.request_ids)
    first.cancel_now = True
    assert first.done.wait(30) and first.was_cancelled
    assert engine.closed == [engine.request_ids[0]]
    assert not second.done.is_set()
    loop.stop()
    assert second.done.wait(30) and isinstance(second.errors[0], ModelNotReady)


def test_a_response_that_cannot_be_sent_closes_the_engines_stream_before_the_error_is_answered(
    stand_in_loop,
) -> None:
    loop, engine = stand_in_loop
    closed_when_failed: list[list[str]] = []

    class BrokenSink(RecordingSink):
        def send_token(self, token_id: int) -> None:
            raise RuntimeError("the response stream is closed")

        def fail(self, error) -> None:
            closed_when_failed.append(list(engine.closed))  # the vLLM request is aborted by now
            super().fail(error)

    sink = BrokenSink()
    loop.submit("broken", prompt(), sink)
    assert sink.done.wait(30)
    assert closed_when_failed == [engine.request_ids]


def test_requests_the_worker_stops_on_before_they_start_are_answered(stand_in_loop) -> None:
    # Stopped at once: each request is cancelled before its task's first step, or finds the loop
    # stopping when its task is to be made. Either way it is answered, not left waiting.
    loop, _ = stand_in_loop
    sinks = [RecordingSink() for _ in range(8)]
    for n, sink in enumerate(sinks):
        loop.submit(f"r{n}", prompt(), sink)
    loop.stop()
    assert all(sink.done.wait(30) for sink in sinks)
    assert all(isinstance(sink.errors[0], ModelNotReady) for sink in sinks)
