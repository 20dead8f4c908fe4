"""Every use of Numba's internals in the CUDA backend, and the one fallback when one is missing.

Why internals at all
--------------------
Numba's dispatcher spends tens of microseconds per launch on argument handling: it types
every argument (``typeof``), wraps every array (``as_cuda_array`` of a torch tensor builds a
``DeviceNDArray``, reading ``__cuda_array_interface__``, which torch builds in Python), then
flattens each array into its kernel parameters. For a decode call (two kernels, 24
arguments, five arrays) that was ~0.4 ms of host time per call, more than the 16k-key kernel
itself (docs/BENCHMARKS.md, CUDA section). The fast host path compiles a kernel once per
signature and launches it from a parameter list of plain integers, which needs what Numba
does not offer publicly (numba-cuda 0.30):

* ``kernel._codelibrary.get_cufunc()``: the driver function of a kernel compiled by
  ``dispatcher.compile(argtypes)`` (the public part);
* ``numba.cuda.cudadrv.driver._to_core_stream(0)``: the ``cuda.core`` handle of the legacy
  default stream that Numba's own launches use, for ``cuda.core.launch``;
* Numba's kernel ABI of a C-contiguous array, built by hand: ``meminfo, parent, nitems,
  itemsize, data, shape..., strides...`` (only ``data`` changes between calls of one shape);
* ``driver.cuMemsetD8``: zero a tile map without a kernel launch;
* ``driver.cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)``: opt a
  kernel in to more than 48 KB of dynamic shared memory (prefill v2 uses 128-205 KB; Numba's
  dispatcher has no option for it, so the general host path needs it too).

And, for register reports only (:func:`ptx`, no kernel is launched): a stand-in for
``numba.cuda.dispatcher.get_current_device`` on a machine without a GPU, and a kernel's
``targetoptions``. Nothing outside this module touches any of them.

The fallback
------------
:func:`available` says whether this Numba has all of them (looked up once, by name, from
:data:`INTERNALS`); under the CUDA simulator it never does. Where it does not, or where a
use of one fails with ``AttributeError`` / ``ImportError`` (an internal renamed in a newer
Numba), :func:`disable` records why, warns once, and from then on every call takes the
**general host path: Numba's public dispatcher** (``kernel[grid, block](*arrays)``), which
launches the same kernels with the same results, only with more host time per call. Kernel
versions that need more than 48 KB of shared memory (prefill v2) are then not chosen
(:func:`can_raise_shared_limit`); the version table falls back to one that fits.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
import warnings

import numpy as np
from numba import config

__all__ = ["INTERNALS", "Array", "InternalsMissing", "RawKernel", "argtypes", "array_type",
           "available", "can_raise_shared_limit", "disable", "max_registers", "memset0",
           "missing", "ptx", "raise_shared_limit"]

#: The internals, by role: ``(module, dotted attribute path)``, resolved lazily by name.
#: ``_codelibrary`` is an attribute of each compiled kernel, so what is looked up for it is
#: the method it leads to.
INTERNALS = {
    "kernel code library": ("numba.cuda.codegen", "CUDACodeLibrary.get_cufunc"),
    "default stream as cuda.core": ("numba.cuda.cudadrv.driver", "_to_core_stream"),
    "cuda.core launch": ("cuda.core", "launch"),
    "cuda.core launch config": ("cuda.core", "LaunchConfig"),
    "driver memset": ("numba.cuda.cudadrv.driver", "driver.cuMemsetD8"),
    "driver kernel attribute": ("numba.cuda.cudadrv.driver", "driver.cuKernelSetAttribute"),
    "max dynamic shared attribute": (
        "numba.cuda.cudadrv.driver",
        "binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES"),
}

#: Static shared memory a block may use without the opt-in attribute (CUDA's 48 KB).
STATIC_SHARED_BYTES = 48 * 1024


class InternalsMissing(RuntimeError):
    """A Numba internal this module relies on is missing (or failed): the caller falls back
    to Numba's public dispatcher."""


