"""A vision worker killed during a stream of requests loses none of them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from squint.app.client import build_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS = 16


def test_killing_one_vision_worker_loses_no_request(two_worker_stack, two_worker_client, png, unseen_seed):
    base = unseen_seed
    done = threading.Semaphore(0)

    def one(i: int) -> tuple[object, int]:
        # Three fresh images each: the ring sends some of them to the worker about to die.
        request = build_request(
            "What is it?", [png(base + 3 * i + k) for k in range(3)], compressor="avgpool", max_new_tokens=3
        )
        tokens = 0
        try:
            for message in two_worker_client.GenerateStream(request, timeout=180):
                tokens += len(message.token_ids)
                if message.finish_reason:
                    return "ok", tokens
            return "ended without a finish reason", tokens
        except grpc.RpcError as exc:
            return exc.code(), tokens
        finally:
            done.release()

    victim = two_worker_stack.visions[1]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        for _ in range(3):
            done.acquire()  # a few requests through on both workers, then the kill
        victim._process.kill()
        outcomes = [future.result() for future in futures]

    for status, tokens in outcomes:
        # Answered on the surviving replica, or refused retryably before any token was sent.
        assert status == "ok" or (status == grpc.StatusCode.UNAVAILABLE and tokens == 0), (status, tokens)
    assert sum(status == "ok" for status, _ in outcomes) >= REQUESTS - 2
    # Afterwards everything lands on the survivor.
    after = two_worker_client.Generate(
        build_request("And now?", [png(base + 999)], compressor="avgpool", max_new_tokens=2), timeout=120
    )
    assert after.usage.media[0].worker == two_worker_stack.vision_addresses[0]
