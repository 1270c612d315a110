"""One real stack for the fault tests: tritonserver, two vision workers, an orchestrator and a
private redis-server, on the default tiny pack. A test that breaks a part restarts it (on the
port it had) before it ends, so the next test finds the stack whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from squint_test_load import Case, image_mix, measure
from squint_test_stack import PrivateRedis

from llm_worker.tritonserver import free_port
from squint.app.stack import Stack, StackSettings

# Drain time the orchestrator gets on SIGTERM: generous, the machine may be busy.
SHUTDOWN_GRACE_SECONDS = 60


@pytest.fixture(scope="session")
def fault_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(port=free_port(), log=tmp_path_factory.mktemp("fault-redis") / "redis.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fault_stack(tiny_pack, fault_redis, tmp_path_factory) -> Iterator[Stack]:
    stack = Stack(
        StackSettings.on_free_ports(
            pack_dir=tiny_pack.root,
            state_dir=tmp_path_factory.mktemp("fault-stack"),
            vision_workers=2,
            redis_url=fault_redis.url,
            extra_env={
                # Retry a lost Redis quickly, so a test can watch the cache come back.
                "SQUINT_VISION_CACHE_RETRY_SECONDS": "0.5",
                # One image per CLIP forward: a recomputed encoding is bit for bit the first one
                # (batched forwards agree only to 1e-5), so every answer can be compared exactly.
                "SQUINT_VISION_BATCHING_MAX_BATCH": "1",
                # One sequence at a time in the LLM: vLLM's batched kernels are not batch-invariant, so a
                # greedy answer under load may differ in a token from the one measured alone, and
                # every answer here is judged against that one exactly.
                "SQUINT_LLM_MAX_BATCH": "1",
                # Try a failed vision worker again soon, so a test can watch it rejoin.
                "SQUINT_ORCHESTRATOR_WORKER_DOWN_SECONDS": "1",
                "SQUINT_ORCHESTRATOR_GRPC_SHUTDOWN_GRACE_SECONDS": str(SHUTDOWN_GRACE_SECONDS),
            },
        )
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def mix(fault_stack) -> list[Case]:
    """Short answers, one case per compressor, measured on the healthy stack."""
    return measure(fault_stack.orchestrator_address, image_mix(seed=7000, max_new_tokens=8))


@pytest.fixture
def stack(fault_stack) -> Iterator[Stack]:
    """The shared stack, whole before the test and (each test restarts what it broke) after."""
    assert fault_stack.poll_failed() is None, f"{fault_stack.poll_failed()} is down before the test"
    yield fault_stack
    assert fault_stack.poll_failed() is None, f"the test left {fault_stack.poll_failed()} down"
