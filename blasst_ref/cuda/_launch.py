"""Kernel launches from raw device pointers: the fast host path of the CUDA backend.

Numba's dispatcher spends tens of microseconds per launch on argument handling: it types
every argument (``typeof``), wraps every array (``as_cuda_array`` of a torch tensor builds a
``DeviceNDArray``, reading ``__cuda_array_interface__``, which torch builds in Python), then
flattens each array into its kernel parameters. For a decode call (two kernels, 24
arguments, five arrays) that was ~0.4 ms of host time per call, more than the 16k-key
kernel itself (docs/BENCHMARKS.md, CUDA section).

Here a kernel is compiled once per signature (``dispatcher.compile(argtypes)``, with
argument types built from dtypes and ranks, no arrays needed) and launched with the driver's
``launch`` on a parameter list built from plain integers: a C-contiguous array parameter of
Numba's ABI is ``meminfo, parent, nitems, itemsize, data, shape..., strides...``, of which
only ``data`` changes between calls of one shape. Only used on a real GPU (the simulator
keeps the dispatcher).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

__all__ = ["allow_dynamic_shared", "array_params", "array_type", "compile_kernel",
           "device_ptr", "launch_raw", "memset0"]


def array_type(dtype, ndim: int):
    """Numba's type of a C-contiguous device array of ``dtype`` and rank ``ndim``."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    return types.Array(numpy_support.from_dtype(np.dtype(dtype)), ndim, "C")


def compile_kernel(dispatcher, argtypes):
    """``(compiled kernel, its driver function)`` for ``argtypes`` (compiled once; Numba
    caches the overload)."""
    kern = dispatcher.compile(tuple(argtypes))
    cufunc = kern._codelibrary.get_cufunc()
    return kern, cufunc


def array_params(ptr: int, shape: tuple, itemsize: int) -> list:
    """The kernel parameters of a C-contiguous array (Numba's ABI, as its dispatcher
    passes them: plain integers)."""
    size = 1
    for n in shape:
        size *= n
    strides = []
    acc = itemsize
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return [0, 0, size, itemsize, int(ptr), *shape, *reversed(strides)]


_STREAM = None
_CONFIGS: dict = {}


def launch_raw(cufunc, grid, block, shared, params):
    """Launch on the default (legacy) stream, as Numba's dispatcher does."""
    global _STREAM
    from cuda.core import LaunchConfig, launch

    if _STREAM is None:
        from numba.cuda.cudadrv import driver

        _STREAM = driver._to_core_stream(0)
    key = (grid, block, shared)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        if len(_CONFIGS) > 256:
            _CONFIGS.clear()
        cfg = _CONFIGS[key] = LaunchConfig(grid=grid, block=block, shmem_size=shared)
    launch(_STREAM, cfg, cufunc.kernel, *params)


def allow_dynamic_shared(cufunc, nbytes: int):
    """Opt a compiled kernel in to ``nbytes`` of dynamic shared memory (> 48 KB)."""
    from numba.cuda.cudadrv.driver import binding, driver

    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)


def current_device_id() -> int:
    return cuda.get_current_device().id


def device_ptr(arr) -> int:
    """The data pointer of a Numba device array."""
    return int(arr.__cuda_array_interface__["data"][0])


def memset0(ptr: int, nbytes: int):
    """Zero ``nbytes`` at ``ptr`` (ordered on the default stream, asynchronous to the host)."""
    from numba.cuda.cudadrv.driver import driver

    driver.cuMemsetD8(ptr, 0, nbytes)