_lock = threading.Lock()
_state = {"missing": None, "disabled": None}


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def missing() -> tuple[str, ...]:
    """The internals of :data:`INTERNALS` this Numba lacks, as ``module.attribute`` strings
    (looked up once; empty on a Numba that has them all). On the CUDA simulator the driver
    internals are always missing."""
    found = _state["missing"]
    if found is not None:  # every call of the API asks: no lock once looked up
        return found
    with _lock:
        if _state["missing"] is None:
            gone = []
            for module, path in INTERNALS.values():
                if config.ENABLE_CUDASIM and module.startswith("numba.cuda.cudadrv"):
                    gone.append(f"{module}.{path}")  # the simulator's stand-in has no driver
                    continue
                try:
                    _resolve(module, path)
                except (ImportError, AttributeError):
                    gone.append(f"{module}.{path}")
            _state["missing"] = tuple(gone)
        return _state["missing"]


def available() -> bool:
    """Whether the fast host path may run: every internal is there and none has failed."""
    return not missing() and _state["disabled"] is None


def disable(reason: str) -> None:
    """Stop using the internals for the rest of the process (warns once): every later call
    goes through Numba's public dispatcher."""
    with _lock:
        if _state["disabled"] is None:
            _state["disabled"] = reason
            warnings.warn(
                f"blasst_ref.cuda: {reason}; CUDA calls use Numba's public dispatcher from now "
                f"on (same kernels and results, more host time per call)",
                RuntimeWarning, stacklevel=3)


def disabled_reason() -> str | None:
    """Why :func:`disable` was called, or ``None``."""
    return _state["disabled"]


def _reset() -> None:
    """Forget what was looked up and disabled (tests)."""
    with _lock:
        _state["missing"] = None
        _state["disabled"] = None


def can_raise_shared_limit() -> bool:
    """Whether a kernel may be given more than :data:`STATIC_SHARED_BYTES` of dynamic shared
    memory: always on the simulator (it has no limit), on a GPU only with the internals."""
    return bool(config.ENABLE_CUDASIM) or available()


_resolved: dict = {}


def _internal(role: str):
    """The internal of ``role`` (looked up once per name; :class:`InternalsMissing` if gone)."""
    where = INTERNALS[role]
    obj = _resolved.get(where)
    if obj is None:
        try:
            obj = _resolved[where] = _resolve(*where)
        except (ImportError, AttributeError) as exc:
            raise InternalsMissing(f"this Numba lacks {'.'.join(where)} ({exc})") from exc
    return obj


def array_type(dtype, ndim: int):
    """Numba's type of a C-contiguous device array of ``dtype`` and rank ``ndim`` (public
    API: argument types for ``dispatcher.compile``)."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    return types.Array(numpy_support.from_dtype(np.dtype(dtype)), ndim, "C")


def _cufunc(dispatcher, argtypes):
    """The driver function of ``dispatcher`` compiled for ``argtypes``."""
    try:
        kern = dispatcher.compile(tuple(argtypes))
        return kern._codelibrary.get_cufunc()
    except (AttributeError, ImportError) as exc:
        raise InternalsMissing(f"compiling a kernel for raw launches failed: {exc!r}") from exc


def raise_shared_limit(dispatcher, argtypes, nbytes: int) -> None:
    """Opt ``dispatcher``'s kernel for ``argtypes`` in to ``nbytes`` of dynamic shared memory
    (needed above :data:`STATIC_SHARED_BYTES`; a no-op below it and on the simulator).
    Raises :class:`InternalsMissing` where the attribute cannot be set."""
    if config.ENABLE_CUDASIM or nbytes <= STATIC_SHARED_BYTES:
        return
    _set_max_dynamic_shared(_cufunc(dispatcher, argtypes), nbytes)


def _set_max_dynamic_shared(cufunc, nbytes: int) -> None:
    attr = _internal("max dynamic shared attribute")
    set_attribute = _internal("driver kernel attribute")
    try:
        set_attribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)
    except AttributeError as exc:
        raise InternalsMissing(f"setting the shared memory limit failed: {exc!r}") from exc


def memset0(ptr: int, nbytes: int) -> None:
    """Zero ``nbytes`` at device address ``ptr`` (ordered on the default stream,
    asynchronous to the host)."""
    _internal("driver memset")(ptr, 0, nbytes)


def device_ptr(arr) -> int:
    """The data pointer of a Numba device array (public: its array interface)."""
    return int(arr.__cuda_array_interface__["data"][0])


def _array_params(ptr: int, shape: tuple, itemsize: int) -> list:
    """The kernel parameters of a C-contiguous array, as Numba's dispatcher passes them."""
    size = 1
    for n in shape:
        size *= n
    strides = []
    acc = itemsize
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return [0, 0, size, itemsize, int(ptr), *shape, *reversed(strides)]


