"""kldwrm_ref.memory: the step's memory handler never shares a block, keeps values, zeroes calloc'd
blocks, moves realloc'd data, steps with it equal steps without, and its blocks are reused."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kldwrm_ref import memory, optim
from kldwrm_ref.bench.allocations import counting_allocations
from kldwrm_ref.model import paper_cnn

pytestmark = pytest.mark.skipif(memory._get_cache() is None, reason="NumPy's memory-handler C API or Numba's cfuncs are out of reach here")

SIZES = [0, 1, 7, 4096, memory.MIN_BYTES - 8, memory.MIN_BYTES, memory.MIN_BYTES + 8, 300_000, 2**20, 5_898_240, 6_000_000]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SIZES), st.booleans()), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_live_arrays_never_share_memory_and_keep_their_values(plan, rnd):
    """Allocate (empty or zeros) and free in a random order under the handler: every live array
    keeps the value written into it, however its block was reused."""
    live: list[tuple[np.ndarray, float]] = []
    with memory.reusing_memory() as on:
        assert on
        for k, (size, zeroed) in enumerate(plan):
            array = (np.zeros if zeroed else np.empty)(size // 8, dtype=np.float64)
            assert memory._is_cached_array(array)
            if zeroed:
                assert not array.any()
            array.fill(float(k))
            live.append((array, float(k)))
            if live and rnd.random() < 0.5:
                live.pop(rnd.randrange(len(live)))
            for other, value in live:
                assert (other == value).all()
    stats = memory.cache_stats()
    assert stats.cached_bytes <= memory.CACHE_BYTES and stats.blocks <= memory.SLOTS


def test_a_reused_dirty_block_is_zeroed_for_zeros_and_resizing_moves_the_data():
    n = 2**20 // 8
    with memory.reusing_memory():
        dirty = np.full(n, 7.0)
        del dirty  # its block goes to the cache
        hits = memory.cache_stats().hits
        zeros = np.zeros(n)
        assert memory.cache_stats().hits == hits + 1 and not zeros.any()
        grown = np.arange(1000, dtype=np.float64)
        grown.resize(n, refcheck=False)  # a realloc across the cache's threshold
        np.testing.assert_array_equal(grown[:1000], np.arange(1000.0))
        assert not grown[1000:].any()
        grown.resize(10, refcheck=False)
        np.testing.assert_array_equal(grown, np.arange(10.0))


def test_arrays_outlive_the_block_and_may_be_freed_by_another_thread():
    with memory.reusing_memory():
        arrays = [np.full(200_000, float(i)) for i in range(6)]

    def drop():
        for i, array in enumerate(arrays):
            assert (array == i).all()
        arrays.clear()

    worker = threading.Thread(target=drop)
    worker.start()
    worker.join()
    assert not arrays
    with memory.reusing_memory():
        again = [np.full(200_000, -1.0) for _ in range(6)]
    assert all((a == -1).all() for a in again)


def test_the_census_keeps_its_handler_and_nests_inside_the_cache():
    """Under an allocation census the cache stays out (the census sees every allocation); a census
    opened inside the cache counts, and closing it gives the cache back."""
    with counting_allocations() as census:
        with memory.reusing_memory() as on:
            assert not on
            kept = np.empty(300_000)
    assert census.count == 1 and not memory._is_cached_array(kept)
    with memory.reusing_memory():
        with counting_allocations() as inner:
            counted = np.empty(300_000)
        after = np.empty(300_000)
    assert inner.count == 1 and not memory._is_cached_array(counted) and memory._is_cached_array(after)


def test_release_gives_every_cached_block_back():
    with memory.reusing_memory():
        blocks = [np.empty(100_000 + 4096 * i) for i in range(4)]
    del blocks
    assert memory.cache_stats().cached_bytes > 0
    released = memory.release_cached_memory()
    assert released > 0 and memory.cache_stats() == memory.CacheStats(0, 0, memory.cache_stats().hits, memory.cache_stats().misses)


@pytest.mark.parametrize("name", ["kfac", "q-kld-wrm"])
def test_steps_with_the_cache_equal_steps_without_and_reuse_its_blocks(name, monkeypatch):
    """Six paper-CNN steps (batch 32, float32) give the same bits with the cache and without it;
    with it, the steps between refreshes after the first take every large block from the cache."""
    net = paper_cnn(dtype=np.float32)
    rng = np.random.default_rng(0)
    X, y = rng.random((32, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 32)

    def run(misses):
        opt = optim.make(name, net, preset="paper")
        theta = net.init(0)
        state = opt.init(theta)
        for _ in range(6):
            theta, state, _info = opt.step(theta, state, X, y)
            misses.append(memory.cache_stats().misses)
        return theta

    memory.release_cached_memory()
    cached_misses: list[int] = []
    with_cache = run(cached_misses)
    assert cached_misses[5] == cached_misses[3]  # steps 4 and 5 (between refreshes) allocated nothing new
    monkeypatch.setattr(memory, "_get_cache", lambda: None)  # steps without the cache (its blocks stay valid)
    without = run([])
    np.testing.assert_array_equal(with_cache, without)


def test_a_full_cache_evicts_the_blocks_cached_longest_ago():
    """Fill every slot with blocks of a size no longer asked for; blocks of another size then take
    the place of the oldest, and are reused from the second round on."""
    memory.release_cached_memory()
    with memory.reusing_memory():
        stale = [np.empty(80 * 1024 // 8) for _ in range(memory.SLOTS + 20)]
        del stale
        assert memory.cache_stats().blocks == memory.SLOTS
        for round_ in range(4):
            hits = memory.cache_stats().hits
            fresh = [np.full(200 * 1024 // 8, float(i)) for i in range(4)]
            assert all((a == i).all() for i, a in enumerate(fresh))
            del fresh
            if round_:
                assert memory.cache_stats().hits == hits + 4
    stats = memory.cache_stats()
    assert stats.blocks <= memory.SLOTS and stats.cached_bytes <= memory.CACHE_BYTES


def test_parsing_text_reallocates_without_the_gil_and_keeps_the_numbers():
    """np.fromstring with a separator grows its buffer by realloc with the GIL released: that path
    bypasses the cache and must keep the data."""
    text = " ".join(str(i) for i in range(50_000))
    with memory.reusing_memory():
        numbers = np.fromstring(text, dtype=np.float64, sep=" ")
        small = np.fromstring("1 2", dtype=complex, sep=" ")
    np.testing.assert_array_equal(numbers, np.arange(50_000.0))
    np.testing.assert_array_equal(small, [1, 2])
