"""Numba CUDA backend: zero-copy GPU arrays in, BLASST prefill / split-KV decode kernels.

This module is the backend's front door, called by :func:`blasst_ref.attention` with
``backend="cuda"`` (or ``"auto"`` for CUDA arrays). It takes any objects that expose
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors, Numba device arrays), wraps
them with :func:`numba.cuda.as_cuda_array` (no copy: the kernels read the caller's memory),
allocates the output with the caller's library, and launches the kernels of
:mod:`.prefill` or :mod:`.decode`. The kernels know nothing of the libraries.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .. import tiling

__all__ = ["attention", "array_library"]


def array_library(x) -> str:
    """``"torch"``, ``"cupy"`` or ``"numba"``: the library a CUDA array comes from."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    return "numba"


def _device_id(x):
    lib = array_library(x)
    if lib == "torch":
        return x.device.index
    if lib == "cupy":
        return x.device.id
    return None  # a Numba device array lives on the current device


def _is_numba_array(x) -> bool:
    # a Numba device array, or the simulator's stand-in for one (which has no interface)
    return type(x).__name__ in ("DeviceNDArray", "FakeCUDAArray")


def _meta(x):
    """``(shape, dtype, strides or None)`` of a CUDA array."""
    if _is_numba_array(x):
        return tuple(x.shape), np.dtype(x.dtype), tuple(x.strides)
    iface = x.__cuda_array_interface__
    strides = iface.get("strides")
    return tuple(iface["shape"]), np.dtype(iface["typestr"]), strides and tuple(strides)


def _as_numba(x):
    """A Numba view of a CUDA array (no copy)."""
    return x if _is_numba_array(x) else cuda.as_cuda_array(x)


def _check_contiguous(name, x):
    shape, dtype, strides = _meta(x)
    if strides is None:
        return
    itemsize = dtype.itemsize
    expect, acc = [], itemsize
    for n in reversed(shape):
        expect.append(acc)
        acc *= n
    expect = tuple(reversed(expect))
    if any(s != e for s, e, n in zip(strides, expect, shape) if n > 1):
        raise ValueError(
            f"{name} is not C-contiguous (strides {strides} for shape {tuple(shape)}): the "
            f"CUDA backend reads the caller's memory in place; pass {name}.contiguous() "
            f"(torch) or cupy.ascontiguousarray({name})"
        )


def _new_like_library(ref, shape, dtype, *, zero=False):
    """A new device array of ``shape``/``dtype`` from the library of ``ref``, on its device.

    Allocating through the caller's library keeps its allocator (and its stream-ordered
    memory pool) in charge, and avoids Numba's host-side device-array API, which upstream
    is deprecating; only arrays that came from Numba get a Numba array back."""
    lib = array_library(ref)
    if lib == "torch":
        import torch

        tdtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                  np.dtype(np.int8): torch.int8}[np.dtype(dtype)]
        make = torch.zeros if zero else torch.empty
        return make(shape, dtype=tdtype, device=ref.device)
    if lib == "cupy":
        import cupy

        with cupy.cuda.Device(ref.device.id):
            return (cupy.zeros if zero else cupy.empty)(shape, dtype=dtype)
    arr = cuda.device_array(shape, dtype=dtype)
    if zero:
        _fill_zero_int8[max(1, -(-arr.size // 256)), 256](arr.reshape(arr.size))
    return arr


@cuda.jit
def _fill_zero_int8(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = 0


def _as_map(ref, shape):
    """A zeroed int8 tile map on ``ref``'s device, as a Numba view the kernels write into."""
    return _as_numba(_new_like_library(ref, shape, np.int8, zero=True))


def _as_4d(x):
    arr = _as_numba(x)
    if arr.ndim == 3:
        arr = arr.reshape((1,) + arr.shape)
    return arr


def attention(q, k, v, thresh, causal, scale, block_q, block_k):
    """BLASST attention on the GPU (validated by :func:`blasst_ref.attention`).

    Args:
        q, k, v: CUDA arrays, ``(B, Hq, Lq, Dqk)``, ``(B, Hkv, Lk, Dqk)``, ``(B, Hkv, Lk, Dv)``
            (or 3-D without ``B``), C-contiguous, one dtype: float32 or float16.
        thresh, causal, scale, block_q, block_k: as :func:`blasst_ref.attention`.

    Returns:
        ``(out, tile_map)``: ``out`` an array of the caller's library with ``q``'s rank and
        dtype; ``tile_map`` an int8 Numba device array (a view of an array of the caller's
        library), copied to the host only when the caller asks for statistics.
    """
    if not cuda.is_available():
        raise RuntimeError(
            "backend='cuda' needs a CUDA GPU and driver, and numba.cuda.is_available() is "
            "False on this machine; use backend='cpu' with numpy arrays"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_contiguous(name, x)
    devices = {_device_id(x) for x in (q, k, v)} - {None}
    if len(devices) > 1:
        raise ValueError(f"q, k and v live on different GPUs ({sorted(devices)}); move them to one")
    q_shape, dtype, _ = _meta(q)
    if dtype not in (np.float16, np.float32):
        raise TypeError(f"the CUDA backend takes float16 or float32 arrays, got {dtype}")

    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    n_b, n_hq, lq, _ = q4.shape
    n_hkv, lk, dv = k4.shape[1], k4.shape[2], v4.shape[3]
    out_shape = q_shape[:-1] + (dv,)
    out = _new_like_library(q, out_shape, dtype)
    out4 = _as_4d(out)
    log_thresh = -math.inf if thresh == 0 else math.log(thresh)
    n_kt = tiling.num_tiles(lk, block_k)

    if tiling.is_decode(lq):
        from .decode import launch_decode

        tile_map = _as_map(q, (n_b, n_hkv, 1, n_kt))
        launch_decode(q4, k4, v4, out4, tile_map, log_thresh, bool(causal), scale, block_k,
                      tiling.decode_split_tiles(lk, block_k),
                      tiling.decode_num_splits(lk, block_k))
    else:
        from .prefill import launch_prefill

        tile_map = _as_map(q, (n_b, n_hq, tiling.num_tiles(lq, block_q), n_kt))
        launch_prefill(q4, k4, v4, out4, tile_map, log_thresh, bool(causal), scale, block_q,
                       block_k)
    return out, tile_map