#: ctypes of the scalar kernel arguments, by Numba type name
_SCALARS = {"int64": ctypes.c_int64, "float64": ctypes.c_double, "float32": ctypes.c_float,
            "bool": bool}

_configs: dict = {}


class Array:
    """A C-contiguous array argument of a :class:`RawKernel`: dtype and fixed shape."""

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype, shape):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)


def argtypes(args) -> tuple:
    """Numba argument types of kernel arguments given as :class:`Array` or Numba scalar
    types (what :class:`RawKernel` takes)."""
    return tuple(array_type(a.dtype, len(a.shape)) if isinstance(a, Array) else a
                 for a in args)


class RawKernel:
    """A kernel compiled once for fixed argument types and shapes, launched from plain
    integers: :meth:`launch` takes, per argument, a device pointer (for an :class:`Array`)
    or a Python scalar, and builds Numba's parameter list by hand.

    Args:
        dispatcher: a ``numba.cuda.jit`` kernel.
        args: one entry per kernel argument: an :class:`Array`, or a Numba scalar type
            (``types.int64``, ``types.float64``, ``types.float32``, ``types.boolean``).
        shared: dynamic shared memory per block (bytes); above 48 KB the kernel is opted in.

    Raises :class:`InternalsMissing` where an internal is missing.
    """

    def __init__(self, dispatcher, args, shared: int = 0):
        if not available():
            raise InternalsMissing(disabled_reason() or f"missing: {', '.join(missing())}")
        self._conv = [(a.shape, a.dtype.itemsize) if isinstance(a, Array) else _SCALARS[str(a)]
                      for a in args]
        self._last = [None] * len(self._conv)
        self._func = _cufunc(dispatcher, argtypes(args))
        self.shared = int(shared)
        if self.shared > STATIC_SHARED_BYTES:
            _set_max_dynamic_shared(self._func, self.shared)
        self._stream = _internal("default stream as cuda.core")(0)
        self._launch = _internal("cuda.core launch")
        self._config = _internal("cuda.core launch config")

    def params(self, values) -> list:
        """The raw parameter list of one call (``values``: one per argument). An array's
        parameters are rebuilt only when its pointer changes (most are fixed per shape)."""
        out = []
        last = self._last
        for i, (conv, x) in enumerate(zip(self._conv, values)):
            if type(conv) is tuple:
                hit = last[i]
                if hit is None or hit[0] != x:
                    hit = last[i] = (x, _array_params(x, conv[0], conv[1]))
                out += hit[1]
            else:
                out.append(conv(x))
        return out

    def launch(self, grid, block, *values) -> None:
        """Launch on the legacy default stream (as Numba's dispatcher does); asynchronous."""
        key = (grid, block, self.shared)
        cfg = _configs.get(key)
        if cfg is None:
            if len(_configs) > 256:
                _configs.clear()
            cfg = _configs[key] = self._config(grid=grid, block=block, shmem_size=self.shared)
        self._launch(self._stream, cfg, self._func.kernel, *self.params(values))


def ptx(dispatcher, argtypes, cc=(9, 0)) -> str:
    """The PTX of ``dispatcher``'s kernel for ``argtypes`` and compute capability ``cc``,
    on any machine: with no GPU, Numba's question for the current device's compute
    capability (asked when it compiles the device functions a kernel calls) is answered
    with ``cc`` while this runs. Call it in a process of its own (the register report
    does): device functions compiled here stay cached for ``cc``."""
    from numba import cuda

    import numba.cuda.dispatcher as dispatcher_module

    if config.ENABLE_CUDASIM:
        raise RuntimeError("PTX needs Numba's CUDA target: unset NUMBA_ENABLE_CUDASIM")

    class _Device:
        compute_capability = tuple(cc)

    saved = dispatcher_module.get_current_device
    if not cuda.is_available():
        dispatcher_module.get_current_device = _Device
    try:
        text, _ = cuda.compile_ptx(dispatcher.py_func, tuple(argtypes), cc=tuple(cc))
    finally:
        dispatcher_module.get_current_device = saved
    return text


def max_registers(dispatcher) -> int | None:
    """The ``max_registers`` a kernel was declared with (``None``: no cap)."""
    return dispatcher.targetoptions.get("max_registers")
