"""Several LLM workers without Triton: the picking policy, failover before the first token, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest

from orchestrator.discovery import StaticDiscovery
from orchestrator.llm_client import LLMRequest, LLMStep
from orchestrator.llm_workers import EndpointPicker, LLMWorkers
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.settings import OrchestratorSettings, orchestrator_settings
from orchestrator.types import Sampling
from squint.errors import InvalidRequest, UpstreamUnavailable

A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the policy


def test_the_endpoint_with_the_fewest_requests_in_flight_is_chosen():
    picker = EndpointPicker([A, B, C])
    first = [picker.acquire() for _ in range(3)]
    assert sorted(first) == [A, B, C]  # one each before any gets a second
    picker.release(B)
    assert picker.acquire() == B  # the only one with fewer
    assert [picker.in_flight(a) for a in (A, B, C)] == [1, 1, 1]


def test_ties_go_round_robin_in_address_order():
    picker = EndpointPicker([C, A, B])  # given in any order
    chosen = []
    for _ in range(6):
        address = picker.acquire()
        chosen.append(address)
        picker.release(address)  # sequential requests: always a tie at zero
    assert chosen == [A, B, C, A, B, C]


def test_a_down_endpoint_is_tried_last_until_its_back_off_passes():
    clock = Clock()
    picker = EndpointPicker([A, B], clock=clock)
    assert picker.mark_down(A, 5.0)
    assert not picker.mark_down(A, 5.0)  # already down
    assert [picker.acquire() for _ in range(3)] == [B, B, B]  # A has fewer in flight, but is down
    assert picker.acquire(exclude=[B]) == A  # every other endpoint tried: the down one rather than none
    assert picker.ready
    clock.now += 5.0
    assert picker.is_up(A)
    assert picker.acquire() == A


def test_mark_up_ends_a_back_off_and_ready_needs_one_endpoint_up():
    clock = Clock()
    picker = EndpointPicker([A, B], clock=clock)
    picker.mark_down(A, 5.0)
    picker.mark_down(B, 5.0)
    assert not picker.ready
    assert picker.mark_up(B) and picker.ready
    assert not picker.mark_up(B)
    assert not EndpointPicker().ready
    assert EndpointPicker().acquire() is None


def test_excluding_every_endpoint_gives_none():
    picker = EndpointPicker([A, B])
    assert picker.acquire(exclude=[A, B]) is None


def test_update_keeps_the_state_of_endpoints_that_stay_and_in_flight_counts_of_those_that_go():
    clock = Clock()
    picker = EndpointPicker([A, B], clock=clock)
    picker.mark_down(B, 5.0)
    first = picker.acquire()
    assert first == A
    picker.update([A, B, C])
    assert not picker.is_up(B) and picker.is_up(C)
    assert picker.acquire() == C
    picker.update([B, C])  # A goes while a request streams from it
    assert picker.endpoints == (B, C)
    assert picker.in_flight(A) == 1
    picker.release(A)
    assert picker.in_flight(A) == 0
    assert not picker.mark_down(A, 5.0)  # not listed: ignored


# --------------------------------------------------------------------------- the pool over fake clients


def request(request_id: str = "r1") -> LLMRequest:
    return LLMRequest(np.array([1, 2, 3], dtype=np.int64), None, Sampling(max_new_tokens=3), request_id)


class FakeClient:
    """Answers three tokens, or fails with ``error`` after ``tokens_before_error`` tokens; ``gate``
    (an asyncio.Event) holds the stream before its first token."""

    def __init__(self, address, error=None, tokens_before_error=0, gate=None):
        self.address, self.error, self.tokens_before_error, self.gate = address, error, tokens_before_error, gate
        self.calls, self.closed, self.streams_closed = 0, False, 0
        self.ready = True  # what is_ready answers; an exception is raised

    async def is_ready(self, timeout=2.0):
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready

    async def generate(self, request):
        self.calls += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            for n in range(3):
                if self.error is not None and n == self.tokens_before_error:
                    raise self.error
                yield LLMStep((n,), "length" if n == 2 else "")
        finally:
            self.streams_closed += 1

    async def close(self):
        self.closed = True


def pool(clients: dict[str, FakeClient], clock=None, down_seconds=5.0, startup_grace_seconds=600.0):
    workers = LLMWorkers(
        StaticDiscovery(list(clients), "LLM worker", "llm_discovery"),
        lambda address: clients[address],
        down_seconds,
        OrchestratorMetrics(),
        startup_grace_seconds=startup_grace_seconds,
        clock=clock or Clock(),
    )
    workers.start()
    return workers


async def collect(workers, req=None):
    return [step async for step in workers.generate(req or request())]


def sample(workers, name, **labels):
    return workers.metrics.registry.get_sample_value(name, labels) or 0.0


def test_requests_spread_over_the_workers_and_are_counted_per_endpoint():
    clients = {A: FakeClient(A), B: FakeClient(B)}
    workers = pool(clients)

    async def scenario():
        gate = asyncio.Event()
        for client in clients.values():
            client.gate = gate
        tasks = [asyncio.create_task(collect(workers)) for _ in range(4)]
        await asyncio.sleep(0.01)
        in_flight = [sample(workers, "squint_llm_worker_requests_in_flight", endpoint=a) for a in (A, B)]
        gate.set()
        return in_flight, await asyncio.gather(*tasks)

    in_flight, answers = asyncio.run(scenario())
    assert in_flight == [2.0, 2.0]
    assert all([s.token_ids for s in steps] == [(0,), (1,), (2,)] for steps in answers)
    assert clients[A].calls == clients[B].calls == 2
    for address in (A, B):
        assert sample(workers, "squint_llm_worker_requests_total", endpoint=address, outcome="ok") == 2
        assert sample(workers, "squint_llm_worker_requests_in_flight", endpoint=address) == 0
        assert sample(workers, "squint_llm_worker_up", endpoint=address) == 1


def test_a_worker_unavailable_before_the_first_token_fails_over_and_is_backed_off():
    clock = Clock()
    refused = UpstreamUnavailable(f"the LLM worker at {A} is unavailable: refused")
    clients = {A: FakeClient(A, refused), B: FakeClient(B)}
    workers = pool(clients, clock)

    steps = asyncio.run(collect(workers))
    assert [s.token_ids for s in steps] == [(0,), (1,), (2,)]
    assert clients[A].calls == 1 and clients[B].calls == 1
    assert not workers.picker.is_up(A) and workers.ready
    assert sample(workers, "squint_llm_worker_failovers_total", endpoint=A) == 1
    assert sample(workers, "squint_llm_worker_requests_total", endpoint=A, outcome="unavailable") == 1
    assert sample(workers, "squint_llm_worker_requests_total", endpoint=B, outcome="ok") == 1
    assert sample(workers, "squint_llm_worker_up", endpoint=A) == 0

    # While A is backed off, every request goes to B first.
    for _ in range(3):
        asyncio.run(collect(workers))
    assert clients[A].calls == 1 and clients[B].calls == 4

    # Its back-off over, A is tried again; answering makes it up.
    clock.now += 5.0
    clients[A].error = None
    asyncio.run(collect(workers))
    assert clients[A].calls == 2 and workers.picker.is_up(A)
    assert sample(workers, "squint_llm_worker_up", endpoint=A) == 1


def test_after_output_an_unavailable_worker_fails_the_request_without_failover():
    clients = {
        A: FakeClient(A, UpstreamUnavailable(f"the LLM worker at {A} is unavailable: killed"), tokens_before_error=1),
        B: FakeClient(B),
    }
    workers = pool(clients)
    got = []

    async def scenario():
        async for step in workers.generate(request()):
            got.append(step)

    with pytest.raises(UpstreamUnavailable, match="killed"):
        asyncio.run(scenario())
    assert [s.token_ids for s in got] == [(0,)]
    assert clients[B].calls == 0
    assert not workers.picker.is_up(A)
    assert sample(workers, "squint_llm_worker_failovers_total", endpoint=A) == 0


def test_every_worker_unavailable_is_unavailable_naming_each():
    clients = {a: FakeClient(a, UpstreamUnavailable(f"the LLM worker at {a} is unavailable: down")) for a in (A, B)}
    workers = pool(clients)
    with pytest.raises(UpstreamUnavailable) as caught:
        asyncio.run(collect(workers))
    assert A in caught.value.message and B in caught.value.message
    assert not workers.ready
    # A request later still tries them (last, not never) rather than giving up at once.
    with pytest.raises(UpstreamUnavailable):
        asyncio.run(collect(workers))
    assert clients[A].calls == clients[B].calls == 2


def test_other_errors_are_not_failed_over():
    clients = {A: FakeClient(A, InvalidRequest("the LLM refused the request: layer 99")), B: FakeClient(B)}
    workers = pool(clients)
    with pytest.raises(InvalidRequest):
        asyncio.run(collect(workers))
    assert clients[B].calls == 0 and workers.picker.is_up(A)
    assert sample(workers, "squint_llm_worker_requests_total", endpoint=A, outcome="error") == 1


def test_a_caller_leaving_early_closes_the_stream_and_frees_the_slot():
    clients = {A: FakeClient(A)}
    workers = pool(clients)

    async def scenario():
        async with contextlib.aclosing(workers.generate(request())) as steps:
            async for _ in steps:
                break  # a stop string

    asyncio.run(scenario())
    assert clients[A].streams_closed == 1
    assert workers.picker.in_flight(A) == 0
    assert sample(workers, "squint_llm_worker_requests_total", endpoint=A, outcome="cancelled") == 1
    assert sample(workers, "squint_llm_worker_requests_in_flight", endpoint=A) == 0


def test_a_caller_closing_the_stream_at_the_last_step_counts_as_ok():
    clients = {A: FakeClient(A)}
    workers = pool(clients)

    async def scenario():
        async with contextlib.aclosing(workers.generate(request())) as steps:
            async for step in steps:
                if step.finish_reason:
                    break  # as the core does

    asyncio.run(scenario())
    assert sample(workers, "squint_llm_worker_requests_total", endpoint=A, outcome="ok") == 1
    assert sample(workers, "squint_llm_worker_requests_total", endpoint=A, outcome="cancelled") == 0


def test_clients_of_endpoints_discovery_dropped_are_closed():
    clients = {A: FakeClient(A), B: FakeClient(B)}
    workers = pool(clients)
    asyncio.run(collect(workers))
    asyncio.run(collect(workers))
    workers._update([B])  # as discovery would
    asyncio.run(collect(workers))
    assert clients[A].closed and not clients[B].closed
    assert workers.metrics.registry.get_sample_value("squint_llm_worker_up", {"endpoint": A}) is None
    asyncio.run(workers.close())
    assert clients[B].closed


def test_a_probe_marks_workers_that_are_not_ready_down_and_ready_ones_up():
    clients = {A: FakeClient(A), B: FakeClient(B)}
    workers = pool(clients)
    clients[A].ready = False
    assert asyncio.run(workers.probe())
    assert not workers.picker.is_up(A) and workers.picker.is_up(B)
    assert sample(workers, "squint_llm_worker_up", endpoint=A) == 0
    asyncio.run(collect(workers))
    assert clients[A].calls == 0 and clients[B].calls == 1  # A is tried last
    clients[B].ready = ConnectionError("refused")
    assert not asyncio.run(workers.probe()) and not workers.ready
    clients[A].ready = True
    assert asyncio.run(workers.probe())
    assert workers.picker.is_up(A) and not workers.picker.is_up(B)


def test_a_worker_still_starting_is_said_at_info_and_one_that_was_ready_at_warning(caplog):
    # An orchestrator started beside its Triton (squint up, a Kubernetes rollout) sees it loading.
    clients = {A: FakeClient(A)}
    workers = pool(clients)
    clients[A].ready = ConnectionError("connection refused")
    with caplog.at_level(logging.INFO, logger="orchestrator.llm_workers"):
        assert not asyncio.run(workers.probe())
        assert not asyncio.run(workers.probe())
        starting = [r for r in caplog.records if "not ready yet" in r.getMessage()]
        assert [r.levelno for r in starting] == [logging.INFO]  # said once
        assert f"LLM worker {A} is not ready yet (readiness check: connection refused)" in starting[0].getMessage()
        assert not workers.picker.is_up(A) and sample(workers, "squint_llm_worker_up", endpoint=A) == 0
        clients[A].ready = True
        assert asyncio.run(workers.probe())
        assert f"LLM worker {A} is ready" in caplog.text
        clients[A].ready = False  # ready once, then not: a worker gone down, a warning
        assert not asyncio.run(workers.probe())
    assert not any(r.levelno >= logging.WARNING for r in starting)
    down = [r for r in caplog.records if "marked down" in r.getMessage()]
    assert [r.levelno for r in down] == [logging.WARNING]


def test_a_worker_never_ready_past_the_start_up_grace_is_said_at_warning_once(caplog):
    clock = Clock()
    clients = {A: FakeClient(A)}
    workers = pool(clients, clock, startup_grace_seconds=600.0)
    clients[A].ready = ConnectionError("connection refused")
    with caplog.at_level(logging.INFO, logger="orchestrator.llm_workers"):
        clock.now += 599.0
        asyncio.run(workers.probe())
        assert not any(r.levelno >= logging.WARNING for r in caplog.records)  # still within the grace
        for _ in range(3):
            clock.now += 1.0
            asyncio.run(workers.probe())
    slow = [r for r in caplog.records if "has not been ready" in r.getMessage()]
    assert [r.levelno for r in slow] == [logging.WARNING]
    assert (
        f"LLM worker {A} has not been ready in the 600 s since it was listed (readiness check: connection refused)"
        in (slow[0].getMessage())
    )


def test_watch_reports_whether_any_worker_is_ready_when_it_changes():
    clients = {A: FakeClient(A), B: FakeClient(B)}
    workers = pool(clients)
    seen: list[bool] = []

    async def scenario():
        async def on_change(ready: bool) -> None:
            seen.append(ready)

        workers.watch(0.01, on_change)
        await asyncio.sleep(0.05)
        clients[A].ready = clients[B].ready = False
        await asyncio.sleep(0.05)
        clients[B].ready = True
        await asyncio.sleep(0.05)
        await workers.close()

    asyncio.run(scenario())
    assert seen == [True, False, True]
    assert clients[A].closed and clients[B].closed


# --------------------------------------------------------------------------- settings


def test_triton_url_alone_is_the_single_static_endpoint():
    settings = orchestrator_settings(env={"SQUINT_ORCHESTRATOR_TRITON_URL": "triton:9001"})
    endpoints = settings.llm_endpoints()
    assert endpoints.mode == "static" and endpoints.static_workers == ("triton:9001",)
    assert OrchestratorSettings().llm_endpoints().static_workers == ("127.0.0.1:8001",)


def test_llm_discovery_lists_several_endpoints_or_names_a_headless_service():
    listed = orchestrator_settings(env={"SQUINT_ORCHESTRATOR_LLM_DISCOVERY_STATIC_WORKERS": "a:8001,b:8001"})
    assert listed.llm_endpoints().static_workers == ("a:8001", "b:8001")
    dns = orchestrator_settings(
        env={
            "SQUINT_ORCHESTRATOR_LLM_DISCOVERY_MODE": "dns",
            "SQUINT_ORCHESTRATOR_LLM_DISCOVERY_DNS_NAME": "llm-headless:8001",
        }
    )
    assert dns.llm_endpoints().mode == "dns" and dns.llm_endpoints().dns_name == "llm-headless:8001"
