"""The allocation census (kldwrm_ref.bench.allocations) against allocations whose sizes the test
knows independently: the element count times the item size of arrays it makes itself; the GPU's
pool census against requests made through a stand-in for CuPy's memory-hook protocol."""

import asyncio
import sys
import threading
import types
from contextlib import ExitStack, contextmanager
from typing import ClassVar

import numpy as np
import pytest

from kldwrm_ref.bench.allocations import counting_allocations, counting_pool_allocations

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import get_handler_name


def test_the_census_sees_every_kind_of_allocation_at_or_above_its_threshold():
    with counting_allocations(min_bytes=1000) as census:
        empty = np.empty(1000)  # malloc, 8000 bytes
        zeros = np.zeros((20, 30), dtype=np.float32)  # calloc, 2400 bytes
        small = np.ones(100, dtype=np.int8)  # 100 bytes: below the threshold
        total = empty + 1.0  # a ufunc's output, 8000 bytes
        grown = np.arange(300, dtype=np.int64)  # 2400 bytes
        grown.resize(400, refcheck=False)  # realloc to 3200 bytes
    assert census.sizes == [8000, 2400, 8000, 2400, 3200]
    assert (census.count, census.total_bytes, census.largest) == (5, 24_000, 8000)
    assert small.nbytes < 1000 and zeros.sum() == 0 and total.shape == (1000,) and grown.shape == (400,)


def test_the_handler_is_put_back_and_arrays_made_under_it_outlive_it():
    before = get_handler_name()
    with counting_allocations() as census:
        kept = np.full(50_000, 2.0)
        assert get_handler_name() != before
    assert get_handler_name() == before and census.sizes == [400_000]
    after = np.empty(50_000)  # not counted: the census is closed
    assert census.count == 1 and float(kept.sum()) == 100_000.0 and after.size == 50_000
    del kept  # freed by NumPy's own free function, after the census
    with pytest.raises(ZeroDivisionError), counting_allocations():
        raise ZeroDivisionError
    assert get_handler_name() == before


def test_censuses_nest_and_each_counts_what_happened_inside_it():
    with counting_allocations() as outer:
        a = np.empty(1024)
        with counting_allocations(min_bytes=0) as inner:
            b = np.empty(2, dtype=np.int32)
            c = np.empty(4096, dtype=np.uint8)
        d = np.empty(2048)
    assert inner.sizes == [8, 4096] and outer.sizes == [8192, 4096, 16384]
    assert a.size + b.size + c.size + d.size == 1024 + 2 + 4096 + 2048


def test_only_the_calling_threads_allocations_are_counted():
    made = []
    worker = threading.Thread(target=lambda: made.append(np.empty(100_000)))
    with counting_allocations() as census:
        worker.start()
        worker.join()
        mine = np.empty(10_000)
    assert census.sizes == [80_000] and made[0].nbytes == 800_000 and mine.nbytes == 80_000


@contextmanager
def census_open_in_another_thread(depth: int = 1):
    """``depth`` nested censuses opened in another thread and held open while the block runs; the
    yielded dict gets the sizes of each once they close."""
    opened, release, seen = threading.Event(), threading.Event(), {}

    def worker():
        with ExitStack() as stack:
            theirs = [stack.enter_context(counting_allocations()) for _ in range(depth)]
            opened.set()
            release.wait()
        seen["sizes"] = [census.sizes for census in theirs]

    thread = threading.Thread(target=worker)
    thread.start()
    opened.wait()
    try:
        yield seen
    finally:
        release.set()
        thread.join()


def test_a_census_open_in_another_thread_counts_none_of_this_threads_allocations():
    with census_open_in_another_thread() as theirs, counting_allocations() as mine:
        kept = np.empty(10_000)
    assert mine.sizes == [80_000] and theirs["sizes"] == [[]] and kept.size == 10_000


def test_censuses_closed_out_of_order_count_what_each_saw_and_put_the_handler_back():
    """A opens, B opens inside it, A closes before B: what B sees after that counts in B alone, and
    closing B reinstalls the handler from before A."""
    before = get_handler_name()
    a, b = counting_allocations(), counting_allocations()
    census_a = a.__enter__()
    first = np.empty(1000)
    census_b = b.__enter__()
    second = np.empty(2000)
    a.__exit__(None, None, None)
    third = np.empty(3000)
    b.__exit__(None, None, None)
    assert census_a.sizes == [8000, 16000] and census_b.sizes == [16000, 24000]
    assert get_handler_name() == before and first.size + second.size + third.size == 6000
    # the middle of three closes first: the innermost then nests in the outer, even when another
    # thread's censuses take every free record, the middle one's included, meanwhile
    with counting_allocations() as outer:
        middle, inner = counting_allocations(), counting_allocations()
        census_middle, census_inner = middle.__enter__(), inner.__enter__()
        x = np.empty(1024)
        middle.__exit__(None, None, None)
        with census_open_in_another_thread(depth=70) as theirs:
            y = np.empty(2048)
        inner.__exit__(None, None, None)
    assert outer.sizes == [8192, 16384] and census_middle.sizes == [8192] and census_inner.sizes == [8192, 16384]
    assert theirs["sizes"] == [[]] * 70 and get_handler_name() == before and x.size + y.size == 3072


