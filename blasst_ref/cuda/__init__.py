"""Numba CUDA backend: zero-copy GPU arrays in, BLASST prefill / split-KV decode kernels.

This module is the backend's front door, called by :func:`blasst_ref.attention` with
``backend="cuda"`` (or ``"auto"`` for CUDA arrays). It takes any objects that expose
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors, Numba device arrays), wraps
them with :func:`numba.cuda.as_cuda_array` (no copy: the kernels read the caller's memory),
allocates the output with the caller's library, and launches the kernel version that
:mod:`.launch` chooses for the shape. The kernels know nothing of the libraries.

What is where in this package:

* :mod:`.launch`: the version table (which version serves a shape), the two host paths,
  ``dump_source`` for the generated kernel sources;
* one module per kernel version, llm.c ``dev/cuda`` style: :mod:`.prefill_v1`,
  :mod:`.prefill_v2`, :mod:`.decode_v1`, :mod:`.decode_v2`, and :mod:`.combine` (the
  split-KV merge of decode);
* :mod:`.rule`: the skip rule of :mod:`blasst_ref.rule` compiled for the device;
  :mod:`.intrinsics`: vector loads, warp shuffles and their simulator twins;
  :mod:`.problem`: the vocabulary of the version table;
* :mod:`.numba_internals`: every use of Numba internals, and the fallback to Numba's public
  dispatcher where one is missing.

On a real GPU, torch tensors and CuPy arrays of shapes the v2 kernels take go through a
faster host path (:func:`attention`'s docstring, :mod:`.numba_internals`): plans cached per
shape, launches from raw data pointers, ~0.1 ms of host time per call instead of ~0.5-0.8 ms.
torch ``bfloat16`` tensors are read as their bits (a 2-byte integer array is bfloat16 to
the kernels' loads and stores, :mod:`.intrinsics`).
"""

from __future__ import annotations


import numpy as np
from numba import config, cuda

from .. import tiling
from .. import rule as _rule  # (not `rule`: that name is this package's .rule module)
from ..rule import log_threshold
from . import launch, numba_internals

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
    """A Numba view of a CUDA array (no copy); a torch bfloat16 tensor as its int16 bits
    (the kernels read a 2-byte integer array as bfloat16)."""
    if _is_numba_array(x):
        return x
    if _is_torch_bf16(x):
        import torch

        x = x.view(torch.int16)
    return cuda.as_cuda_array(x)


def _is_torch_bf16(x) -> bool:
    return array_library(x) == "torch" and str(x.dtype) == "torch.bfloat16"


