"""One ``squint bench`` run: the Hugging Face baseline and the real Squint stack, side by side.

In order, on one pack:

1. **Baseline**: ``LlavaForConditionalGeneration`` in this process with all 576 visual tokens,
   greedy, the same prompt, kind of image and ``max_new_tokens`` as the stack gets. It is loaded
   once; its samples are taken before every round of step 2 and after the last, while the
   stack idles, so a machine whose load drifts weighs on both alike.
2. **The stack** (``squint.app.stack.Stack``: tritonserver with both LLM engines, a vision
   worker, the orchestrator, a private ``redis-server`` unless ``redis_url`` names one; and,
   when a case or the stream table needs the staged engine without in-LLM pooling, a second
   orchestrator whose ``triton_model`` is ``squint_llm_staged``), the compressor cases
   round-robin: an untimed warm-up request per case, ``repeats`` rounds of one request per case
   on a fresh image (every cache misses: cold), then ``warm_repeats`` rounds on each case's last
   image again (every cache hits: warm), then ``warm_repeats`` rounds of a new question on it
   for ``text_recovery`` (the image's features cached, the question's embedding not).
3. **Media**: ``media_images`` images and a ``video_frames``-frame video, each request under a
   ``media_budget`` visual-token budget.
4. **Floors** (:mod:`bench.floors`): CLIP alone in this process, and each cold row's prefill
   alone sent to its engine's Triton model, ``floor_repeats`` times each.
5. **LLM throughput** (:mod:`bench.streams`): 1, 4 and 16 concurrent streams through the stack
   on each engine of ``stream_engines``, cached images.
6. **Vision micro-batching** (informational: no target): the stack is stopped; two vision
   workers start, identical but for ``SQUINT_VISION_BATCHING_MAX_BATCH`` (1 and
   ``batched_max_batch``), and 1, 4 and 8 concurrent clients call ``Analyze`` (one fresh image
   each call, compressor ``none``: a CLIP forward and the projector), every (clients, worker)
   point once per round.

Times are taken by the client (``time.perf_counter``) from sending the request: TTFT to the
first generated token, end to end to the last message. Every figure is the median of its
repeats. Nothing asserts on time; :func:`bench.results.evaluate_targets` reports the ratios.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from bench.baseline import Baseline
from bench.environment import environ
from bench.floors import floor_steps, measure_floors, prefill_prompts
from bench.kv import KVShape
from bench.media import Images
from bench.probes import PeakMemory, stack_pids, with_peak
from bench.progress import Progress
from bench.results import (
    Floors,
    Report,
    Row,
    Sample,
    StreamPoint,
    ThroughputPoint,
    aggregate,
    with_baseline,
    with_floors,
)
from bench.settings import ENGINE_MODELS, FULL, STAGED, VLLM, BenchSettings
from bench.stack_runs import CaseRuns, StackClient, media_runs, question_cases
from bench.streams import measure_streams, stream_steps
from bench.throughput import measure_throughput

# The bench's second orchestrator: every request to the staged engine (its triton_model).
STAGED_ORCHESTRATOR_ENV = {"SQUINT_ORCHESTRATOR_TRITON_MODEL": ENGINE_MODELS[STAGED]}


def baseline_count(settings: BenchSettings) -> int:
    """Baseline samples: one before every round of the cases (cold and warm) and one after the last."""
    return settings.repeats + settings.warm_repeats + 1


def needs_staged_orchestrator(settings: BenchSettings) -> bool:
    """Whether anything sends requests without in-LLM pooling to the staged engine."""
    return STAGED in settings.stream_engines or any(
        case.engine == STAGED and not case.pools_in_llm for case in settings.cases
    )


def total_steps(settings: BenchSettings) -> int:
    """The progress bar's steps: what :func:`run_bench` counts."""
    per_case = 1 + settings.repeats + settings.warm_repeats
    return (
        1  # the baseline's model is loaded and warm
        + baseline_count(settings)
        + 1  # the stack starts
        + len(settings.cases) * per_case
        + len(question_cases(settings.cases)) * settings.warm_repeats
        + settings.media_repeats * (bool(settings.media_images) + bool(settings.video_frames))
        + floor_steps(settings.floor_repeats)
        + stream_steps(settings)
        + (1 + 2 * len(settings.clients) * settings.throughput_repeats if settings.clients else 0)
        + 1  # the outputs are written
    )


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_bench(
    pack_dir: Path,
    out_dir: Path,
    settings: BenchSettings = FULL,
    *,
    redis_url: str | None = None,
    progress: Progress | None = None,
) -> Report:
    """Measure everything ``settings`` asks for; the stack's logs go to ``out_dir/stack/logs``."""
    from llm_worker.tritonserver import free_port
    from squint.app.stack import Stack, StackSettings
    from squint.packs import load_pack

    pack = load_pack(pack_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "stack", ignore_errors=True)  # the previous run's server logs
    progress = progress or Progress(total_steps(settings))
    started_wall = time.time()
    started = time.perf_counter()
    images = Images(settings.image_size)
    kv = KVShape.of_pack(pack.llava_dir, dtype_bytes=2 if settings.device.startswith("cuda") else 4)
    grid_tokens = int(json.loads((pack.llava_dir / "config.json").read_text()).get("image_seq_length", 576))
    meta: dict[str, Any] = {
        "mode": settings.mode,
        "pack": str(pack.root),
        "pack_id": pack.id,
        "device": settings.device,
        "baseline_repeats": baseline_count(settings),
        "repeats": settings.repeats,
        "warm_repeats": settings.warm_repeats,
        "max_new_tokens": settings.max_new_tokens,
        "question": settings.question,
        "engines": dict(ENGINE_MODELS),
        "llm_max_batch": settings.llm_max_batch,
        "settings": dataclasses.asdict(settings),
        "machine": _machine(),
        "load_average_start": os.getloadavg()[0],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_wall)),
    }

    # 1. The baseline's model, loaded and warmed in this process.
    progress.show("baseline: loading LlavaForConditionalGeneration")
    baseline_model = Baseline(pack.llava_dir, settings.device, settings.question, settings.max_new_tokens)
    baseline_model.run(images.fresh())  # warm-up: first-call costs are not the model's
    progress.step("starting the stack (tritonserver, vision worker, orchestrator)")
    own = PeakMemory(lambda: ["self"])
    baseline_samples: list[Sample] = []

    def baseline_sample() -> None:
        """One baseline request, while the stack idles: the samples spread over the whole run,
        so a machine whose load drifts weighs on the baseline and the stack alike."""
        label = f"baseline {len(baseline_samples) + 1}/{baseline_count(settings)}"
        progress.show(label)
        baseline_samples.append(with_peak(own, lambda: baseline_model.run(images.fresh())))
        progress.step(label)

    # 2. The stack: the cases round-robin, a baseline sample before every round and after the last.
    rows: list[Row] = []
    media_rows: list[Row] = []
    streams: list[StreamPoint] = []
    floors: Floors | None = None
    failures: list[str] = []
    meta["failures"] = failures
    stack = Stack(
        StackSettings.on_free_ports(
            pack_dir=pack.root,
            state_dir=out_dir / "stack",
            redis_url=redis_url if redis_url is not None else f"redis://127.0.0.1:{free_port()}/0",
            device=settings.device,
        )
    )
    staged_orchestrator = None
    try:
        with environ({"SQUINT_LLM_MAX_BATCH": str(settings.llm_max_batch)}):
            stack.start()
        if needs_staged_orchestrator(settings):
            staged_orchestrator = stack.orchestrator_process(
                "orchestrator (staged engine)", "orchestrator_staged", STAGED_ORCHESTRATOR_ENV
            )
            staged_orchestrator.start()
            staged_orchestrator.wait_ready(stack.settings.host, stack.settings.startup_timeout_seconds)
        meta["cache"] = stack.cache_note
        progress.step("stack ready")
        clients = {
            VLLM: StackClient(stack.orchestrator_address, kv, stack.triton.metrics_url, settings.request_timeout_s)
        }
        if staged_orchestrator is not None:
            clients[STAGED] = StackClient(
                f"{stack.settings.host}:{staged_orchestrator.port}",
                kv,
                stack.triton.metrics_url,
                settings.request_timeout_s,
            )
        # The processes that serve a request: the stack's, its orchestrator the one the request went through.
        memory = {VLLM: PeakMemory(lambda: stack_pids(stack))}
        if staged_orchestrator is not None:
            main_pid, staged_pid = stack.orchestrator.pid, staged_orchestrator.pid
            memory[STAGED] = PeakMemory(lambda: [p for p in stack_pids(stack) if p != main_pid] + [staged_pid])
        try:
            runs = CaseRuns(settings, clients, memory, images, grid_tokens, progress, failures)
            runs.warm_up()
            for number in range(1, settings.repeats + 1):
                baseline_sample()
                runs.cold_round(number)
            for number in range(1, settings.warm_repeats + 1):
                baseline_sample()
                runs.warm_round(number)
            for number in range(1, settings.warm_repeats + 1):
                runs.question_round(number)
            baseline_sample()
            baseline_model.close()
            baseline = aggregate("baseline (HF)", "", "-", baseline_samples)
            rows = [with_baseline(row, baseline) for row in runs.rows()]
            progress.note(
                f"baseline: TTFT {baseline.ttft_s:.3f} s, end to end {baseline.e2e_s:.3f} s "
                f"(median of {baseline.repeats} spread over the run)"
            )
            for row in rows:
                progress.note(f"{row.name} ({row.cache}): {row.visual_tokens} visual tokens, TTFT {row.ttft_s:.3f} s")

            # 3. Several images, and a video, under one budget.
            media_rows = media_runs(settings, clients[VLLM], memory[VLLM], images, progress, failures)

            # 4. The floors: CLIP alone, and each cold row's prefill alone.
            pooled = {case.name for case in settings.cases if case.pools_in_llm}
            try:
                floors = measure_floors(
                    pack.root,
                    pack.llava_dir,
                    stack.triton.grpc_url,
                    prefill_prompts(rows, pooled),
                    settings.floor_repeats,
                    settings.device,
                    images,
                    progress,
                )
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on without floors
                failures.append(f"floors: {type(exc).__name__}: {exc}")
                progress.note(f"the floors failed ({failures[-1]}); going on without them")
            rows = with_floors(rows, floors, pooled)

            # 5. The LLM's throughput: concurrent streams on each engine.
            try:
                streams = measure_streams(clients, settings, images, progress, failures)
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on without the table
                failures.append(f"LLM throughput: {type(exc).__name__}: {exc}")
                progress.note(f"the LLM throughput failed ({failures[-1]}); going on without it")
        finally:
            for client in clients.values():
                client.close()
    finally:
        progress.show("stopping the stack")
        if staged_orchestrator is not None:
            staged_orchestrator.stop()
        stack.stop()

    # 6. Vision-worker micro-batching (informational).
    points: list[ThroughputPoint] = []
    if settings.clients:
        points = measure_throughput(pack.root, settings, images, out_dir / "stack" / "logs", progress)

    meta["wall_s"] = time.perf_counter() - started
    meta["load_average_end"] = os.getloadavg()[0]
    return Report(
        meta=meta, baseline=baseline, rows=rows, throughput=points, media=media_rows, streams=streams, floors=floors
    )
