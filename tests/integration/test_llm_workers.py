"""Two LLM workers (two tritonservers) behind one orchestrator, under eight streaming clients.

Both take requests (the orchestrator sends each to the one with the fewest in flight); one is
killed (SIGKILL) mid-load: nothing is lost — every request is answered token for token, or
refused UNAVAILABLE before any output, or, only when it was streaming from the killed worker
already, stops with UNAVAILABLE after a correct prefix (an answer cannot be taken back) — and
the survivor answers everything sent after the kill.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from squint_test_load import Case, Load, assert_accounted, measure
from squint_test_stack import kill_triton

from orchestrator.server import SERVICE_NAME
from squint.app.client import build_request
from squint.app.stack import Stack, StackSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
# Generous: the machine running the tests may be busy with other work.
WAIT = 120


@pytest.fixture(scope="module")
def two_llm_stack(tiny_pack, tmp_path_factory) -> Iterator[Stack]:
    """Two tritonservers on the staged engine (this is about routing, not vLLM), one vision worker."""
    stack = Stack(
        StackSettings.on_free_ports(
            pack_dir=tiny_pack.root,
            state_dir=tmp_path_factory.mktemp("stack-two-llm"),
            llm_workers=2,
            redis_url="",
            engine="staged",
            extra_env={
                # Try the killed worker again soon, so the test also sees requests fail over more than once.
                "SQUINT_ORCHESTRATOR_LLM_DOWN_SECONDS": "1",
                # The readiness probe would mark the killed worker down too, and might before a request
                # meets it: here the requests find out, so failover always runs (the probe: unit tests).
                "SQUINT_ORCHESTRATOR_LLM_HEALTH_SECONDS": "600",
            },
        )
    )
    stack.start()
    yield stack
    stack.stop()


def text_mix(max_new_tokens: int) -> list[Case]:
    """Text questions: their whole cost is in the LLM workers."""
    return [
        Case(f"text {n}", build_request(f"Question {n}: tell me about the number {n}.", max_new_tokens=max_new_tokens))
        for n in range(6)
    ]


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def orchestrator_metric(stack: Stack, name: str, **labels: str) -> float:
    return metric(stack.orchestrator_metrics_url, name, **labels)


def service_health(stack: Stack) -> int:
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    return reply.status


def test_two_llm_workers_share_the_load_and_a_killed_one_loses_nothing(two_llm_stack, png):
    stack = two_llm_stack
    survivor, victim = stack.llm_addresses
    cases = text_mix(32) + [
        Case("image", build_request("What is in the picture?", [png(4242)], compressor="avgpool", max_new_tokens=24))
    ]
    started = time.monotonic()
    mix = measure(stack.orchestrator_address, cases)

    with Load(stack.orchestrator_address, mix, clients=CLIENTS, request_timeout=WAIT) as load:
        # Both workers serve: Triton's own count of successful requests, and ours per endpoint.
        load.wait_for(lambda outcomes: sum(o.verdict == "ok" for o in outcomes) >= 4 * CLIENTS, WAIT, "a first round")
        for triton in stack.tritons:
            assert metric(triton.metrics_url, "nv_inference_request_success") > 0, triton.grpc_url
        for address in (survivor, victim):
            assert orchestrator_metric(stack, "squint_llm_worker_requests_total", endpoint=address, outcome="ok") > 0
        load.wait_for(
            lambda _: (
                load.streaming() >= 1
                and orchestrator_metric(stack, "squint_llm_worker_requests_in_flight", endpoint=victim) >= 1
            ),
            WAIT,
            "streams producing tokens, some from the worker about to die",
        )
        ok_on_survivor = orchestrator_metric(stack, "squint_llm_worker_requests_total", endpoint=survivor, outcome="ok")
        killing = time.monotonic()
        kill_triton(stack, 1)
        killed = time.monotonic()
        # The survivor takes the rest: every request sent after the kill is answered.
        load.wait_until_ended(killed, 3 * CLIENTS, WAIT, "requests after the kill")
        # A request given the dead worker (at once, or once its back-off is over) moves to the survivor
        # before its first token.
        load.wait_for(
            lambda _: orchestrator_metric(stack, "squint_llm_worker_failovers_total", endpoint=victim) >= 1,
            WAIT,
            "a request failed over from the dead worker",
        )
    elapsed = time.monotonic() - started

    assert_accounted(load, allowed=("ok", "refused", "cut"))
    # Only a stream the killed worker was generating for may stop part-way (a correct prefix): one sent
    # before the kill. (Its first tokens may reach the client after the kill: they were on the way.)
    for o in load.outcomes:
        if o.verdict == "cut":
            assert o.sent < killing, str(o)
    after = [o for o in load.outcomes if o.sent > killed]
    assert len(after) >= 3 * CLIENTS
    assert all(o.verdict == "ok" for o in after), [str(o) for o in after if o.verdict != "ok"][:5]
    answered = orchestrator_metric(stack, "squint_llm_worker_requests_total", endpoint=survivor, outcome="ok")
    assert answered - ok_on_survivor >= len(after)
    assert orchestrator_metric(stack, "squint_llm_worker_up", endpoint=survivor) == 1
    # The dead worker is down (it never answered again); with the survivor, the service is ready.
    assert orchestrator_metric(stack, "squint_llm_worker_up", endpoint=victim) == 0
    assert service_health(stack) == health_pb2.HealthCheckResponse.SERVING
    print(f"\n{load.summary()} in {elapsed:.1f} s ({len(after)} after the kill)")
