"""Faults injected into the real processes while streaming clients keep sending requests.

Four clients stream requests from a mix of images and compressors (tests/support/
squint_test_load.py) while a part of the stack is broken and repaired. Every request sent must
end, and each is either answered token for token as on the healthy stack, or refused with
UNAVAILABLE before its first token — never lost, never corrupted. The one exception is a crash
of the LLM worker itself: a stream it was generating for can only stop where it was, and it
does so with UNAVAILABLE after a correct prefix of its answer.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from squint_test_load import Load, assert_accounted, image_mix, measure
from squint_test_stack import kill_triton, restart_on_same_port, restart_triton, sigterm

from vision_worker.cache import decode_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Generous: the machine running the tests may be busy with other work.
WAIT = 180


def every_case_answered(mix, after: float = 0.0, cached: bool = False):
    """A predicate: every case of the mix has an ``ok`` outcome sent after ``after`` (all of
    whose images were cache hits, when ``cached``)."""

    def holds(outcomes) -> bool:
        done = {
            o.case.name
            for o in outcomes
            if o.sent > after and o.verdict == "ok" and (not cached or (o.cache_hits and all(o.cache_hits)))
        }
        return done >= {case.name for case in mix}

    return holds


def vision_logs(stack) -> str:
    return "".join(v.log_path.read_text(errors="replace") for v in stack.visions)


def test_redis_stopped_under_load_serves_uncached_then_caches_again(stack, mix, fault_redis):
    with Load(stack.orchestrator_address, mix) as load:
        load.wait_for(every_case_answered(mix), WAIT, "every case answered with Redis up")
        fault_redis.stop()
        stopped = time.monotonic()
        try:
            load.wait_for(every_case_answered(mix, after=stopped), WAIT, "every case answered with Redis down")
        finally:
            restarting = time.monotonic()
            fault_redis.start()
        restarted = time.monotonic()
        # The restarted Redis is empty: encodings are stored again, then hit.
        load.wait_for(every_case_answered(mix, after=restarted, cached=True), WAIT, "cache hits after Redis returned")

    assert_accounted(load, allowed=("ok",))
    outage = [o for o in load.outcomes if o.sent > stopped and o.ended < restarting]
    assert len(outage) >= len(mix)
    assert not any(any(o.cache_hits) for o in outage), "a cache hit while Redis was down"
    log = vision_logs(stack)
    assert f"Redis at {fault_redis.url} is unavailable" in log and "serving without cache" in log
    assert f"Redis at {fault_redis.url} is back; caching again" in log


def _corrupt(value: bytes, how: int) -> bytes:
    if how == 0:
        return value[: len(value) // 2]  # truncated
    if how == 1:
        return value[:-16] + bytes(b ^ 0xFF for b in value[-16:])  # tensor bytes flipped
    if how == 2:
        return b"XXX" + value[3:]  # not our format
    return b""


def test_redis_values_corrupted_in_place_are_detected_deleted_and_recomputed(stack, mix, fault_redis):
    redis = fault_redis.client()
    corrupt_before = vision_logs(stack).count("is corrupt or of another format; deleting it")
    with Load(stack.orchestrator_address, mix) as load:
        # Warm: every encoding is in Redis (each case answered from the cache).
        load.wait_for(every_case_answered(mix, cached=True), WAIT, "every case answered from the cache")
        keys = [key for key in redis.scan_iter("squint:tokens:*")]
        for n, key in enumerate(keys):
            redis.set(key, _corrupt(redis.get(key), n % 4), keepttl=True)
        corrupted = time.monotonic()
        # Every corrupted value is read again, found corrupt, recomputed and cached anew.
        load.wait_for(every_case_answered(mix, after=corrupted, cached=True), WAIT, "cache hits after the corruption")

    assert_accounted(load, allowed=("ok",))
    assert len(keys) >= len(mix)
    for key in keys:
        value = redis.get(key)
        assert value is None or decode_value(value) is not None, f"{key} is still corrupt"
    detected = vision_logs(stack).count("is corrupt or of another format; deleting it") - corrupt_before
    assert detected >= len(keys)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_triton_down_under_load_is_unavailable_then_recovers_with_the_same_orchestrator(stack, mix, how):
    """Killed: a crash. Stopped: SIGTERM, as in a rolling restart; Triton drains what it runs."""
    orchestrator_pid = stack.orchestrator.pid
    with Load(stack.orchestrator_address, mix) as load:
        load.wait_for(every_case_answered(mix), WAIT, "every case answered before the fault")
        load.wait_for(lambda _: load.streaming() >= 1, WAIT, "a stream producing tokens")
        if how == "killed":
            kill_triton(stack)
        else:
            stack.triton.stop()  # SIGTERM, and wait until it has exited
        down = time.monotonic()
        try:
            load.wait_until_ended(down, 2 * len(mix), WAIT, "requests while Triton is down")
        finally:
            restarting = time.monotonic()
            restart_triton(stack)
        back = time.monotonic()
        load.wait_for(every_case_answered(mix, after=back), WAIT, "every case answered after the restart")

    # Only a stream that was producing tokens when the LLM worker crashed may stop part-way.
    assert_accounted(load, allowed=("ok", "refused", "cut") if how == "killed" else ("ok", "refused"))
    for o in load.outcomes:
        if o.verdict == "cut":
            assert o.first_token < down, str(o)
    outage = [o for o in load.outcomes if o.sent > down and o.ended < restarting]
    assert len(outage) >= 2 * len(mix)
    assert all(o.verdict == "refused" for o in outage), [str(o) for o in outage if o.verdict != "refused"][:5]
    # Recovered for good: after the first answer, no more refusals.
    first_ok = min(o.sent for o in load.outcomes if o.sent > back and o.verdict == "ok")
    assert all(o.verdict == "ok" for o in load.outcomes if o.sent > first_ok)
    assert stack.orchestrator.pid == orchestrator_pid


def test_vision_worker_killed_under_load_fails_over_then_rejoins(stack, mix):
    survivor, victim = stack.vision_addresses
    dying = stack.visions[1]
    with Load(stack.orchestrator_address, mix) as load:
        load.wait_for(every_case_answered(mix), WAIT, "every case answered before the kill")
        dying._process.kill()
        dying._process.wait(30)
        killed = time.monotonic()
        try:
            load.wait_for(every_case_answered(mix, after=killed), WAIT, "every case answered by the survivor")
        finally:
            # The outage ends when the restart begins: the worker may serve before its wait returns.
            restarting = time.monotonic()
            restart_on_same_port(dying, stack.settings.host)
        back = time.monotonic()
        load.wait_for(
            lambda outcomes: any(o.sent > back and victim in o.workers for o in outcomes),
            WAIT,
            "the restarted worker serving again",
        )

    # Vision work ends before the first token: a request the lost worker held is refused, not cut.
    assert_accounted(load, allowed=("ok", "refused"))
    outage = [o for o in load.outcomes if o.sent > killed and o.ended < restarting and o.verdict == "ok"]
    assert outage and all(set(o.workers) == {survivor} for o in outage)


def test_sigterm_drains_streams_in_flight_refuses_new_requests_and_exits_zero(stack):
    # Long answers, so that streams are part-way through when the signal comes.
    # Judged by length, not token for token: over 160 greedy tokens vLLM on CPU has given, in one of
    # 8 requests, an answer that differs from the same request measured a minute before (seen in
    # two of four full runs, with the LLM one sequence at a time). This test is about the drain:
    # every stream in flight finishes whole, new calls are refused, nothing is lost.
    long_mix = [
        dataclasses.replace(case, exact=False)
        for case in measure(stack.orchestrator_address, image_mix(seed=8000, max_new_tokens=160))
    ]
    orchestrator = stack.orchestrator
    grace = float(stack.settings.extra_env["SQUINT_ORCHESTRATOR_GRPC_SHUTDOWN_GRACE_SECONDS"])
    load = Load(stack.orchestrator_address, long_mix)
    try:
        with load:
            # One sequence at a time in the LLM (conftest): one streams, the others wait in its queue.
            load.wait_for(lambda _: load.streaming() >= 1, WAIT, "a stream producing tokens")
            sigterm(orchestrator)
            signalled = time.monotonic()
            code = orchestrator._process.wait(grace + 60)
            exited = time.monotonic()
            load.wait_until_ended(exited, 4, WAIT, "requests after the orchestrator exited")
    finally:
        if orchestrator._process.poll() is None:
            orchestrator.stop()
        restart_on_same_port(orchestrator, stack.settings.host)

    assert code == 0
    assert_accounted(load, allowed=("ok", "refused"))
    in_flight = [o for o in load.outcomes if o.first_token is not None and o.first_token < signalled]
    drained = [o for o in in_flight if o.ended > signalled]
    # Streams that had begun finished whole after the signal (their answers are complete and right).
    assert len(drained) >= 1 and all(o.verdict == "ok" for o in in_flight), [str(o) for o in in_flight]
    after = [o for o in load.outcomes if o.sent > exited]
    assert after and all(o.verdict == "refused" for o in after)
    # The orchestrator is back, on the same address, and answers.
    assert measure(stack.orchestrator_address, long_mix[:1])[0].expected == long_mix[0].expected
