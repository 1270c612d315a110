"""Load benchmark (not a test): N concurrent streaming clients against a whole stack for a while.

Starts a stack of its own on a tiny pack (tritonserver, vision worker(s), orchestrator, a
private redis-server when one is installed), or loads a running one (``--target host:port``).
``--streams`` coroutines each send ``GenerateStream`` requests one after another for
``--duration`` seconds, drawn from a mix: images of several sizes with every built-in
compressor, a short video, and every ``--fresh-every`` th request a new image (a cache miss).
Then it waits for the requests in flight and reports:

- throughput (requests and generated tokens per second);
- p50 / p99 / max of the time to first token and of the latency, as the client measures them;
- errors by gRPC status, and *lost* requests: sent − answered − failed with a status (a stream
  that ended without a finish reason, or did not end within ``--drain-seconds``): must be 0;
- the resident memory of every stack process (tritonserver's python stubs included), sampled
  over the run: at start, peak and end.

It prints a table; ``--json PATH`` writes everything, the memory series included.

    .venv/bin/python bench/load.py --streams 64 --duration 60 [--json load.json]
    .venv/bin/python bench/load.py --target 127.0.0.1:50051 --state-dir .squint/stack   # a running stack

Importable as ``bench.load`` (:func:`run`, :func:`main`); it imports nothing from its siblings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc
from squint.rpc import channel_options
from squint.wire import compressor_spec

logger = logging.getLogger("bench.load")

# Compressor and parameters of the image requests: every built-in.
COMPRESSORS: tuple[tuple[str, dict], ...] = (
    ("avgpool", {"stride": 2}),
    ("avgpool", {"stride": 3}),
    ("dfmr", {}),
    ("text_recovery", {}),
    ("staged_pool", {}),
    ("stf", {}),
    ("none", {}),
)


# --------------------------------------------------------------------------- the request mix


def png(seed: int, width: int, height: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def short_video(frames: int = 16, size: tuple[int, int] = (96, 64), fps: int = 8) -> bytes:
    """An MP4 of ``frames`` frames, each a different flat colour, of ``frames / fps`` seconds."""
    import av

    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return buffer.getvalue()


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix."""

    name: str
    request: pb.GenerateRequest


def request_mix(max_new_tokens: int, images: int = 4, video_frames: int = 4) -> list[Kind]:
    """Every compressor on ``images`` images of different sizes, and a short video with avgpool."""
    sampling = pb.SamplingParams(max_new_tokens=max_new_tokens)
    kinds = []
    for n, (compressor, params) in enumerate(COMPRESSORS):
        for k in range(images):
            image = png(1000 * n + k, 224 + 64 * k, 224 - 16 * k)
            request = pb.GenerateRequest(
                chunks=[pb.Chunk(image=pb.Image(data=image)), pb.Chunk(text=f"What is in picture {k}?")],
                compressor=compressor_spec(compressor, params),
                sampling=sampling,
            )
            kinds.append(Kind(f"image {compressor}" + "".join(f",{p}={v}" for p, v in params.items()), request))
    video = pb.GenerateRequest(
        chunks=[pb.Chunk(video=pb.Video(data=short_video(), max_frames=video_frames)), pb.Chunk(text="What happens?")],
        compressor=compressor_spec("avgpool", {"stride": 3}),
        sampling=sampling,
    )
    kinds.append(Kind("video avgpool,stride=3", video))
    return kinds


def fresh_request(seed: int, max_new_tokens: int) -> Kind:
    """A request with an image no earlier request had: a cache miss and a CLIP forward."""
    request = pb.GenerateRequest(
        chunks=[pb.Chunk(image=pb.Image(data=png(10_000_000 + seed, 256, 192))), pb.Chunk(text="And this one?")],
        compressor=compressor_spec("avgpool", {"stride": 2}),
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens),
    )
    return Kind("image avgpool,stride=2 (fresh)", request)


