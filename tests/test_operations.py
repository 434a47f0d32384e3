"""The operation census (kldwrm_ref.bench.operations) against blocks whose operations the test
counts by construction: which calls launch a kernel, which are views, transfers or metadata."""

import numpy as np
import pytest

from kldwrm_ref.bench.operations import counting_backend, counting_operations

xps = pytest.importorskip("array_api_strict")


def test_each_computing_call_counts_once_and_views_and_transfers_not_at_all():
    a = xps.asarray([1.0, 2.0, 3.0])
    with counting_operations() as census:
        b = xps.asarray([4.0, 5.0, 6.0])  # a transfer: not counted
        column = xps.reshape(a, (3, 1))  # a view
        scaled = column.T / 2.0  # .T is a view; the division counts
        total = xps.sum((a + 1.0) * b)  # +, *, sum
        tail = a[1:]  # basic slicing: a view
        picked = a[xps.asarray([0, 2])]  # a gather
        a[0] = 5.0  # an assignment
        values, _ = xps.linalg.eigh(xps.eye(2))  # eye, eigh
        spare = xps.empty((4,))  # an allocation, no kernel
        small = xps.finfo(xps.float64).eps  # metadata
        same = xps.astype(a, xps.float64, copy=False)  # a itself
        converted = xps.astype(a, xps.float32, copy=False)  # a new array: counts
        views = (xps.flip(a), xps.real(a), xps.linalg.diagonal(xps.reshape(b, (1, 3))))
    assert census.by_name == {"__truediv__": 1, "__add__": 1, "__mul__": 1, "sum": 1, "__getitem__[array]": 1, "__setitem__": 1, "eye": 1, "linalg.eigh": 1, "astype": 1}
    assert census.count == 9 and same is a and converted.dtype == xps.float32 and [v.shape for v in views] == [(3,), (3,), (1,)]
    assert float(total) == 2 * 4 + 3 * 5 + 4 * 6 and scaled.shape == (1, 3) and tail.shape == (2,) and picked.shape == (2,)
    assert values.shape == (2,) and spare.shape == (4,) and small > 0


def test_operations_inside_a_counted_call_are_not_counted_again():
    backend = counting_backend()
    average, new = xps.asarray([1.0, 2.0]), xps.asarray([3.0, 4.0])
    with counting_operations() as census:
        blended = backend.ea_update(average, new, 0.5)  # one kernel; its host hop inside is not counted
        norm = xps.linalg.vector_norm(blended)  # one call, whatever it calls inside
        product = backend.matmul(xps.reshape(blended, (1, 2)), xps.reshape(new, (2, 1)))  # the product kernel is xps.matmul
    assert census.by_name == {"kernel:ea_update": 1, "linalg.vector_norm": 1, "kernel:matmul": 1}
    assert float(product[0, 0]) == 2.0 * 3.0 + 3.0 * 4.0
    np.testing.assert_allclose(np.asarray(blended), [2.0, 3.0])
    assert float(norm) == pytest.approx(np.hypot(2.0, 3.0))


def test_a_kernel_made_of_array_operations_counts_as_one(monkeypatch):
    import kldwrm_ref.backends as backends

    made_of_operations = backends.host_hop_backend
    monkeypatch.setattr(backends, "host_hop_backend", lambda xp: made_of_operations(xp)._replace(ea_update=lambda average, new, rho, out=None: rho * average + (1.0 - rho) * new))
    backend = counting_backend()
    with counting_operations() as census:
        blended = backend.ea_update(xps.asarray([1.0, 2.0]), xps.asarray([3.0, 4.0]), 0.5)
    assert census.by_name == {"kernel:ea_update": 1}
    np.testing.assert_allclose(np.asarray(blended), [2.0, 3.0])


def test_the_census_puts_everything_back_and_counts_nothing_after_it():
    array_type = type(xps.asarray(0.0))
    originals = (xps.sum, xps.linalg.eigh, array_type.__add__, array_type.__getitem__)
    with counting_operations() as census:
        assert xps.sum is not originals[0] and array_type.__add__ is not originals[2]
        xps.sum(xps.asarray([1.0]) + 1.0)
    assert (xps.sum, xps.linalg.eigh, array_type.__add__, array_type.__getitem__) == originals
    xps.sum(xps.asarray([1.0]) + 1.0)
    assert census.count == 2


def test_one_census_at_a_time():
    with counting_operations() as outer:
        with pytest.raises(RuntimeError, match="already open"):
            with counting_operations():
                pass
        xps.sum(xps.asarray([1.0]))
    assert outer.count == 1
    with counting_operations() as later:  # the refused one released nothing it did not hold
        xps.sum(xps.asarray([1.0]))
    assert later.count == 1


def test_a_census_that_fails_to_open_leaves_the_next_one_free(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(xps, "asarray", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with counting_operations():
                pass
    with counting_operations() as census:
        xps.sum(xps.asarray([1.0]))
    assert census.count == 1
