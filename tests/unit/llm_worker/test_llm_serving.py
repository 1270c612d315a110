"""Request parsing, the generation thread and the settings, without Triton."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from llm_worker.engine import LLMEngine
from llm_worker.serving import GenerationLoop, parse_request
from llm_worker.settings import LLMWorkerSettings, settings_from_triton_args
from llm_worker.testing import HFReference, hf_reference, llava_prompt, random_images
from squint.config import SettingsError
from squint.errors import InvalidRequest, ModelNotReady, SquintError
from squint.packs import ModelPack


@dataclass
class RecordingSink:
    """A ResponseSink that records what the loop sends; ``done`` is set by the final call."""

    cancel_after: int | None = None
    tokens: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    errors: list[SquintError] = field(default_factory=list)
    was_cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def send_token(self, token_id: int) -> None:
        self.tokens.append(token_id)

    def finish(self, reason: str) -> None:
        self.finished.append(reason)
        self.done.set()

    def fail(self, error: SquintError) -> None:
        self.errors.append(error)
        self.done.set()

    def cancelled(self) -> None:
        self.was_cancelled = True
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after


@pytest.fixture(scope="module")
def reference(llm_pack: Callable[[str], ModelPack]) -> HFReference:
    return hf_reference(llm_pack("alt").llava_dir, random_images(2, seed=1), llava_prompt(2), 8)


def _inputs(ref: HFReference, **extra: np.ndarray) -> dict[str, np.ndarray]:
    assert ref.visual_embeds is not None
    return {"input_ids": ref.input_ids.numpy(), "visual_embeds": ref.visual_embeds.numpy(), **extra}


def test_parse_request_reads_every_tensor_of_the_contract() -> None:
    request = parse_request(
        {
            "input_ids": np.array([1, 2, 3], dtype=np.int64),
            "visual_embeds": np.zeros((0, 4), dtype=np.float16),
            "max_new_tokens": np.array([7], dtype=np.int32),
            "temperature": np.array([0.5], dtype=np.float32),
            "top_p": np.array([0.75], dtype=np.float32),
            "top_k": np.array([9], dtype=np.int32),
            "seed": np.array([2**64 - 1], dtype=np.uint64),
            "repetition_penalty": np.array([1.25], dtype=np.float32),
            "stop_token_ids": np.array([5, 6], dtype=np.int64),
            "stop": np.array(["ab".encode(), "é\n".encode()], dtype=np.object_),
        },
        default_max_new_tokens=64,
    )
    assert request.input_ids.tolist() == [1, 2, 3]
    assert request.visual_embeds is not None and tuple(request.visual_embeds.shape) == (0, 4)
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (7, 0.5, 0.75, 9)
    assert (s.seed, s.repetition_penalty) == (2**64 - 1, 1.25)
    assert s.stop_token_ids == (5, 6) and s.stop == ("ab", "é\n")


def test_parse_request_defaults_are_greedy_and_the_configured_length() -> None:
    request = parse_request({"input_ids": np.array([1], dtype=np.int64)}, default_max_new_tokens=17)
    s = request.sampling
    assert request.visual_embeds is None
    assert (s.max_new_tokens, s.temperature, s.greedy, s.top_k, s.top_p, s.seed) == (17, 0.0, True, 0, 1.0, None)
    assert (s.repetition_penalty, s.stop_token_ids, s.stop) == (1.0, (), ())


IDS = np.zeros(2, np.int64)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "input_ids is missing"),
        ({"input_ids": np.zeros((1, 2), np.int64)}, "input_ids must be a 1-D integer tensor"),
        ({"input_ids": np.zeros(2, np.float32)}, "input_ids must be a 1-D integer tensor"),
        ({"input_ids": IDS, "visual_embeds": np.zeros(4, np.float32)}, "visual_embeds must be a 2-D float"),
        ({"input_ids": IDS, "max_new_tokens": np.array([1, 2], np.int32)}, "max_new_tokens must hold exactly one"),
        ({"input_ids": IDS, "max_new_tokens": np.array([0], np.int32)}, "max_new_tokens is 0"),
        ({"input_ids": IDS, "stop": np.array([b"\xff"], np.object_)}, "stop holds a string that is not UTF-8"),
    ],
)
def test_parse_request_rejects_malformed_tensors(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_request(inputs, default_max_new_tokens=8)


@pytest.fixture()
def loop(engine_for: Callable[[str], LLMEngine]):
    loop = GenerationLoop(engine_for("alt"), default_max_new_tokens=8)
    loop.start()
    yield loop
    loop.stop()


def test_loop_streams_tokens_then_finishes(loop: GenerationLoop, reference: HFReference) -> None:
    sinks = [RecordingSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        loop.submit(f"r{i}", _inputs(reference), sink)
    for sink in sinks:
        assert sink.done.wait(60)
        assert tuple(sink.tokens) == reference.tokens
        assert sink.finished == ["length"] and not sink.errors


def test_loop_answers_bad_requests_with_the_reason_and_keeps_serving(
    loop: GenerationLoop, reference: HFReference
) -> None:
    malformed, mismatched, good = RecordingSink(), RecordingSink(), RecordingSink()
    loop.submit("bad-1", {"input_ids": np.zeros((2, 2), np.int64)}, malformed)
    inputs = _inputs(reference)
    inputs["visual_embeds"] = inputs["visual_embeds"][:-3]
    loop.submit("bad-2", inputs, mismatched)
    loop.submit("good", _inputs(reference), good)
    for sink in (malformed, mismatched, good):
        assert sink.done.wait(60)
    assert isinstance(malformed.errors[0], InvalidRequest) and not malformed.tokens
    n = reference.visual_embeds.shape[0]  # type: ignore[union-attr]
    assert isinstance(mismatched.errors[0], InvalidRequest)
    assert f"visual_embeds has {n - 3} rows but input_ids holds {n} image placeholder" in mismatched.errors[0].message
    assert tuple(good.tokens) == reference.tokens and good.finished == ["length"]


def test_loop_reports_a_cancelled_request(loop: GenerationLoop, reference: HFReference) -> None:
    sink = RecordingSink(cancel_after=2)
    loop.submit("c", _inputs(reference), sink)
    assert sink.done.wait(60)
    assert sink.was_cancelled and tuple(sink.tokens) == reference.tokens[:2]
    assert not sink.finished and not sink.errors


def test_loop_hides_unexpected_errors_behind_a_plain_message(
    loop: GenerationLoop, reference: HFReference, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenSink(RecordingSink):
        def send_token(self, token_id: int) -> None:
            raise RuntimeError("secret detail")

    sink = BrokenSink()
    loop.submit("boom", _inputs(reference), sink)
    assert sink.done.wait(60)
    assert sink.errors[0].message == "internal error (request 'boom')"
    assert "secret detail" in caplog.text


def test_loop_refuses_work_once_stopped(engine_for: Callable[[str], LLMEngine], reference: HFReference) -> None:
    loop = GenerationLoop(engine_for("alt"))
    loop.start()
    loop.stop()
    sink = RecordingSink()
    loop.submit("late", _inputs(reference), sink)
    assert sink.done.is_set() and isinstance(sink.errors[0], ModelNotReady)


def _args(parameters: dict[str, str], kind: str = "CPU", device_id: str = "0") -> dict[str, str]:
    config = {"name": "squint_llm", "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {"model_config": json.dumps(config), "model_instance_kind": kind, "model_instance_device_id": device_id}


def test_settings_read_env_and_let_config_parameters_win(tmp_path: Path) -> None:
    env = {"SQUINT_LLM_PACK_DIR": "/from/env", "SQUINT_LLM_DTYPE": "float16", "SQUINT_LLM_DEVICE": "cuda:3"}
    settings = settings_from_triton_args(_args({"pack_dir": str(tmp_path)}), env=env)
    assert settings == LLMWorkerSettings(pack_dir=tmp_path, dtype="float16", default_max_new_tokens=64, device="cpu")
    gpu = settings_from_triton_args(_args({"default_max_new_tokens": "5"}, kind="GPU", device_id="1"), env={})
    assert (gpu.pack_dir, gpu.default_max_new_tokens, gpu.device) == (None, 5, "cuda:1")


def test_settings_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="'pack' is unknown; known: default_max_new_tokens, dtype, pack_dir"):
        settings_from_triton_args(_args({"pack": "x"}), env={})
    with pytest.raises(SettingsError, match="SQUINT_LLM_DTYPE='bf16': expected one of auto, float32, float16"):
        settings_from_triton_args(_args({}), env={"SQUINT_LLM_DTYPE": "bf16"})
    with pytest.raises(SettingsError, match="instance_group kind 'MODEL'"):
        settings_from_triton_args(_args({}, kind="MODEL"), env={})
    with pytest.raises(SettingsError, match="no model pack configured: set SQUINT_LLM_PACK_DIR"):
        LLMWorkerSettings().require_pack()
    with pytest.raises(SettingsError, match="is not a model pack"):
        LLMWorkerSettings(pack_dir=tmp_path).require_pack()