# --------------------------------------------------------------------------- memory


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class MemorySampler:
    """Samples the RSS of named processes (and their children, summed) every ``interval`` s."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[dict] = []  # {"t": seconds from start, name: bytes, ...}
        self._started = time.monotonic()

    def sample(self) -> None:
        row: dict = {"t": round(time.monotonic() - self._started, 2)}
        for name, pid in self.pids.items():
            total = 0
            for member in (pid, *_children(pid)):
                total += _rss_bytes(member) or 0
            row[name] = total
        self.samples.append(row)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        await asyncio.to_thread(self.sample)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per process: RSS in MiB at start, peak and end."""
        mib = 1024 * 1024
        out = {}
        for name in self.pids:
            series = [row[name] for row in self.samples if row.get(name)]
            if series:
                out[name] = {"start": series[0] / mib, "peak": max(series) / mib, "end": series[-1] / mib}
        return out


# --------------------------------------------------------------------------- the load


@dataclass
class Record:
    kind: str
    sent: float
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0
    finish_reason: str = ""
    status: str = ""  # the gRPC status name when the call failed
    cache_hits: int = 0
    media: int = 0


@dataclass
class Report:
    target: str
    streams: int
    duration_s: float
    wall_s: float
    sent: int
    answered: int
    failed: int
    lost: int
    errors_by_status: dict[str, int]
    requests_per_s: float
    tokens_per_s: float
    ttft_ms: dict[str, float]
    latency_ms: dict[str, float]
    by_kind: dict[str, dict]
    cache_hit_ratio: float
    memory_mib: dict[str, dict[str, float]]
    memory_samples: list[dict] = field(default_factory=list)
    stack: str = ""


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        # Nearest rank: the smallest value with at least q of the values at or below it.
        return ordered[max(0, min(len(ordered) - 1, int(np.ceil(q * len(ordered))) - 1))]

    return {"p50": pct(0.50), "p99": pct(0.99), "max": ordered[-1], "mean": statistics.fmean(ordered)}


async def _one(stub, kind: Kind, record: Record, timeout: float, metadata) -> None:
    try:
        async for message in stub.GenerateStream(kind.request, timeout=timeout, metadata=metadata):
            if message.token_ids and record.first_token is None:
                record.first_token = time.monotonic()
            record.tokens += len(message.token_ids)
            if message.finish_reason:
                record.finish_reason = message.finish_reason
                record.media = len(message.usage.media)
                record.cache_hits = sum(m.cache_hit for m in message.usage.media)
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
    finally:
        record.ended = time.monotonic()


async def run_load(
    target: str,
    streams: int,
    duration: float,
    max_new_tokens: int = 16,
    fresh_every: int = 8,
    request_timeout: float = 120.0,
    drain_seconds: float = 150.0,
    memory_pids: dict[str, int] | None = None,
    sample_seconds: float = 2.0,
    token: str = "",
) -> Report:
    """Run the load and measure it (see the module docstring)."""
    mix = await asyncio.to_thread(request_mix, max_new_tokens)
    records: list[Record] = []
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    sampler = MemorySampler(memory_pids or {}, sample_seconds)
    stop_sampling = asyncio.Event()
    async with grpc.aio.insecure_channel(target, options=channel_options(256 * 1024 * 1024)) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        started = time.monotonic()
        deadline = started + duration
        counter = 0

        async def stream(index: int) -> None:
            nonlocal counter
            n = index
            while time.monotonic() < deadline:
                counter += 1
                kind = (
                    fresh_request(counter, max_new_tokens)
                    if fresh_every and counter % fresh_every == 0
                    else mix[n % len(mix)]
                )
                n += streams
                record = Record(kind.name, time.monotonic())
                records.append(record)
                await _one(stub, kind, record, request_timeout, metadata)
                if record.status:
                    await asyncio.sleep(0.1)  # a client backs off before it retries

        sampling = asyncio.create_task(sampler.run(stop_sampling))
        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        _done, pending = await asyncio.wait(tasks, timeout=duration + drain_seconds)
        for task in pending:  # still waiting on a request long after the end: lost
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - started
        stop_sampling.set()
        await sampling
    return _report(target, streams, duration, wall, records, sampler)


