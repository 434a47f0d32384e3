import pytest


def test_backend_seam_names_the_accepted_backends():
    from kldwrm_ref.backend import NUMPY, get_backend

    assert get_backend("numpy") is NUMPY and get_backend(NUMPY) is NUMPY
    with pytest.raises(ValueError, match="backend must be one of 'numpy', 'numba', 'cuda'"):
        get_backend("torch")
    with pytest.raises(NotImplementedError, match="use backend='numpy'"):
        get_backend("numba")
