"""The consistent-hash ring and the worker pool: affinity, minimal remapping, failover order."""

import collections
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.routing import HashRing, WorkerPool

addresses = st.builds(
    lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4).map(str), st.integers(min_value=1, max_value=65535)
)
worker_sets = st.lists(addresses, min_size=1, max_size=10, unique=True)
content_keys = st.text(min_size=0, max_size=64)

# 2000 keys shaped like the cache's content hashes
KEYS = [f"{i:064x}" for i in range(2000)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=40)
@given(worker_sets, content_keys)
def test_owners_is_a_permutation_of_the_workers(workers, key):
    order = HashRing(workers).owners(key)
    assert sorted(order) == sorted(workers)


@settings(max_examples=40)
@given(worker_sets, content_keys)
def test_owners_is_deterministic(workers, key):
    assert HashRing(workers).owners(key) == HashRing(workers).owners(key)


@settings(max_examples=40)
@given(worker_sets.flatmap(lambda ws: st.tuples(st.just(ws), st.permutations(ws))), content_keys)
def test_owners_do_not_depend_on_insertion_order(pair, key):
    workers, shuffled = pair
    assert HashRing(workers).owners(key) == HashRing(shuffled).owners(key)


@settings(max_examples=40)
@given(worker_sets, addresses, st.lists(content_keys, min_size=1, max_size=20))
def test_removing_a_worker_keeps_everyone_elses_order(workers, extra, keys):
    """The failover order is exactly the order the ring gives once the owner is gone."""
    bigger = HashRing({*workers, extra})
    smaller = HashRing(set(workers) - {extra})
    for key in keys:
        assert [w for w in bigger.owners(key) if w != extra] == smaller.owners(key)


def test_the_order_is_the_same_in_every_process():
    # pinned: orchestrator replicas (and a restarted one) must agree, so the hash is
    # hashlib's, not Python's per-process salted hash()
    assert HashRing(["a:1", "b:1", "c:1"]).owners("image") == ["b:1", "a:1", "c:1"]


@settings(max_examples=25, deadline=None)
@given(st.lists(addresses, min_size=2, max_size=9, unique=True))
def test_adding_a_worker_moves_about_one_nth_of_the_keys_all_to_it(workers):
    *old, new = workers
    before = HashRing(old)
    after = HashRing(workers)
    moved = [key for key in KEYS if before.owners(key)[0] != after.owners(key)[0]]
    assert all(after.owners(key)[0] == new for key in moved)
    expected = len(KEYS) / len(workers)
    assert 0.3 * expected <= len(moved) <= 2.0 * expected


@settings(max_examples=25, deadline=None)
@given(st.lists(addresses, min_size=3, max_size=10, unique=True), st.data())
def test_removing_a_worker_moves_only_its_keys(workers, data):
    gone = data.draw(st.sampled_from(workers))
    before = HashRing(workers)
    after = HashRing(set(workers) - {gone})
    owners_before = {key: before.owners(key)[0] for key in KEYS}
    moved = [key for key in KEYS if owners_before[key] != after.owners(key)[0]]
    assert all(owners_before[key] == gone for key in moved)
    assert len(moved) == sum(owner == gone for owner in owners_before.values())
    expected = len(KEYS) / len(workers)
    assert 0.3 * expected <= len(moved) <= 2.0 * expected


@settings(max_examples=25, deadline=None)
@given(st.lists(addresses, min_size=2, max_size=10, unique=True))
def test_keys_spread_over_the_workers(workers):
    ring = HashRing(workers)
    counts = collections.Counter(ring.owners(key)[0] for key in KEYS)
    fair = len(KEYS) / len(workers)
    for worker in workers:
        assert 0.4 * fair <= counts[worker] <= 1.8 * fair, (worker, counts)


def test_an_empty_ring_has_no_owners():
    assert HashRing([]).owners("key") == []
    assert WorkerPool().candidates("key") == []