def _report(
    target: str, streams: int, duration: float, wall: float, records: list[Record], sampler: MemorySampler
) -> Report:
    answered = [r for r in records if r.finish_reason and not r.status]
    failed = [r for r in records if r.status]
    # Lost: no finish reason and no status (a stream that ended silently, or never ended).
    lost = len(records) - len(answered) - len(failed)
    by_kind: dict[str, dict] = {}
    for name in sorted({r.kind for r in records}):
        mine = [r for r in records if r.kind == name]
        ok = [r for r in mine if r in answered]
        by_kind[name] = {
            "sent": len(mine),
            "answered": len(ok),
            "ttft_ms_p50": _percentiles([(r.first_token - r.sent) * 1000 for r in ok if r.first_token])["p50"],
            "latency_ms_p50": _percentiles([(r.ended - r.sent) * 1000 for r in ok])["p50"],
        }
    media = sum(r.media for r in answered)
    return Report(
        target=target,
        streams=streams,
        duration_s=duration,
        wall_s=wall,
        sent=len(records),
        answered=len(answered),
        failed=len(failed),
        lost=lost,
        errors_by_status=dict(Counter(r.status for r in failed)),
        requests_per_s=len(answered) / wall,
        tokens_per_s=sum(r.tokens for r in answered) / wall,
        ttft_ms=_percentiles([(r.first_token - r.sent) * 1000 for r in answered if r.first_token]),
        latency_ms=_percentiles([(r.ended - r.sent) * 1000 for r in answered]),
        by_kind=by_kind,
        cache_hit_ratio=sum(r.cache_hits for r in answered) / media if media else 0.0,
        memory_mib=sampler.summary(),
        memory_samples=sampler.samples,
    )