def test_tasks_started_inside_a_census_never_count_in_a_later_one():
    """An asyncio task copies its context, handler included: what it allocates after the census it
    started in has closed counts in that closed census, never in one opened later (whose record
    would otherwise be the old one's), and a census it opens nests without a cycle."""
    seen = {}

    async def late():
        await asyncio.sleep(0.01)
        return np.empty(7777)

    async def nested():
        with counting_allocations() as theirs:
            await asyncio.sleep(0.01)  # the parent's census closes meanwhile
            with counting_allocations() as innermost:
                kept = np.empty(1000)
        seen["theirs"], seen["innermost"] = theirs.sizes, innermost.sizes
        return kept

    async def main():
        with counting_allocations() as first:
            tasks = [asyncio.create_task(late()), asyncio.create_task(nested())]
            await asyncio.sleep(0)
        with counting_allocations() as later:
            made = await asyncio.gather(*tasks)
        seen["first"], seen["later"] = first.sizes, later.sizes
        return made

    made = asyncio.run(main())
    assert seen == {"first": [], "later": [], "theirs": [8000], "innermost": [8000]} and made[0].size == 7777


def test_a_census_counts_none_of_its_own_work_nor_failed_allocations_and_checks_its_threshold():
    with counting_allocations(min_bytes=0) as outer:
        with counting_allocations(min_bytes=0) as inner:
            with pytest.raises(MemoryError):
                np.empty(2**62, dtype=np.uint8)
    assert outer.sizes == [] and inner.sizes == []
    for bad in (-1, 2**63, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"min_bytes must be an integer in \[0, 2\*\*63\)"), counting_allocations(bad):
            pass


def test_an_array_made_under_a_closed_census_counts_nowhere_else_when_it_grows():
    """b nested in a, an array made under b: once both closed, nothing holds a's record, which a
    census in another thread may take; growing the array must not count there."""
    with counting_allocations(0) as a, counting_allocations(0) as b:
        grown = np.arange(10)
    with census_open_in_another_thread(depth=70) as theirs:
        grown.resize(5000, refcheck=False)
    assert a.sizes == b.sizes == [80] and theirs["sizes"] == [[]] * 70 and grown.size == 5000


class FakeMemoryHook:
    """CuPy's memory-hook protocol (``cupy.cuda.MemoryHook``), for machines without CuPy: ``with hook``
    registers it among the thread's hooks under its name (a second hook of that name is refused
    with a KeyError), and the pool calls each registered hook's ``malloc_postprocess`` by keyword
    after a request, with a null ``mem_ptr`` when the request failed."""

    hooks: ClassVar[dict] = {}
    name = "MemoryHook"

    def __enter__(self):
        if self.name in self.hooks:
            raise KeyError(f"memory hook {self.name} already exists")
        self.hooks[self.name] = self
        return self

    def __exit__(self, *exc):
        del self.hooks[self.name]

    def malloc_postprocess(self, **kwargs):
        pass


def fake_pool_request(size: int, failed: bool = False) -> None:
    """A request to the fake pool: CuPy rounds to 512 bytes and passes both sizes; a failed
    request has null ``mem_ptr`` and ``pmem_id``, one of 0 bytes a null ``mem_ptr``."""
    for hook in list(FakeMemoryHook.hooks.values()):
        hook.malloc_postprocess(device_id=0, size=size, mem_size=-(-size // 512) * 512, mem_ptr=0 if failed or not size else 1 << 40, pmem_id=0 if failed else 7)


@pytest.fixture
def fake_cupy(monkeypatch):
    cupy, cuda = types.ModuleType("cupy"), types.ModuleType("cupy.cuda")
    cuda.MemoryHook = FakeMemoryHook
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setattr(FakeMemoryHook, "hooks", {})


def test_the_pool_census_counts_successful_requests_by_requested_size_nests_and_removes_its_hook(fake_cupy):
    fake_pool_request(10_000)  # before: not counted
    with counting_pool_allocations(min_bytes=4000) as outer:
        fake_pool_request(5000)
        fake_pool_request(100)  # below the threshold
        fake_pool_request(2**40, failed=True)  # out of memory: not counted
        with counting_pool_allocations(min_bytes=0) as inner:
            fake_pool_request(4001)
            fake_pool_request(8)
            fake_pool_request(0)  # an empty array: CuPy's pointer is null, its memory object is not
        fake_pool_request(4000)
    fake_pool_request(9000)  # after: not counted
    assert outer.sizes == [5000, 4001, 4000] and (outer.count, outer.total_bytes, outer.largest) == (3, 13_001, 5000)
    assert inner.sizes == [4001, 8, 0] and (inner.count, inner.total_bytes, inner.largest) == (3, 4009, 4001)
    assert FakeMemoryHook.hooks == {}


def test_the_pool_census_checks_its_threshold_before_touching_cupy(fake_cupy):
    for bad in (-1, 2**63, 1.5, True, "4096"):
        with pytest.raises(ValueError, match=r"min_bytes must be an integer in \[0, 2\*\*63\)"):
            with counting_pool_allocations(min_bytes=bad):
                pass
    assert FakeMemoryHook.hooks == {}