@settings(max_examples=40)
@given(worker_sets, content_keys, st.data())
def test_a_down_worker_sorts_last_and_the_rest_keep_ring_order(workers, key, data):
    pool = WorkerPool(workers, clock=FakeClock())
    order = pool.candidates(key)
    down = data.draw(st.sampled_from(workers))
    pool.mark_down(down, 30.0)
    assert pool.candidates(key) == [w for w in order if w != down] + [down]


def test_down_workers_keep_their_ring_order_among_themselves():
    workers = [f"10.0.0.{i}:50061" for i in range(1, 6)]
    pool = WorkerPool(workers, clock=FakeClock())
    order = pool.candidates("k")
    for worker in (order[3], order[0]):
        pool.mark_down(worker, 30.0)
    assert pool.candidates("k") == [order[1], order[2], order[4], order[0], order[3]]


def test_a_down_worker_comes_back_after_its_interval():
    clock = FakeClock()
    pool = WorkerPool(["a:1", "b:1", "c:1"], clock=clock)
    owner = pool.candidates("img")[0]
    pool.mark_down(owner, 5.0)
    assert pool.candidates("img")[-1] == owner
    clock.now += 4.9
    assert pool.candidates("img")[-1] == owner
    clock.now += 0.2
    assert pool.candidates("img")[0] == owner
    assert all(state.up for state in pool.snapshot())


def test_a_down_worker_comes_back_on_success():
    clock = FakeClock()
    pool = WorkerPool(["a:1", "b:1", "c:1"], clock=clock)
    owner = pool.candidates("img")[0]
    pool.mark_down(owner, 60.0)
    pool.mark_down(owner, 60.0)
    state = {s.address: s for s in pool.snapshot()}[owner]
    assert (state.up, state.retry_in_seconds, state.failures) == (False, 60.0, 2)
    pool.mark_up(owner)
    assert pool.candidates("img")[0] == owner
    state = {s.address: s for s in pool.snapshot()}[owner]
    assert (state.up, state.retry_in_seconds, state.failures) == (True, 0.0, 0)


def test_a_shorter_mark_does_not_cut_a_longer_one():
    clock = FakeClock()
    pool = WorkerPool(["a:1", "b:1"], clock=clock)
    pool.mark_down("a:1", 30.0)
    pool.mark_down("a:1", 1.0)
    clock.now += 2.0
    assert not {s.address: s for s in pool.snapshot()}["a:1"].up


def test_update_replaces_workers_and_keeps_the_health_of_those_that_stay():
    pool = WorkerPool(["a:1", "b:1", "c:1"], clock=FakeClock())
    pool.mark_down("a:1", 30.0)
    pool.mark_down("b:1", 30.0)
    pool.update(["a:1", "c:1", "d:1"])
    assert pool.workers == {"a:1", "c:1", "d:1"}
    states = {s.address: s.up for s in pool.snapshot()}
    assert states == {"a:1": False, "c:1": True, "d:1": True}
    # a call that fails on a worker discovery has just removed changes nothing
    pool.mark_down("b:1", 30.0)
    assert "b:1" not in {s.address for s in pool.snapshot()}
    # a worker that left and came back starts healthy
    pool.update(["a:1", "b:1"])
    assert {s.address: s.up for s in pool.snapshot()} == {"a:1": False, "b:1": True}


def test_candidates_follow_the_ring_once_discovery_updates():
    pool = WorkerPool(["a:1", "b:1"])
    pool.update(["a:1", "b:1", "c:1"])
    assert pool.candidates("img") == HashRing(["a:1", "b:1", "c:1"]).owners("img")


def test_updates_from_another_thread_never_break_candidates():
    pool = WorkerPool([f"w{i}:1" for i in range(4)])
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            pool.update([f"w{j}:1" for j in range(i % 3, i % 3 + 4)])
            pool.mark_down(f"w{i % 6}:1", 0.001)
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for n in range(3000):
            order = pool.candidates(f"key{n}")
            assert len(order) == 4 and len(set(order)) == 4
    finally:
        stop.set()
        thread.join()