def format_report(report: Report) -> str:
    r = report
    lines = [
        f"load: {r.streams} concurrent streams for {r.duration_s:.0f} "
        f"s against {r.target} ({r.stack or 'a running stack'})",
        f"requests    sent {r.sent}, answered {r.answered}, failed with a status {r.failed}, lost {r.lost}",
        f"throughput  {r.requests_per_s:.1f} requests/s, {r.tokens_per_s:.0f} generated tokens/s over {r.wall_s:.1f} s",
        f"cache       {r.cache_hit_ratio:.0%} of the answered requests' images were cache hits",
        "",
        f"{'':14}{'p50':>9}{'p99':>9}{'max':>9}{'mean':>9}",
    ]
    for label, values in (("TTFT ms", r.ttft_ms), ("latency ms", r.latency_ms)):
        lines.append(f"{label:14}" + "".join(f"{values[k]:9.0f}" for k in ("p50", "p99", "max", "mean")))
    lines.append("")
    errors = ", ".join(f"{name} {count}" for name, count in sorted(r.errors_by_status.items())) or "none"
    lines.append(f"errors by status: {errors}")
    lines += ["", f"{'by kind':36}{'sent':>7}{'answered':>10}{'TTFT p50':>10}{'lat. p50':>10}"]
    for name, k in r.by_kind.items():
        lines.append(f"{name:36}{k['sent']:7d}{k['answered']:10d}{k['ttft_ms_p50']:10.0f}{k['latency_ms_p50']:10.0f}")
    if r.memory_mib:
        lines += ["", f"{'memory (RSS MiB)':30}{'start':>8}{'peak':>8}{'end':>8}"]
        for name, m in r.memory_mib.items():
            lines.append(f"{name:30}{m['start']:8.0f}{m['peak']:8.0f}{m['end']:8.0f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stack


def _stack_pids(stack) -> dict[str, int]:
    pids = {"orchestrator": stack.orchestrator.pid}
    for n, vision in enumerate(stack.visions):
        pids[f"vision worker {n}"] = vision.pid
    pids["tritonserver (+ python stub)"] = stack.triton.pid
    if stack.redis_process is not None:
        pids["redis-server"] = stack.redis_process.pid
    return pids


def _pids_from_state(state_dir: Path) -> dict[str, int]:
    from squint.app.stack import read_state

    state = read_state(state_dir)
    return {name: int(pid) for name, pid in (state or {}).get("pids", {}).items()}


@contextlib.contextmanager
def own_stack(pack_dir: Path | None, vision_workers: int, work_dir: Path):
    """A stack on a tiny pack (written to ``work_dir`` unless ``pack_dir``), Redis private."""
    from llm_worker.tritonserver import free_port
    from squint.app.stack import Stack, StackSettings
    from squint.app.tiny_pack import write_tiny_pack

    if pack_dir is None:
        pack_dir = write_tiny_pack(work_dir / "pack", seed=0, shape="default").root
    stack = Stack(
        StackSettings.on_free_ports(
            pack_dir=pack_dir,
            state_dir=work_dir / "stack",
            vision_workers=vision_workers,
            # Not reachable yet: the stack starts a redis-server of its own there (when installed).
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
        )
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--fresh-every", type=int, default=8, help="every Nth request has a new image (0: never)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of one request, seconds")
    parser.add_argument("--drain-seconds", type=float, default=150.0, help="wait for requests in flight after the end")
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="memory sampling interval")
    parser.add_argument("--target", default="", help="host:port of a running orchestrator (default: start a stack)")
    parser.add_argument("--state-dir", default="", help="with --target: the stack's state dir, for its pids (memory)")
    parser.add_argument("--token", default=os.environ.get("SQUINT_TOKEN", ""), help="bearer token for --target")
    parser.add_argument("--pack", default="", help="model pack of the started stack (default: a new tiny pack)")
    parser.add_argument("--vision-workers", type=int, default=1)
    parser.add_argument("--json", default="", help="write the report (memory series included) to this file")
    return parser


async def _warm_up(target: str, token: str) -> None:
    """One request of each kind, so that the first measured requests do not pay start-up costs."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target, options=channel_options(256 * 1024 * 1024)) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        for kind in await asyncio.to_thread(request_mix, 4):
            await stub.Generate(kind.request, timeout=300, metadata=metadata)


def run(args: argparse.Namespace) -> Report:
    def load(target: str, pids: dict[str, int], token: str = "") -> Report:
        return asyncio.run(
            run_load(
                target,
                args.streams,
                args.duration,
                max_new_tokens=args.max_new_tokens,
                fresh_every=args.fresh_every,
                request_timeout=args.timeout,
                drain_seconds=args.drain_seconds,
                memory_pids=pids,
                sample_seconds=args.sample_seconds,
                token=token,
            )
        )

    if args.target:
        pids = _pids_from_state(Path(args.state_dir)) if args.state_dir else {}
        asyncio.run(_warm_up(args.target, args.token))
        report = load(args.target, pids, args.token)
        report.stack = f"state {args.state_dir}" if args.state_dir else "a running stack"
        return report
    with tempfile.TemporaryDirectory(prefix="squint-load-") as work:
        print("starting a stack on a tiny pack ...", file=sys.stderr)
        with own_stack(Path(args.pack) if args.pack else None, args.vision_workers, Path(work)) as stack:
            print(f"stack ready ({stack.cache_note}); warming up ...", file=sys.stderr)
            asyncio.run(_warm_up(stack.orchestrator_address, ""))
            print(f"loading with {args.streams} streams for {args.duration:.0f} s ...", file=sys.stderr)
            report = load(stack.orchestrator_address, _stack_pids(stack))
            report.stack = f"started here: {args.vision_workers} vision worker(s), cache {stack.cache_note}"
            return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if report.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
