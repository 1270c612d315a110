"""Real stacks on loopback: tritonserver, a vision worker and an orchestrator as processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from squint_test_stack import PrivateRedis

from llm_worker.tritonserver import free_port
from squint.app.stack import Stack, StackSettings
from squint.generate.v1 import generate_pb2_grpc
from squint.rpc import channel_options

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(port=free_port(), log=tmp_path_factory.mktemp("redis") / "redis.log")
    server.start()
    yield server
    server.stop()


def _start_stack(
    pack_dir: Path, state_dir: Path, redis_url: str, vision_workers: int = 1, engine: str = "vllm"
) -> Stack:
    stack = Stack(
        StackSettings.on_free_ports(
            pack_dir=pack_dir,
            state_dir=state_dir,
            vision_workers=vision_workers,
            redis_url=redis_url,
            engine=engine,
            # Retry a lost Redis quickly so a test can watch it come back.
            extra_env={
                "SQUINT_VISION_CACHE_RETRY_SECONDS": "0.5",
                # The HTTP API's tests serve media from loopback; every other internal address stays refused.
                "SQUINT_ORCHESTRATOR_HTTP_FETCH_ALLOWED_NETWORKS": "127.0.0.1/32",
            },
        )
    )
    stack.start()
    return stack


@pytest.fixture(scope="session")
def default_stack(tiny_pack, tmp_path_factory) -> Iterator[Stack]:
    """The whole stack on the default tiny pack, caching in the machine's Redis."""
    stack = _start_stack(tiny_pack.root, tmp_path_factory.mktemp("stack-default"), REDIS_URL)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def alt_stack(alt_pack, private_redis, tmp_path_factory) -> Iterator[Stack]:
    """The whole stack on the alt tiny pack, caching in a private Redis a test may stop."""
    stack = _start_stack(alt_pack.root, tmp_path_factory.mktemp("stack-alt"), private_redis.url)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def two_worker_stack(tiny_pack, tmp_path_factory) -> Iterator[Stack]:
    """The whole stack with two vision-worker processes (module-scoped: a test may kill one). Its tests
    are about the vision side: the staged engine alone serves them, without loading vLLM."""
    stack = _start_stack(
        tiny_pack.root, tmp_path_factory.mktemp("stack-two"), REDIS_URL, vision_workers=2, engine="staged"
    )
    yield stack
    stack.stop()


def stub_for(stack: Stack) -> generate_pb2_grpc.GenerationServiceStub:
    channel = grpc.insecure_channel(stack.orchestrator_address, options=channel_options(128 * 1024 * 1024))
    return generate_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="session")
def default_client(default_stack):
    return stub_for(default_stack)


@pytest.fixture(scope="module")
def two_worker_client(two_worker_stack):
    return stub_for(two_worker_stack)


@pytest.fixture(scope="session")
def alt_client(alt_stack):
    return stub_for(alt_stack)
