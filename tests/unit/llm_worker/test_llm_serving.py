"""Request parsing, the continuous-batching loop and the settings, without Triton."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from squint_test_sinks import RecordingSink

from llm_worker.engine import GenerationRequest, LLMEngine
from llm_worker.serving import (
    GenerationLoop,
    WorkerBusy,
    parse_request,
)
from llm_worker.settings import LLMWorkerSettings, SchedulerSettings, settings_from_triton_args
from llm_worker.spans import ImageSpan, span_tensors
from llm_worker.testing import HFReference, hf_reference, llava_prompt, random_images
from llm_worker.text_tensors import stop_tensor
from squint.config import SettingsError, load_settings
from squint.errors import InvalidRequest, ModelNotReady
from squint.packs import ModelPack


@dataclass
class RecordingMetrics:
    """A ServingMetrics that keeps totals and every load report."""

    prompt_tokens: int = 0
    visual_tokens: int = 0
    generated: int = 0
    loads: list[tuple[int, int, int]] = field(default_factory=list)

    def count_request(self, prompt_tokens: int, visual_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.visual_tokens += visual_tokens

    def count_generated(self, tokens: int) -> None:
        self.generated += tokens

    def set_load(self, active: int, queued: int, kv_bytes: int) -> None:
        self.loads.append((active, queued, kv_bytes))


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
            "stop": stop_tensor(["ab", "é\n"]),
        },
        default_max_new_tokens=64,
    )
    assert request.input_ids.tolist() == [1, 2, 3]
    assert request.visual_embeds is not None and tuple(request.visual_embeds.shape) == (0, 4)
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (7, 0.5, 0.75, 9)
    assert (s.seed, s.repetition_penalty) == (2**64 - 1, 1.25)
    assert s.stop_token_ids == (5, 6) and s.stop == ("ab", "é\n")


def test_parse_request_reads_image_spans_and_reference_mode_per_span() -> None:
    spans = np.array([[4, 576, 2, 8, 1], [600, 576, 0, 4, 2]], dtype=np.int64)
    ids = np.array([1, 2, 3], dtype=np.int64)
    request = parse_request(
        {"input_ids": ids, "image_spans": spans, "reference_mode": np.array([False, True])}, default_max_new_tokens=8
    )
    assert request.image_spans == (ImageSpan(4, 576, 2, 8, "1d", False), ImageSpan(600, 576, 0, 4, "2d", True))
    # One value (the earlier [1] form) applies to every span; none leaves every span exact.
    one = parse_request(
        {"input_ids": ids, "image_spans": spans, "reference_mode": np.array([True])}, default_max_new_tokens=8
    )
    assert [s.reference_mode for s in one.image_spans] == [True, True]
    omitted = parse_request({"input_ids": ids, "image_spans": spans}, default_max_new_tokens=8)
    assert [s.reference_mode for s in omitted.image_spans] == [False, False]
    empty = parse_request(
        {"input_ids": np.array([1], dtype=np.int64), "image_spans": np.zeros((0, 5), np.int64)},
        default_max_new_tokens=8,
    )
    assert empty.image_spans == ()


def test_parse_request_defaults_are_greedy_and_the_configured_length() -> None:
    request = parse_request({"input_ids": np.array([1], dtype=np.int64)}, default_max_new_tokens=17)
    s = request.sampling
    assert request.visual_embeds is None and request.image_spans == ()
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
        ({"input_ids": IDS, "stop": np.frombuffer(b'["\xff"]', np.uint8)}, "stop is not UTF-8"),
        ({"input_ids": IDS, "stop": np.frombuffer(b'{"a": 1}', np.uint8)}, "stop must be a JSON array of strings"),
        ({"input_ids": IDS, "stop": np.array([b"ab"], np.object_)}, "stop must be a 1-D UINT8 tensor"),
        (
            {"input_ids": IDS, "image_spans": np.zeros((1, 4), np.int64)},
            r"image_spans must be an integer tensor \[n_spans, 5\]",
        ),
        ({"input_ids": IDS, "image_spans": np.zeros((1, 5), np.float32)}, "image_spans must be an integer tensor"),
        (
            {"input_ids": IDS, "image_spans": np.array([[0, 4, 0, 2, 3]])},
            "row 0: shape code 3 is neither 1 \\(1d\\) nor 2",
        ),
        (
            {"input_ids": IDS, "image_spans": np.array([[0, 4, 0, 2, 1]]), "reference_mode": np.array([True, False])},
            r"reference_mode holds 2 values for 1 image_spans rows; give one per row \(or one for every row\)",
        ),
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
    n = reference.visual_embeds.shape[0]
    assert isinstance(mismatched.errors[0], InvalidRequest)
    assert f"visual_embeds has {n - 3} rows but input_ids holds {n} image placeholder" in mismatched.errors[0].message
    assert tuple(good.tokens) == reference.tokens and good.finished == ["length"]


def test_loop_reports_a_cancelled_request(loop: GenerationLoop, reference: HFReference) -> None:
    sink = RecordingSink(cancel_after=2)
    loop.submit("c", _inputs(reference, max_new_tokens=np.array([1000], np.int32)), sink)
    assert sink.done.wait(60)
    # Tokens already posted when the cancellation is seen may still go out (sending is asynchronous).
    assert sink.was_cancelled and 2 <= len(sink.tokens) < 1000
    assert tuple(sink.tokens[:8]) == reference.tokens[: len(sink.tokens[:8])]
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


def _as_inputs(request: GenerationRequest) -> dict[str, np.ndarray]:
    """The Triton contract's tensors for ``request``."""
    s = request.sampling
    inputs = {
        "input_ids": request.input_ids.numpy(),
        "max_new_tokens": np.array([s.max_new_tokens], np.int32),
        "temperature": np.array([s.temperature], np.float32),
        "top_p": np.array([s.top_p], np.float32),
        "top_k": np.array([s.top_k], np.int32),
        "repetition_penalty": np.array([s.repetition_penalty], np.float32),
        "stop_token_ids": np.array(s.stop_token_ids, np.int64),
    }
    if s.seed is not None:
        inputs["seed"] = np.array([s.seed], np.uint64)
    if request.visual_embeds is not None:
        inputs["visual_embeds"] = request.visual_embeds.numpy()
    inputs.update(span_tensors(request.image_spans))
    return inputs


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_16_concurrent_requests_get_the_tokens_they_get_alone(
    engine_for: Callable[[str], LLMEngine], mixed: Callable[..., list[GenerationRequest]]
) -> None:
    engine = engine_for("default")
    requests = mixed(engine, 576, n=16, seed=3)
    expected = [[step.token_id for step in engine.generate(r)] for r in requests]
    metrics = RecordingMetrics()
    loop = GenerationLoop(engine, settings=SchedulerSettings(max_batch=8, max_queue=64), metrics=metrics)
    loop.start()
    try:
        sinks = [RecordingSink() for _ in requests]
        submitters = [
            threading.Thread(target=loop.submit, args=(f"r{i}", _as_inputs(r), sink))
            for i, (r, sink) in enumerate(zip(requests, sinks))
        ]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join()
        for i, sink in enumerate(sinks):
            assert sink.done.wait(120), f"request {i} did not finish"
            assert sink.tokens == expected[i], f"request {i}"
            assert sink.finished in (["length"], ["stop"]) and not sink.errors
        assert _wait_for(lambda: metrics.loads[-1] == (0, 0, 0)), "the slots and caches were not all freed"
    finally:
        loop.stop()
    assert max(active for active, _, _ in metrics.loads) == 8, "the batch never filled"
    assert max(queued for _, queued, _ in metrics.loads) > 0
    prepared = [engine.prepare(r) for r in requests]
    assert metrics.prompt_tokens == sum(p.prompt_tokens for p in prepared)
    # Visual tokens after compression: in-LLM pooled spans count at their pooled length.
    assert (
        metrics.visual_tokens
        == sum(p.visual_tokens for p in prepared)
        < sum(0 if r.visual_embeds is None else r.visual_embeds.shape[0] for r in requests)
    )
    assert metrics.generated == sum(map(len, expected))
    assert max(kv for _, _, kv in metrics.loads) > 0


