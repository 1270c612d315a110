"""``squint bench``: the Hugging Face baseline and the real Squint stack, side by side in one run.

In order, on one pack:

1. **Baseline**: ``LlavaForConditionalGeneration`` in this process with all 576 visual tokens,
   greedy, the same prompt, kind of image and ``max_new_tokens`` as the stack gets. It is loaded
   once; its samples are taken before every round of step 2 and after the last, while the
   stack idles, so a machine whose load drifts weighs on both alike.
2. **The stack** (``squint.app.stack.Stack``: tritonserver, a vision worker, the orchestrator, a
   private ``redis-server`` unless ``redis_url`` names one), the compressor cases round-robin:
   an untimed warm-up request per case, ``repeats`` rounds of one request per case on a fresh
   image (every cache misses: cold), then ``warm_repeats`` rounds on each case's last image
   again (every cache hits: warm).
3. **Media**: ``media_images`` images and a ``video_frames``-frame video, each request under a
   ``media_budget`` visual-token budget.
4. **Vision throughput**: the stack is stopped; two vision workers start, identical but for
   ``SQUINT_VISION_BATCHING_MAX_BATCH`` (1 and ``batched_max_batch``), and 1, 4 and 8
   concurrent clients call ``Analyze`` (one fresh image each call, compressor ``none``: a
   CLIP forward and the projector), every (clients, worker) point once per round.

Times are taken by the client (``time.perf_counter``) from sending the request: TTFT to the
first generated token, end to end to the last message. Every figure is the median of its
repeats. Nothing asserts on time; :func:`bench.results.evaluate_targets` reports the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image, ImageDraw

from bench.plot import draw_ttft_plot
from bench.progress import Progress
from bench.results import Report, Row, Sample, ThroughputPoint, aggregate, render_table, with_baseline, write_json

logger = logging.getLogger(__name__)

DEFAULT_PACK_DIR = Path(".squint/packs/medium")
DEFAULT_OUT_DIR = Path(".squint/bench")
JSON_NAME, PNG_NAME, TABLE_NAME = "bench.json", "ttft.png", "table.txt"
QUESTION = "What is in this image?"


@dataclass(frozen=True)
class Case:
    """One compressor setting the stack is measured with."""

    name: str  # how the table names it
    compressor: str
    params: Mapping[str, Any] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("none", "none"),
    Case("avgpool", "avgpool"),
    Case("dfmr", "dfmr"),
    Case("staged_pool layer=-1", "staged_pool", {"layer": -1}),
    Case("staged_pool layer=2", "staged_pool", {"layer": 2}),
    Case("text_recovery", "text_recovery"),
    Case("stf", "stf"),
)


@dataclass(frozen=True)
class BenchSettings:
    """How much ``squint bench`` measures. :data:`FULL` and :data:`QUICK` are the presets."""

    mode: str = "full"
    repeats: int = 5  # cold-cache requests per case, each on a fresh image
    warm_repeats: int = 3  # warm-cache requests per case, on its last cold image again
    max_new_tokens: int = 32
    cases: tuple[Case, ...] = CASES
    clients: tuple[int, ...] = (1, 4, 8)
    requests_per_client: int = 2  # sequential Analyze calls per client and repeat
    throughput_repeats: int = 2
    batched_max_batch: int = 8
    media_images: int = 8
    video_frames: int = 16
    media_budget: int = 576
    media_repeats: int = 2
    media_compressor: str = "avgpool"
    question: str = QUESTION
    device: str = "cpu"
    image_size: tuple[int, int] = (400, 300)
    request_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("repeats", "max_new_tokens", "requests_per_client", "throughput_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} is {getattr(self, name)}; it must be at least 1")


FULL = BenchSettings()
QUICK = BenchSettings(mode="quick", repeats=2, warm_repeats=2, max_new_tokens=8, media_repeats=1)


# --------------------------------------------------------------------------- inputs


def _stamp(nonce: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{nonce}/{index}".encode()).digest()[:8], "big")


def picture(seed: int, stamp: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A seeded picture (gradient and shapes) with ``stamp``'s 64 bits drawn in its corner, so
    every stamp is a different image to the cache and to CLIP."""
    rng = np.random.RandomState(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    start, end = rng.randint(0, 256, 3), rng.randint(0, 256, 3)
    t = ((x / width + y / height) / 2)[..., None]
    image = Image.fromarray((start * (1 - t) + end * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randint(0, width - 20), rng.randint(0, height - 20)
        box = [x0, y0, x0 + rng.randint(15, width // 2), y0 + rng.randint(15, height // 2)]
        colour = tuple(int(c) for c in rng.randint(0, 256, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)(box, fill=colour)
    for bit in range(64):
        on = (stamp >> bit) & 1
        cx, cy = (bit % 8) * 5, (bit // 8) * 5
        draw.rectangle([cx, cy, cx + 4, cy + 4], fill=(255, 255, 255) if on else (0, 0, 0))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Images:
    """Fresh images for the run: every call gives one nobody has cached (a per-run nonce)."""

    def __init__(self, size: tuple[int, int], nonce: str | None = None) -> None:
        self.size = size
        self.nonce = nonce or os.urandom(8).hex()
        self._next = 0

    def fresh(self, seed: int = 0) -> bytes:
        self._next += 1
        return png_bytes(picture(seed, _stamp(self.nonce, self._next), self.size))

    def video(self, frames: int, fps: int = 8, side: int = 336) -> bytes:
        """An MP4 of ``frames`` different pictures (none a near-duplicate of the one before)."""
        import av

        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as output:
            stream = output.add_stream("mpeg4", rate=fps)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for i in range(frames):
                self._next += 1
                pixels = np.asarray(picture(1000 + i, _stamp(self.nonce, self._next), (side, side)))
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                for packet in stream.encode(frame):
                    output.mux(packet)
            for packet in stream.encode():
                output.mux(packet)
        return buffer.getvalue()


# --------------------------------------------------------------------------- KV cache and memory


@dataclass(frozen=True)
class KVShape:
    """What one token costs in the LLM's KV cache, per layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of_pack(cls, llava_dir: Path, dtype_bytes: int) -> KVShape:
        text = json.loads((llava_dir / "config.json").read_text())["text_config"]
        heads = text["num_attention_heads"]
        return cls(
            layers=text["num_hidden_layers"],
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            dtype_bytes=dtype_bytes,
        )

    @property
    def per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes  # K and V


def kv_bytes(shape: KVShape, prompt_tokens: int, completion_tokens: int, pooled: Sequence[tuple[int, int]] = ()) -> int:
    """K and V bytes held for a request when it ends: every layer holds the prompt and the
    generated tokens but the last (never fed back); ``pooled`` lists (layer K, tokens removed)
    for image spans pooled inside the LLM, which layers K and above hold shortened."""
    length = prompt_tokens + max(completion_tokens - 1, 0)
    total = 0
    for layer in range(shape.layers):
        held = length - sum(removed for k, removed in pooled if layer >= k)
        total += held * shape.per_token_layer
    return total


def in_llm_pooling(case: Case, grid_tokens: int) -> list[tuple[int, int]]:
    """(layer K, tokens removed) when ``case`` pools its image inside the LLM, else []."""
    if case.compressor != "staged_pool":
        return []
    from compressor_plugins.builtin.staged_pool import StagedPooling
    from compressor_plugins.protocol import resolve_params

    params = resolve_params(StagedPooling, dict(case.params))
    if params["layer"] < 0:
        return []
    stride = params["stride"]
    if params["shape"] == "2d":
        side = int(round(grid_tokens**0.5))
        kept = (side // stride) ** 2
    else:
        kept = grid_tokens // stride
    return [(params["layer"], grid_tokens - kept)]


def _status_kb(pid: int | str, field_name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class PeakMemory:
    """Peak resident memory (VmHWM) of a set of processes, reset by writing 5 to clear_refs."""

    def __init__(self, pids: Callable[[], Sequence[int | str]]) -> None:
        self._pids = pids

    def reset(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        return sum(_status_kb(pid, "VmHWM") for pid in self._pids()) * 1024


class GaugeProbe:
    """Polls a Prometheus gauge in a thread while a request runs and keeps the largest value."""

    def __init__(self, url: str | None, name: str, interval_s: float = 0.1) -> None:
        self.url, self.interval_s = url, interval_s
        self._pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.MULTILINE)
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float:
        assert self.url is not None
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        return sum(float(v) for v in self._pattern.findall(text))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, self.read())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GaugeProbe:
        self.peak = 0.0
        if self.url:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kv-gauge", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
            self._thread = None


# --------------------------------------------------------------------------- the baseline


class _TokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_at is None:  # the first put is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class Baseline:
    """``LlavaForConditionalGeneration`` in this process: the reference the stack is compared to."""

    def __init__(self, llava_dir: Path, device: str, question: str, max_new_tokens: int) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the bench's own bar is on stderr
        self._torch = torch
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(llava_dir)
        # The stack's dtypes: float32 on the CPU, float16 on a GPU (Triton's gpu model config).
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=self.dtype).to(device).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        self.prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def run(self, image: bytes) -> Sample:
        from llm_worker.staged import cache_bytes

        torch = self._torch
        clock = _TokenClock()
        started = time.perf_counter()
        inputs = self.processor(images=Image.open(io.BytesIO(image)), text=self.prompt, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # floating tensors (pixels) take the dtype too
        prompt_tokens = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                streamer=clock,
                return_dict_in_generate=True,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        finished = time.perf_counter()
        completion = int(output.sequences.shape[1]) - prompt_tokens
        visual = int(self.model.config.image_seq_length)
        return Sample(
            ttft_s=(clock.first_token_at or finished) - started,
            e2e_s=finished - started,
            completion_tokens=completion,
            prompt_tokens=prompt_tokens,
            visual_tokens=visual,
            tokens_before=visual,
            kv_bytes=cache_bytes(output.past_key_values),
        )

    def close(self) -> None:
        del self.model
        gc.collect()


# --------------------------------------------------------------------------- the stack


def _usage_sample(
    usage: Any, ttft_s: float, e2e_s: float, kv: KVShape, pooled: Sequence[tuple[int, int]], gauge: float
) -> Sample:
    media = list(usage.media)
    return Sample(
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        completion_tokens=usage.completion_tokens,
        prompt_tokens=usage.prompt_tokens,
        visual_tokens=usage.visual_tokens,
        tokens_before=sum(m.tokens_before for m in media),
        kv_bytes=kv_bytes(kv, usage.prompt_tokens, usage.completion_tokens, pooled),
        kv_gauge_bytes=int(gauge),
        encode_ms=usage.timings.encode_ms,
        worker_encode_ms=sum(m.encode_ms for m in media),
        cache_hits=sum(1 for m in media if m.cache_hit),
        items=len(media),
        kept=sum(1 for m in media if not m.HasField("duplicate_of")),
    )


class StackClient:
    """Times streamed Generate calls against a running stack."""

    def __init__(self, address: str, kv: KVShape, triton_metrics_url: str | None, timeout_s: float) -> None:
        from squint.generate.v1 import generate_pb2_grpc
        from squint.rpc import channel_options

        self._channel = grpc.insecure_channel(address, options=channel_options(256 * 1024 * 1024))
        self._stub = generate_pb2_grpc.GenerationServiceStub(self._channel)
        self.kv = kv
        self.probe = GaugeProbe(triton_metrics_url, "squint_llm_kv_cache_bytes")
        self.timeout_s = timeout_s

    def run(self, request: Any, pooled: Sequence[tuple[int, int]] = ()) -> Sample:
        with self.probe:
            started = time.perf_counter()
            first: float | None = None
            usage = None
            for message in self._stub.GenerateStream(request, timeout=self.timeout_s):
                if message.token_ids and first is None:
                    first = time.perf_counter()
                if message.HasField("usage"):
                    usage = message.usage
            finished = time.perf_counter()
        if usage is None:
            raise RuntimeError("the stream ended without usage; is the orchestrator healthy?")
        return _usage_sample(usage, (first or finished) - started, finished - started, self.kv, pooled, self.probe.peak)

    def close(self) -> None:
        self._channel.close()


def image_request(
    question: str, images: Sequence[bytes], case: Case | None, max_new_tokens: int, budget: int = 0
) -> Any:
    from squint.app.client import build_request

    return build_request(
        question,
        images,
        compressor=case.compressor if case else "",
        params=dict(case.params) if case else None,
        budget=budget,
        max_new_tokens=max_new_tokens,
    )


def video_request(question: str, video: bytes, frames: int, compressor: str, max_new_tokens: int, budget: int) -> Any:
    from squint.generate.v1 import generate_pb2 as pb
    from squint.wire import compressor_spec

    return pb.GenerateRequest(
        chunks=[pb.Chunk(video=pb.Video(data=video, max_frames=frames)), pb.Chunk(text=question)],
        visual_token_budget=budget,
        compressor=compressor_spec(compressor),
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens),
    )


def _stack_pids(stack: Any) -> list[int]:
    roots = [p for p in (stack.orchestrator.pid, *(v.pid for v in stack.visions), stack.triton.pid) if p]
    return [pid for root in roots for pid in descendants(root)]


def with_peak(memory: PeakMemory, run: Callable[[], Sample]) -> Sample:
    """``run()``'s sample with the peak resident memory its processes reached while it ran."""
    memory.reset()
    sample = run()
    return dataclasses.replace(sample, peak_rss_bytes=memory.peak_bytes())


class CaseRuns:
    """The compressor cases, measured round-robin: each round sends one request per case, so a
    burst of load from elsewhere lands on one repeat of several cases, not on every repeat of
    one. A case whose request fails is reported and left out of later rounds."""

    def __init__(
        self,
        settings: BenchSettings,
        client: StackClient,
        memory: PeakMemory,
        images: Images,
        grid_tokens: int,
        progress: Progress,
        failures: list[str],
    ) -> None:
        self.settings, self.client, self.memory, self.images = settings, client, memory, images
        self.progress, self.failures = progress, failures
        self.cases = list(settings.cases)
        self.pooled = {case.name: in_llm_pooling(case, grid_tokens) for case in self.cases}
        self.cold: dict[str, list[Sample]] = {case.name: [] for case in self.cases}
        self.warm: dict[str, list[Sample]] = {case.name: [] for case in self.cases}
        self.last: dict[str, bytes] = {}

    def _each(self, label: str, request_for: Callable[[Case], Any], into: dict[str, list[Sample]] | None) -> None:
        for case in list(self.cases):
            self.progress.show(f"{case.name}: {label}")
            request = request_for(case)
            try:
                sample = with_peak(self.memory, lambda: self.client.run(request, self.pooled[case.name]))
            except grpc.RpcError as exc:
                self.failures.append(f"{case.name}: {exc.code().name}: {exc.details()}")
                self.progress.note(f"{case.name} failed ({self.failures[-1]}); going on without it")
                self.cases.remove(case)
                continue
            finally:
                self.progress.step(f"{case.name}: {label}")
            if into is not None:
                into[case.name].append(sample)

    def _request(self, case: Case, image: bytes, max_new_tokens: int) -> Any:
        return image_request(self.settings.question, [image], case, max_new_tokens)

    def warm_up(self) -> None:
        """One untimed request per case: first-call costs are not the compressor's."""
        self._each("warm-up", lambda case: self._request(case, self.images.fresh(), 1), None)

    def cold_round(self, number: int) -> None:
        def fresh(case: Case) -> Any:
            self.last[case.name] = self.images.fresh()
            return self._request(case, self.last[case.name], self.settings.max_new_tokens)

        self._each(f"cold {number}/{self.settings.repeats}", fresh, self.cold)

    def warm_round(self, number: int) -> None:
        self._each(
            f"warm {number}/{self.settings.warm_repeats}",
            lambda case: self._request(case, self.last[case.name], self.settings.max_new_tokens),
            self.warm,
        )

    def rows(self) -> list[Row]:
        """A cold row and (when measured) a warm row per case that did not fail."""
        out = []
        for case in self.cases:
            cold = aggregate(case.name, case.compressor, "cold", self.cold[case.name])
            out.append(cold)
            if self.warm[case.name]:
                out.append(aggregate(case.name, case.compressor, "warm", self.warm[case.name], cold=cold))
        return out


# --------------------------------------------------------------------------- vision throughput


def _scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


class VisionWorkerProcess:
    """A vision worker of the bench's own (the stack's launch line), with its own batching."""

    def __init__(self, pack_root: Path, device: str, max_batch: int, folder: Path) -> None:
        from squint.app.stack import GrpcProcess

        folder.mkdir(parents=True, exist_ok=True)
        name = f"vision_max_batch_{max_batch}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SQUINT_VISION_BATCHING_MAX_BATCH": str(max_batch)}
        self.max_batch = max_batch
        self.metrics_port_file = folder / f"{name}.metrics.port"
        self.process = GrpcProcess(
            f"vision worker (max_batch {max_batch})",
            [
                sys.executable,
                "-m",
                "squint",
                "serve",
                "vision",
                "--pack",
                str(pack_root),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--device",
                device,
                "--redis-url",
                "",
                "--port-file",
                str(folder / f"{name}.port"),
                "--metrics-port",
                "0",
                "--metrics-port-file",
                str(self.metrics_port_file),
            ],
            env,
            folder / f"{name}.log",
            folder / f"{name}.port",
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port_file.read_text().strip()}/metrics"

    def start(self) -> None:
        self.process.start()

    def wait_ready(self, timeout: float) -> None:
        self.process.wait_ready("127.0.0.1", timeout)

    def stop(self) -> None:
        self.process.stop()


async def _analyze_all(address: str, batches: Sequence[Sequence[bytes]], timeout_s: float) -> float:
    """Every client sends its images one Analyze call after another; the wall time of all."""
    from squint.rpc import channel_options
    from squint.vision.v1 import vision_worker_pb2 as pb
    from squint.vision.v1 import vision_worker_pb2_grpc as pb_grpc
    from squint.wire import compressor_spec

    async with grpc.aio.insecure_channel(address, options=channel_options(256 * 1024 * 1024)) as channel:
        stub = pb_grpc.VisionWorkerStub(channel)
        spec = compressor_spec("none")

        async def client(images: Sequence[bytes]) -> None:
            for data in images:
                await stub.Analyze(
                    pb.AnalyzeRequest(images=[pb.ImageInput(data=data)], compressor=spec), timeout=timeout_s
                )

        started = time.perf_counter()
        await asyncio.gather(*(client(images) for images in batches))
        return time.perf_counter() - started


@dataclass
class ThroughputRuns:
    """Passes of Analyze calls against one worker at one client count, and its batching counters."""

    worker: VisionWorkerProcess
    clients: int
    images: int = 0
    times: list[float] = field(default_factory=list)
    forwards: float = 0.0
    batched: float = 0.0

    def run_pass(self, settings: BenchSettings, images: Images) -> None:
        """Every client sends ``requests_per_client`` fresh images, one Analyze call after another."""
        batches = [[images.fresh(seed=c) for _ in range(settings.requests_per_client)] for c in range(self.clients)]
        before = _scrape(self.worker.metrics_url)
        self.times.append(asyncio.run(_analyze_all(self.worker.address, batches, settings.request_timeout_s)))
        after = _scrape(self.worker.metrics_url)
        self.images = self.clients * settings.requests_per_client
        self.forwards += after.get("squint_vision_batch_size_count", 0) - before.get(
            "squint_vision_batch_size_count", 0
        )
        self.batched += after.get("squint_vision_batch_size_sum", 0) - before.get("squint_vision_batch_size_sum", 0)

    def point(self) -> ThroughputPoint:
        return ThroughputPoint(
            clients=self.clients,
            max_batch=self.worker.max_batch,
            images=self.images,
            seconds=float(np.median(self.times)),
            repeats=len(self.times),
            mean_batch=self.batched / self.forwards if self.forwards else 0.0,
        )


# --------------------------------------------------------------------------- the run


def ensure_pack(pack_dir: Path | None, progress: Progress | None = None) -> Path:
    """The pack to measure: ``pack_dir`` when given, else the medium pack in
    ``.squint/packs/medium``, written there the first time (about 1 GB, ~20 s)."""
    from squint.packs import PackError, load_pack

    if pack_dir is not None:
        return load_pack(pack_dir).root
    try:
        return load_pack(DEFAULT_PACK_DIR).root
    except PackError:
        pass
    from squint.app.tiny_pack import write_tiny_pack

    if progress is not None:
        progress.note(f"writing the medium pack into {DEFAULT_PACK_DIR} (once; about 1 GB) ...")
    return write_tiny_pack(DEFAULT_PACK_DIR, seed=0, shape="medium").root


def baseline_count(settings: BenchSettings) -> int:
    """Baseline samples: one before every round of the cases (cold and warm) and one after the last."""
    return settings.repeats + settings.warm_repeats + 1


def total_steps(settings: BenchSettings) -> int:
    """The progress bar's steps: what :func:`run_bench` counts."""
    per_case = 1 + settings.repeats + settings.warm_repeats
    return (
        1  # the baseline's model is loaded and warm
        + baseline_count(settings)
        + 1  # the stack starts
        + len(settings.cases) * per_case
        + settings.media_repeats * (bool(settings.media_images) + bool(settings.video_frames))
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
    stack.start()
    try:
        meta["cache"] = stack.cache_note
        progress.step("stack ready")
        client = StackClient(stack.orchestrator_address, kv, stack.triton.metrics_url, settings.request_timeout_s)
        memory = PeakMemory(lambda: _stack_pids(stack))
        try:
            runs = CaseRuns(settings, client, memory, images, grid_tokens, progress, failures)
            runs.warm_up()
            for number in range(1, settings.repeats + 1):
                baseline_sample()
                runs.cold_round(number)
            for number in range(1, settings.warm_repeats + 1):
                baseline_sample()
                runs.warm_round(number)
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
            media_case = Case(settings.media_compressor, settings.media_compressor)
            media: list[tuple[str, Callable[[], Any]]] = []
            if settings.media_images:
                media.append(
                    (
                        f"{settings.media_images} images",
                        lambda: image_request(
                            settings.question,
                            [images.fresh(seed=i) for i in range(settings.media_images)],
                            media_case,
                            settings.max_new_tokens,
                            settings.media_budget,
                        ),
                    )
                )
            if settings.video_frames:
                media.append(
                    (
                        f"{settings.video_frames}-frame video",
                        lambda: video_request(
                            settings.question,
                            images.video(settings.video_frames),
                            settings.video_frames,
                            settings.media_compressor,
                            settings.max_new_tokens,
                            settings.media_budget,
                        ),
                    )
                )
            for name, build in media:
                samples = []
                for r in range(settings.media_repeats):
                    progress.show(f"{name} {r + 1}/{settings.media_repeats}")
                    request = build()
                    try:
                        samples.append(with_peak(memory, lambda: client.run(request)))
                    except grpc.RpcError as exc:
                        failures.append(f"{name}: {exc.code().name}: {exc.details()}")
                        progress.note(f"{name} failed ({failures[-1]})")
                    progress.step(f"{name} {r + 1}/{settings.media_repeats}")
                if samples:
                    media_rows.append(
                        aggregate(
                            f"{name} ({settings.media_compressor})",
                            settings.media_compressor,
                            "cold",
                            samples,
                            budget=settings.media_budget,
                        )
                    )
        finally:
            client.close()
    finally:
        progress.show("stopping the stack")
        stack.stop()

    # 4. Vision-worker throughput, with and without micro-batching.
    points: list[ThroughputPoint] = []
    if settings.clients:
        folder = out_dir / "stack" / "logs"
        workers = [VisionWorkerProcess(pack.root, settings.device, n, folder) for n in (1, settings.batched_max_batch)]
        progress.show(f"starting two vision workers (max_batch 1 and {settings.batched_max_batch})")
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_ready(300)
            for worker in workers:  # connections and first calls, untimed
                asyncio.run(_analyze_all(worker.address, [[images.fresh()]], settings.request_timeout_s))
            progress.step("vision throughput")
            passes = [ThroughputRuns(worker, clients) for clients in settings.clients for worker in workers]
            for number in range(1, settings.throughput_repeats + 1):
                for one in passes:  # round-robin, so background load drifts over every point alike
                    label = (
                        f"vision throughput {number}/{settings.throughput_repeats}: "
                        f"{one.clients} clients, max_batch {one.worker.max_batch}"
                    )
                    progress.show(label)
                    one.run_pass(settings, images)
                    progress.step(label)
            points = [one.point() for one in passes]
        finally:
            for worker in workers:
                worker.stop()

    meta["wall_s"] = time.perf_counter() - started
    meta["load_average_end"] = os.getloadavg()[0]
    return Report(meta=meta, baseline=baseline, rows=rows, throughput=points, media=media_rows)


def write_outputs(report: Report, out_dir: Path) -> dict[str, Path]:
    """The JSON, the PNG and the table as text into ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "png": out_dir / PNG_NAME, "table": out_dir / TABLE_NAME}
    write_json(report, paths["json"])
    meta = report.meta
    draw_ttft_plot(
        report,
        paths["png"],
        title=f"TTFT against visual tokens: {meta.get('pack_id', '')} on {meta.get('device', '')} "
        f"({meta.get('mode', '')}; filled: cold cache, ring: warm)",
    )
    paths["table"].write_text(render_table(report) + "\n")
    return paths


def main(pack: str | None, out: str | None, quick: bool, device: str, redis_url: str | None) -> int:
    """``squint bench``: measure, print the table, write JSON and PNG."""
    settings = dataclasses.replace(QUICK if quick else FULL, device=device)
    progress = Progress(total_steps(settings))
    pack_root = ensure_pack(Path(pack) if pack else None, progress)
    out_dir = Path(out) if out else DEFAULT_OUT_DIR
    # Server logs go to out_dir/stack/logs; keep the terminal for the bar and the table.
    logging.getLogger().setLevel(logging.WARNING)
    report = run_bench(pack_root, out_dir, settings, redis_url=redis_url, progress=progress)
    paths = write_outputs(report, out_dir)
    progress.step("done")
    progress.close()
    print(render_table(report))
    print()
    print(f"wall time {report.meta['wall_s'] / 60:.1f} min; wrote {paths['json']}, {paths['png']} and {paths['table']}")
    return 0


__all__ = [
    "CASES",
    "FULL",
    "QUICK",
    "BenchSettings",
    "Case",
    "CaseRuns",
    "Images",
    "KVShape",
    "PeakMemory",
    "baseline_count",
    "descendants",
    "ensure_pack",
    "in_llm_pooling",
    "kv_bytes",
    "main",
    "run_bench",
    "total_steps",
    "write_outputs",
]
