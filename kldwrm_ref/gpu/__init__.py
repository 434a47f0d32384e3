"""The device-resident GPU path (numba-cuda): theta, data and optimiser state stay on the GPU.

- :mod:`~kldwrm_ref.gpu.transfers`: the counted host <-> device copies;
- :mod:`~kldwrm_ref.gpu.kernels`: elementwise, layout, row-sum and reduction kernels;
- :mod:`~kldwrm_ref.gpu.network`: a Network's passes on device arrays;
- :mod:`~kldwrm_ref.gpu.step`: the update rules on device arrays (:func:`make_device`);
- :mod:`~kldwrm_ref.gpu.data`: a data set uploaded once, batches gathered on the device.

Importing this package imports numba-cuda: it needs a GPU or ``NUMBA_ENABLE_CUDASIM=1``.
"""

from kldwrm_ref.gpu.data import DeviceData
from kldwrm_ref.gpu.network import DeviceNetwork
from kldwrm_ref.gpu.step import DeviceOptimizer, make_device, unsupported_reason
from kldwrm_ref.gpu.transfers import counting, to_device, to_host

__all__ = ["DeviceData", "DeviceNetwork", "DeviceOptimizer", "counting", "make_device", "to_device", "to_host", "unsupported_reason"]