@pytest.fixture()
def long_request(reference: HFReference) -> dict[str, np.ndarray]:
    """The reference prompt with 3000 new tokens: a stream that runs for seconds."""
    return _inputs(reference, max_new_tokens=np.array([3000], np.int32))


def test_a_full_queue_refuses_new_requests_as_busy(
    engine_for: Callable[[str], LLMEngine], reference: HFReference, long_request: dict[str, np.ndarray]
) -> None:
    loop = GenerationLoop(engine_for("alt"), settings=SchedulerSettings(max_batch=1, max_queue=2))
    loop.start()
    try:
        running = RecordingSink()
        loop.submit("long", long_request, running)
        assert running.started.wait(30)
        queued = [RecordingSink(), RecordingSink()]
        for i, sink in enumerate(queued):
            loop.submit(f"q{i}", _inputs(reference, max_new_tokens=np.array([2], np.int32)), sink)
        refused = RecordingSink()
        loop.submit("one-too-many", _inputs(reference), refused)
        assert refused.done.is_set() and not refused.tokens
        assert isinstance(refused.errors[0], WorkerBusy) and isinstance(refused.errors[0], ModelNotReady)
        assert "busy and unavailable for new requests" in refused.errors[0].message
        assert "2 wait (max_queue 2)" in refused.errors[0].message
        running.cancel_now = True
        for sink in queued:
            assert sink.done.wait(60) and sink.finished == ["length"]
            assert tuple(sink.tokens) == reference.tokens[:2]
        assert running.was_cancelled and not running.finished
    finally:
        loop.stop()


