"""What the bench reads while a request runs: processes' peak memory from /proc, and the
servers' Prometheus metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.results import Sample


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


def sample_sum(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples of metric ``name`` in a Prometheus text page whose labels include
    ``labels`` (every sample when None)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{([^}}]*)}})? ([0-9.eE+-]+)$", re.MULTILINE)
    wanted = [f'{key}="{value}"' for key, value in (labels or {}).items()]
    return sum(float(value) for found, value in pattern.findall(text) if all(w in found for w in wanted))


class GaugeProbe:
    """Polls a Prometheus gauge in a thread while a request runs and keeps the largest value.

    ``labels`` picks the samples read (their sum): the LLM worker's two Triton models report the
    same gauges, told apart by their ``model`` label, so a request's probe reads the model that
    serves it (an idle model's KV gauge is 0, but a request of its own must not count)."""

    def __init__(
        self, url: str | None, name: str, interval_s: float = 0.1, labels: Mapping[str, str] | None = None
    ) -> None:
        self.url, self.name, self.interval_s = url, name, interval_s
        self.labels = dict(labels or {})
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float:
        assert self.url is not None
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        return sample_sum(text, self.name, self.labels)

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


def stack_pids(stack: Any) -> list[int]:
    """Every process of a running ``squint.app.stack.Stack``: its servers and their children."""
    roots = [p for p in (stack.orchestrator.pid, *(v.pid for v in stack.visions), stack.triton.pid) if p]
    return [pid for root in roots for pid in descendants(root)]


def with_peak(memory: PeakMemory, run: Callable[[], Sample]) -> Sample:
    """``run()``'s sample with the peak resident memory its processes reached while it ran."""
    memory.reset()
    sample = run()
    return dataclasses.replace(sample, peak_rss_bytes=memory.peak_bytes())


def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text endpoint, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