def _check_contiguous(name, x):
    if _is_torch_bf16(x):  # torch has no array interface for bfloat16
        shape, strides = tuple(x.shape), tuple(2 * st for st in x.stride())
        dtype = np.dtype(np.int16)
    else:
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

        tdtype = dtype if isinstance(dtype, torch.dtype) else {
            np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
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


def attention(q, k, v, thresh, causal, scale, block_q, block_k, *, decode_seed="sink"):
    """BLASST attention on the GPU (validated by :func:`blasst_ref.attention`).

    Args:
        q, k, v: CUDA arrays, ``(B, Hq, Lq, Dqk)``, ``(B, Hkv, Lk, Dqk)``, ``(B, Hkv, Lk, Dv)``
            (or 3-D without ``B``), C-contiguous, one dtype: float32 or float16, or a torch
            bfloat16 tensor (read as its bits; computed in float32, stored back as bfloat16).
        thresh, causal, scale, block_q, block_k, decode_seed: as
            :func:`blasst_ref.attention` (``decode_seed``: ``"sink"`` or ``"none"``).

    Returns:
        ``(out, tile_map, kernel)``: ``out`` an array of the caller's library with ``q``'s
        rank and dtype; ``tile_map`` an int8 Numba device array, copied to the host only
        when the caller asks for statistics (on the fast path, below, it is a buffer of this
        shape that the next call of the same shape overwrites: copy it before calling
        again); ``kernel`` the kernel version that ran (``"prefill_v3"``,
        :mod:`.launch`).

    Two host paths, the same kernels:

    * **fast** (torch tensors or objects with ``__cuda_array_interface__``, on a real GPU
      whose Numba has the internals it needs, shapes the v2 kernels take, 16-byte aligned
      data): the kernels of a shape are compiled and their fixed launch parameters, partials
      and tile map built once (:func:`.launch.fast_plan`, cached per shape); a call reads
      the data pointers, allocates the output through the caller's library, zeroes the tile
      map and launches from raw pointers (:mod:`.numba_internals`). No synchronisation.
    * **general** (Numba arrays, the simulator, v1 shapes, or a Numba without those
      internals): Numba views of the arrays and Numba's public dispatcher.
    """
    global _AVAILABLE
    if not _AVAILABLE:
        if not cuda.is_available():
            raise RuntimeError(
                "backend='cuda' needs a CUDA GPU and driver, and numba.cuda.is_available() "
                "is False on this machine; use backend='cpu' with numpy arrays"
            )
        _AVAILABLE = True
    seeded = _rule.decode_seeded(decode_seed)
    if numba_internals.available():
        res = _attention_fast(q, k, v, thresh, causal, scale, block_q, block_k, seeded)
        if res is not None:
            return res
    return _attention_general(q, k, v, thresh, causal, scale, block_q, block_k, seeded)


SIMULATOR = bool(config.ENABLE_CUDASIM)
_AVAILABLE = False
_TORCH_DTYPES: dict = {}


def _torch_dtypes():
    if not _TORCH_DTYPES:
        import torch

        _TORCH_DTYPES.update({torch.float16: np.dtype(np.float16),
                              torch.float32: np.dtype(np.float32),
                              torch.bfloat16: np.dtype(np.uint16)})  # bf16: its bits
    return _TORCH_DTYPES


def _raw(name, x):
    """``(ptr, shape, kernel dtype, device id or None)`` of a CUDA array for the fast path,
    or ``None`` for a Numba array. Raises the API's error for a non-contiguous array."""
    lib = array_library(x)
    if lib == "torch":
        dt = _torch_dtypes().get(x.dtype)
        if dt is None:
            raise TypeError(f"the CUDA backend takes float16, bfloat16 or float32 tensors, "
                            f"got {x.dtype}")
        if not x.is_contiguous():
            _check_contiguous(name, x)  # raises with the strides
        return x.data_ptr(), tuple(x.shape), dt, x.device.index
    if _is_numba_array(x):
        return None
    iface = x.__cuda_array_interface__
    shape, strides = tuple(iface["shape"]), iface.get("strides")
    dt = np.dtype(iface["typestr"])
    if strides is not None:
        _check_contiguous(name, x)
    return iface["data"][0], shape, dt, _device_id(x)


def _attention_fast(q, k, v, thresh, causal, scale, block_q, block_k, seeded=True):
    """The fast path; ``None`` where it does not apply (then the general path runs)."""
    rq, rk, rv = _raw("q", q), _raw("k", k), _raw("v", v)
    if rq is None or rk is None or rv is None:
        return None
    devices = {r[3] for r in (rq, rk, rv)} - {None}
    if len(devices) > 1:
        raise ValueError(f"q, k and v live on different GPUs ({sorted(devices)}); move them to one")
    if devices and devices != {_current_device()}:
        return None
    dtype = rq[2]
    if dtype not in (np.float16, np.float32, np.uint16):
        raise TypeError(f"the CUDA backend takes float16 or float32 arrays, got {dtype}")
    q_shape = rq[1]
    q4, k4, v4 = ((1,) + r[1] if len(r[1]) == 3 else r[1] for r in (rq, rk, rv))
    if any(r[0] % 16 for r in (rq, rk, rv)):
        return None  # the fast versions read 16-byte vectors
    if q4[0] * q4[1] * q4[2] == 0:
        return None
    runner = launch.fast_plan(q4, k4, v4, dtype, bool(causal), block_q, block_k, seeded)
    if runner is None:
        return None
    out_shape = q_shape[:-1] + (v4[3],)
    out = _new_like_library(q, out_shape, q.dtype if array_library(q) == "torch" else dtype)
    outp = out.data_ptr() if array_library(out) == "torch" else \
        out.__cuda_array_interface__["data"][0]
    if outp % 16:
        return None
    tile_map = runner.run(rq[0], rk[0], rv[0], outp, log_threshold(thresh), scale)
    return out, tile_map, runner_version(runner)


def runner_version(runner) -> str:
    """The kernel version a fast-path runner belongs to (``"prefill_v3"``): its module."""
    return type(runner).__module__.rsplit(".", 1)[-1]


_CUR_DEVICE = []


def _current_device():
    if not _CUR_DEVICE:
        _CUR_DEVICE.append(cuda.get_current_device().id)
    return _CUR_DEVICE[0]


def _attention_general(q, k, v, thresh, causal, scale, block_q, block_k, seeded=True):
    """The general path: Numba views of the arrays, Numba's dispatcher."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_contiguous(name, x)
    devices = {_device_id(x) for x in (q, k, v)} - {None}
    if len(devices) > 1:
        raise ValueError(f"q, k and v live on different GPUs ({sorted(devices)}); move them to one")
    bf16 = _is_torch_bf16(q)
    if bf16:
        q_shape, dtype = tuple(q.shape), q.dtype
    else:
        q_shape, dtype, _ = _meta(q)
        if dtype not in (np.float16, np.float32):
            raise TypeError(f"the CUDA backend takes float16 or float32 arrays, got {dtype}")

    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    n_b, n_hq, lq, _ = q4.shape
    n_hkv, lk, dv = k4.shape[1], k4.shape[2], v4.shape[3]
    out_shape = q_shape[:-1] + (dv,)
    out = _new_like_library(q, out_shape, dtype)
    out4 = _as_4d(out)
    log_thresh = log_threshold(thresh)
    n_kt = tiling.num_tiles(lk, block_k)

    if tiling.is_decode(lq):
        tile_map = _as_map(q, (n_b, n_hkv, 1, n_kt))
        kernel = launch.launch_decode(q4, k4, v4, out4, tile_map, log_thresh, bool(causal),
                                      scale, block_k, tiling.decode_split_tiles(lk, block_k),
                                      tiling.decode_num_splits(lk, block_k), seeded=seeded)
    else:
        tile_map = _as_map(q, (n_b, n_hq, tiling.num_tiles(lq, block_q), n_kt))
        kernel = launch.launch_prefill(q4, k4, v4, out4, tile_map, log_thresh, bool(causal),
                                       scale, block_q, block_k)
    return out, tile_map, kernel