def test_cancelling_a_stream_frees_its_slot_for_the_next_request_at_once(
    engine_for: Callable[[str], LLMEngine], reference: HFReference, long_request: dict[str, np.ndarray]
) -> None:
    metrics = RecordingMetrics()
    loop = GenerationLoop(engine_for("alt"), settings=SchedulerSettings(max_batch=1, max_queue=4), metrics=metrics)
    loop.start()
    try:
        running = RecordingSink()
        loop.submit("long", long_request, running)
        assert _wait_for(lambda: len(running.tokens) >= 5)
        waiting = RecordingSink()
        loop.submit("next", _inputs(reference, max_new_tokens=np.array([8], np.int32)), waiting)
        time.sleep(0.1)
        assert not waiting.started.is_set(), "max_batch is 1: the second request waits for the slot"
        cancelled_at = time.monotonic()
        running.cancel_now = True
        assert waiting.done.wait(60)
        assert running.was_cancelled and not running.finished and len(running.tokens) < 3000
        assert waiting.token_times[0] - cancelled_at < 1.0
        assert tuple(waiting.tokens) == reference.tokens and waiting.finished == ["length"]
        assert _wait_for(lambda: metrics.loads[-1] == (0, 0, 0)), "the cancelled cache was not freed"
    finally:
        loop.stop()


def test_stopping_fails_running_and_queued_requests_as_shutting_down(
    engine_for: Callable[[str], LLMEngine], reference: HFReference, long_request: dict[str, np.ndarray]
) -> None:
    loop = GenerationLoop(engine_for("alt"), settings=SchedulerSettings(max_batch=1, max_queue=4))
    loop.start()
    running, queued = RecordingSink(), RecordingSink()
    loop.submit("long", long_request, running)
    assert running.started.wait(30)
    loop.submit("queued", _inputs(reference), queued)
    loop.stop()
    for sink in (running, queued):
        assert sink.done.is_set() and isinstance(sink.errors[0], ModelNotReady)
        assert "shutting down" in sink.errors[0].message


def test_scheduler_settings_come_from_the_environment() -> None:
    def scheduler(env):
        return load_settings(LLMWorkerSettings, "SQUINT_LLM_", env=env).scheduler()

    assert scheduler({}) == SchedulerSettings(max_batch=64, max_queue=64)
    assert scheduler({"SQUINT_LLM_MAX_BATCH": "3", "SQUINT_LLM_MAX_QUEUE": "5"}) == SchedulerSettings(
        max_batch=3, max_queue=5
    )
    with pytest.raises(SettingsError, match="SQUINT_LLM_MAX_BATCH is 0; it must be at least 1"):
        scheduler({"SQUINT_LLM_MAX_BATCH": "0"})
    with pytest.raises(SettingsError, match="SQUINT_LLM_MAX_QUEUE='many'"):
        scheduler({"SQUINT_LLM_MAX_QUEUE": "many"})


def test_the_decode_tile_is_a_setting_checked_where_it_is_read(
    engine_for: Callable[[str], LLMEngine], llm_pack
) -> None:
    assert (
        load_settings(LLMWorkerSettings, "SQUINT_LLM_", env={}).decode_tile == engine_for("default").decoder.decode_tile
    )
    assert load_settings(LLMWorkerSettings, "SQUINT_LLM_", env={"SQUINT_LLM_DECODE_TILE": "1"}).decode_tile == 1
    for bad in ("0", "40"):
        with pytest.raises(
            SettingsError, match=f"SQUINT_LLM_DECODE_TILE is {bad}; it must be 1..31 or a multiple of 64"
        ):
            load_settings(LLMWorkerSettings, "SQUINT_LLM_", env={"SQUINT_LLM_DECODE_TILE": bad})
    assert LLMEngine.load(llm_pack("alt").llava_dir, decode_tile=1).decoder.decode_tile == 1


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
    with pytest.raises(
        SettingsError,
        match="'pack' is unknown; known: decode_tile, default_max_new_tokens, dtype, max_batch, max_queue, pack_dir",
    ):
        settings_from_triton_args(_args({"pack": "x"}), env={})
    with pytest.raises(SettingsError, match="SQUINT_LLM_DTYPE='bf16': expected one of auto, float32, float16"):
        settings_from_triton_args(_args({}), env={"SQUINT_LLM_DTYPE": "bf16"})
    with pytest.raises(SettingsError, match="instance_group kind 'MODEL'"):
        settings_from_triton_args(_args({}, kind="MODEL"), env={})
    with pytest.raises(SettingsError, match="no model pack configured: set SQUINT_LLM_PACK_DIR"):
        LLMWorkerSettings().require_pack()
    with pytest.raises(SettingsError, match="is not a model pack"):
        LLMWorkerSettings(pack_dir=tmp_path).require_pack()
