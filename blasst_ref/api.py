"""``attention()``: validation, layout, backend dispatch and skip statistics (docs/DESIGN.md §3).

This is the only module that knows about every backend; the backends (``reference``,
``cpu``, ``cuda``) know nothing about it. Each backend takes validated 4-D arrays and returns
``(out, tile_map)``, where ``tile_map`` holds one int8 code per tile
(``reference.NOT_VISITED`` / ``COMPUTED`` / ``SKIPPED``); the statistics are computed here,
the same way for every backend.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import reference, rule, tiling

BACKENDS = ("auto", "reference", "cpu", "cuda")
_HOST_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: ``"bhld"``: ``(B, H, L, D)``, PyTorch SDPA's layout (the default); ``"blhd"``:
#: ``(B, L, H, D)``, FlashAttention's functions' layout.
LAYOUTS = ("bhld", "blhd")


@dataclass(frozen=True)
class AttentionStats:
    """Skip statistics of one :func:`attention` call.

    Attributes:
        sparsity: ``skipped_tiles / visited_tiles`` (0.0 when no tile was visited).
        skipped_tiles: tiles skipped by the threshold test.
        visited_tiles: tiles visited (tiles masked entirely by causality are not counted).
            In decode a tile spans a whole kv group, so tiles are counted per group.
        per_head: float64 ``(B, Hq)`` sparsity of each query head; in decode the group's
            sparsity, repeated for each query head of the group (the group decides together).
        block_q: rows of a prefill tile; in decode the rows of a tile are
            ``(Hq // Hkv) * Lq`` and this is that number.
        block_k: keys per tile.
        backend: the backend that ran (``"reference"``, ``"cpu"`` or ``"cuda"``).
        phase: ``"prefill"``, or ``"decode"`` for the split-KV path (``Lq <= 16``).
        tile_map: int8 decisions, ``0`` not visited, ``1`` computed, ``2`` skipped; prefill
            ``(B, Hq, n_q_tiles, n_k_tiles)``, decode ``(B, Hkv, 1, n_k_tiles)``.
        kernel: what ran: the CUDA kernel version (``"prefill_v3"``: tensor cores,
            ``"prefill_v2"``, ``"decode_v3"``, ... — :mod:`blasst_ref.cuda.launch`), or the
            host backend's name (``"cpu"``, ``"reference"``).
    """

    sparsity: float
    skipped_tiles: int
    visited_tiles: int
    per_head: np.ndarray = field(repr=False)
    block_q: int
    block_k: int
    backend: str
    phase: str
    tile_map: np.ndarray = field(repr=False)
    kernel: str = ""


def threshold_for(context_len: int, scale_factor: float) -> float:
    """BLASST's threshold for a context length: ``scale_factor / context_len`` (docs/DESIGN.md §5).

    The calibrated law ``thresh * L = scale_factor`` keeps sparsity roughly constant across
    lengths. Raises ``ValueError`` if the result is not in ``[0, 1)``."""
    if not isinstance(context_len, numbers.Integral) or context_len <= 0:
        raise ValueError(f"context_len must be a positive integer, got {context_len!r}")
    if not isinstance(scale_factor, numbers.Real) or not math.isfinite(scale_factor) or scale_factor < 0:
        raise ValueError(f"scale_factor must be a finite number >= 0, got {scale_factor!r}")
    thresh = float(scale_factor) / int(context_len)
    if thresh >= 1.0:
        raise ValueError(
            f"scale_factor / context_len = {thresh:g} is not a threshold in [0, 1); "
            f"scale_factor must be < context_len ({context_len})"
        )
    return thresh


# ---------------------------------------------------------------------------------------
# validation


def _is_simulated_device_array(x) -> bool:
    # Numba's CUDA simulator (CI has no GPU) fakes device arrays without the interface.
    return type(x).__name__ == "FakeCUDAArray"


def _is_device_array(x) -> bool:
    if type(x).__module__.startswith("torch") and hasattr(x, "is_cuda"):
        return bool(x.is_cuda)  # (torch builds __cuda_array_interface__ on every access)
    return hasattr(x, "__cuda_array_interface__") or _is_simulated_device_array(x)


def _check_arrays(q, k, v):
    """Returns (arrays as given, on_device). Raises TypeError for non-arrays / mixed kinds."""
    kinds = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _is_device_array(x):
            kinds.append("device")
        elif isinstance(x, np.ndarray):
            kinds.append("host")
        else:
            raise TypeError(
                f"{name} must be a numpy array or a CUDA array (an object with "
                f"__cuda_array_interface__), got {type(x).__name__}"
            )
    if len(set(kinds)) > 1:
        desc = ", ".join(f"{n} on {kd}" for n, kd in zip("qkv", kinds))
        raise TypeError(f"q, k and v must all be host (numpy) arrays or all CUDA arrays; got {desc}")
    return kinds[0] == "device"


@dataclass(frozen=True)
class _DeviceDtype:
    """A device dtype numpy has no name for (torch's ``bfloat16``)."""

    name: str

    def __str__(self) -> str:
        return self.name


def _shape_and_dtype(name, x):
    if isinstance(x, np.ndarray) or _is_simulated_device_array(x):
        return tuple(x.shape), np.dtype(x.dtype)
    if type(x).__module__.startswith("torch") and hasattr(x, "data_ptr"):
        # read torch's shape and dtype directly: its __cuda_array_interface__ is built in
        # Python on every access, and raises for bfloat16
        tname = str(x.dtype).rsplit(".", 1)[-1]
        try:
            dt = np.dtype(tname)
        except TypeError:
            dt = _DeviceDtype(tname)
        return tuple(x.shape), dt
    try:
        iface = x.__cuda_array_interface__
    except (TypeError, AttributeError, RuntimeError) as exc:  # e.g. torch bfloat16
        raise TypeError(
            f"{name}: its CUDA array interface cannot be read ({exc}); the CUDA backend "
            f"takes float16 or float32 arrays"
        ) from exc
    return tuple(iface["shape"]), np.dtype(iface["typestr"])


def _dims(layout: str, rank: int, h: str, l: str, d: str) -> str:
    """``"(B, Hq, Lq, Dqk)"`` in the order of ``layout`` (without ``B`` for ``rank`` 3)."""
    dims = (h, l) if layout == "bhld" else (l, h)
    return "(" + ", ".join((("B",) if rank == 4 else ()) + dims + (d,)) + ")"


def _as_bhld(shape: tuple, layout: str) -> tuple:
    """A shape of ``layout`` in the ``(B, H, L, D)`` order."""
    if layout == "bhld":
        return tuple(shape)
    return (*shape[:-3], shape[-2], shape[-3], shape[-1])


def _check_shapes(qs, ks, vs, layout) -> int:
    """Check the shapes of q, k and v (in ``layout``) against each other; returns ``Lk``.
    Every message ends with the layout the shapes were read in."""
    rank = len(qs) if len(qs) in (3, 4) else 4
    where = (f" [layout={layout!r}: q {_dims(layout, rank, 'Hq', 'Lq', 'Dqk')}, "
             f"k {_dims(layout, rank, 'Hkv', 'Lk', 'Dqk')}, "
             f"v {_dims(layout, rank, 'Hkv', 'Lk', 'Dv')}]")

    def bad(msg):
        return ValueError(msg + where)

    if len(qs) not in (3, 4):
        raise bad(f"q must be 4-D {_dims(layout, 4, 'Hq', 'Lq', 'Dqk')} or 3-D "
                  f"{_dims(layout, 3, 'Hq', 'Lq', 'Dqk')}, got shape {qs}")
    for name, s in (("k", ks), ("v", vs)):
        if len(s) != len(qs):
            raise bad(f"{name} must have the same rank as q ({len(qs)}-D), got shape {s}; "
                      f"expected {_dims(layout, len(qs), 'Hkv', 'Lk', 'D')}")
    q4, k4, v4 = ((1, *s) if len(s) == 3 else tuple(s)
                  for s in (_as_bhld(x, layout) for x in (qs, ks, vs)))
    b, hq, lq, dqk = q4
    if k4[0] != b or v4[0] != b:
        raise bad(f"batch sizes differ: q {b}, k {k4[0]}, v {v4[0]}")
    if k4[1] != v4[1]:
        raise bad(f"k and v must have the same number of kv heads, got k {k4[1]}, v {v4[1]}")
    hkv = k4[1]
    if hkv == 0 or hq % hkv != 0:
        raise bad(
            f"the number of query heads Hq={hq} must be a multiple of the number of kv heads "
            f"Hkv={hkv} (MHA: Hkv == Hq, GQA: Hq % Hkv == 0, MQA: Hkv == 1)"
        )
    if k4[2] != v4[2]:
        raise bad(f"k and v must have the same length Lk, got k {k4[2]}, v {v4[2]}")
    if k4[3] != dqk:
        raise bad(f"q and k must have the same head dim Dqk, got q {dqk}, k {k4[3]}")
    for name, n in (("batch B", b), ("query heads Hq", hq), ("query length Lq", lq),
                    ("key length Lk", k4[2]), ("head dim Dqk", dqk), ("value dim Dv", v4[3])):
        if n == 0:
            raise bad(f"{name} is 0: q {qs}, k {ks}, v {vs}; every dimension must be >= 1")
    return k4[2]


def _real(name: str, x, expected: str) -> float:
    """``x`` as a float, or a TypeError (not a real number) / ValueError (beyond float)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {x!r}")
    try:
        return float(x)
    except OverflowError:  # a Python int beyond float64
        text = repr(x)
        text = text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
        raise ValueError(f"{name} must be {expected}, got {text}") from None


def _tile_size(name: str, blk) -> int | None:
    """A tile size as a Python int: any integer type (numpy's too), >= 1; or None."""
    if blk is None:
        return None
    if isinstance(blk, (bool, np.bool_)) or not isinstance(blk, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer or None, got {blk!r}")
    if blk <= 0:
        raise ValueError(f"{name} must be >= 1, got {blk}")
    return int(blk)


def _check_scale(scale, dtype_name: str) -> float | None:
    """``scale`` as a float that the compute dtype holds as a finite positive number."""
    if scale is None:
        return None
    s = _real("scale", scale, "a positive real number or None")
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    if dtype_name != "float64":  # float16/bfloat16 inputs are computed in float32
        with np.errstate(over="ignore", under="ignore"):
            s32 = np.float32(s)
        if not (np.isfinite(s32) and s32 > 0):
            raise ValueError(
                f"scale={scale!r} is not a finite positive float32, the dtype {dtype_name} "
                f"inputs are computed in (about 1.2e-38 to 3.4e38); use float64 inputs for "
                f"such a scale, or fold part of it into q"
            )
    return s


def _validate(q, k, v, thresh, causal, scale, backend, block_q, block_k, layout="bhld",
              decode_seed="sink"):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    on_device = _check_arrays(q, k, v)
    (qs, qd), (ks, kd), (vs, vd) = (
        _shape_and_dtype(name, x) for name, x in (("q", q), ("k", k), ("v", v))
    )

    lk = _check_shapes(qs, ks, vs, layout)
    qs, ks, vs = (_as_bhld(x, layout) for x in (qs, ks, vs))
    q4 = (1, *qs) if len(qs) == 3 else tuple(qs)
    b, hq, lq, dqk = q4
    hkv = ks[-3]

    allowed = ("float16", "float32") if on_device else ("float16", "float32", "float64")
    for name, d in (("q", qd), ("k", kd), ("v", vd)):
        if d.name not in allowed and not (on_device and d.name == "bfloat16"):
            extra = ", or bfloat16 (torch)" if on_device else ""
            raise TypeError(f"{name} has unsupported dtype {d}; expected one of "
                            f"{', '.join(allowed)}{extra}")
    # one dtype, whatever the byte order ('>f8' and '<f8' are both float64)
    if not (qd.name == kd.name == vd.name):
        raise TypeError(f"q, k and v must share one dtype, got q {qd}, k {kd}, v {vd}")
    if on_device and any(getattr(d, "byteorder", "=") == ">" for d in (qd, kd, vd)):
        raise TypeError(f"CUDA arrays must be in the GPU's (little-endian) byte order, got "
                        f"q {qd.str}, k {kd.str}, v {vd.str}")

    if not (0.0 <= _real("thresh", thresh, "a real number in [0, 1)") < 1.0):  # and NaN
        raise ValueError(f"thresh must be in [0, 1), got {thresh!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    _check_scale(scale, qd.name)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        _tile_size(name, blk)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if on_device and backend in ("reference", "cpu"):
        raise TypeError(
            f"backend={backend!r} runs on the host, but q, k, v are CUDA arrays; use "
            f"backend='cuda' (or 'auto'), or copy them to numpy first"
        )
    if not on_device and backend == "cuda":
        raise TypeError(
            "backend='cuda' needs CUDA arrays (CuPy, PyTorch CUDA tensors, Numba device "
            "arrays); got numpy arrays. Move them to the GPU, or use backend='cpu'"
        )
    rule.decode_seeded(decode_seed)  # a ValueError naming the allowed values
    return on_device, (b, hq, lq, dqk), hkv, lk


def validate_arguments(q, k, v, thresh=0.0, causal=False, scale=None, backend="auto",
                       block_q=None, block_k=None, decode_seed="sink"):
    """The argument checks of :func:`attention`, for the functions built on it
    (:func:`blasst_ref.attention_forward`). Raises as :func:`attention` does; returns
    ``(on_device, (B, Hq, Lq, Dqk), Hkv, Lk)``."""
    return _validate(q, k, v, thresh, causal, scale, backend, block_q, block_k,
                     decode_seed=decode_seed)


# ---------------------------------------------------------------------------------------
# statistics


def stats_of_tile_map(tile_map, backend, decode, group, lq, block_q, block_k,
                      kernel) -> AttentionStats:
    """The :class:`AttentionStats` of a call from its tile map (``(B, H, n_q_tiles,
    n_k_tiles)`` codes; ``H`` is ``Hkv`` in decode, where ``group = Hq / Hkv`` query heads
    decide together and a tile row is ``group * lq`` query rows). Used by :func:`attention`
    and by the callers that run the backends another way (the differentiable torch call)."""
    visited = tile_map != reference.NOT_VISITED
    skipped = tile_map == reference.SKIPPED
    n_visited, n_skipped = int(visited.sum()), int(skipped.sum())
    v_h = visited.sum(axis=(2, 3))
    s_h = skipped.sum(axis=(2, 3))
    per_head = np.divide(s_h, v_h, out=np.zeros(v_h.shape), where=v_h > 0)
    if decode:
        per_head = np.repeat(per_head, group, axis=1)  # (B, Hkv) -> (B, Hq)
    return AttentionStats(
        sparsity=n_skipped / n_visited if n_visited else 0.0,
        skipped_tiles=n_skipped,
        visited_tiles=n_visited,
        per_head=per_head,
        block_q=group * lq if decode else block_q,
        block_k=block_k,
        backend=backend,
        phase="decode" if decode else "prefill",
        tile_map=tile_map,
        kernel=kernel,
    )


# ---------------------------------------------------------------------------------------
# the public entry point


def _kernel_tiles(lq: int, lk: int, block_q: int, block_k: int) -> tuple[int, int]:
    """The tile sizes the backends get: a tile longer than ``max(length, default size)`` is
    cut to that. It is one tile either way (the same decisions, the same tile map), but the
    kernels size their buffers and index with it: ``block_q = 2**62`` must not overflow an
    index, nor ``block_k = 10**9`` allocate a billion columns."""
    return (min(block_q, max(lq, tiling.DEFAULT_BLOCK_Q)),
            min(block_k, max(lk, tiling.DEFAULT_BLOCK_K, tiling.DEFAULT_DECODE_BLOCK_K)))


def _device_swap_lh(name, x):
    """A C-contiguous copy of the CUDA array ``x`` with its L and H axes swapped, made on the
    GPU by the caller's library (torch or CuPy)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.transpose(-3, -2).contiguous()
    if mod.startswith("cupy"):
        import cupy

        return cupy.ascontiguousarray(cupy.swapaxes(x, -3, -2))
    raise TypeError(
        f"layout='blhd' on the CUDA backend needs torch tensors or CuPy arrays, whose library "
        f"makes the transposed copy; {name} is a {type(x).__name__}: pass it in layout 'bhld'"
    )


def _run_host(backend, q, k, v, thresh, causal, scale, block_q, block_k, decode_seed="sink"):
    """Runs a host backend on 4-D arrays. float16 is computed in float32 and cast back; any
    byte order is read, and the output is in the machine's own."""
    out_dtype = q.dtype.newbyteorder("=")
    compute = np.float64 if out_dtype == np.float64 else np.float32
    q, k, v = (np.ascontiguousarray(x, dtype=compute) for x in (q, k, v))
    if backend == "reference":
        res = reference.blasst_attention_reference(
            q, k, v, thresh, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
            decode_seed=decode_seed,
        )
        out, tile_map = res.out, res.tile_map
    else:
        from . import cpu  # imported lazily: numba JIT machinery only when asked for

        out, tile_map = cpu.blasst_attention(q, k, v, thresh, causal, scale, block_q, block_k,
                                             decode_seed=decode_seed)
    return out.astype(out_dtype, copy=False), tile_map


def _is_torch_host_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda") and not x.is_cuda


def _accepts_torch_host_tensors(fn):
    """Lets ``fn(q, k, v, ...)`` take torch CPU tensors: numpy views in (no copy), a torch
    tensor out; every other argument passes through unchanged.

    numpy has no bfloat16: bfloat16 tensors are computed in float32 (a converted copy) and the
    output is converted back. Tensors that require grad are read through ``detach()``; the
    caller (``blasst_ref.torch``) decides whether that is allowed."""

    @functools.wraps(fn)
    def wrapper(q, k, v, *args, **kwargs):
        if not any(_is_torch_host_tensor(x) for x in (q, k, v)):
            return fn(q, k, v, *args, **kwargs)
        import torch

        if not all(_is_torch_host_tensor(x) for x in (q, k, v)):
            kinds = ", ".join(f"{n} {type(x).__module__}.{type(x).__name__}"
                              for n, x in zip("qkv", (q, k, v)))
            raise TypeError(f"q, k and v must all be torch CPU tensors or all numpy arrays; "
                            f"got {kinds}")
        views = [(x.detach().float() if x.dtype == torch.bfloat16 else x.detach()).numpy()
                 for x in (q, k, v)]
        res = fn(*views, *args, **kwargs)
        if isinstance(res, tuple):  # (out, stats)
            return (torch.from_numpy(res[0]).to(q.dtype), *res[1:])
        return torch.from_numpy(res).to(q.dtype)

    return wrapper


@_accepts_torch_host_tensors
def attention(
    q, k, v, thresh: float = 0.0, *, causal: bool = False, scale: float | None = None,
    backend: str = "auto", block_q: int | None = None, block_k: int | None = None,
    return_stats: bool = False, layout: str = "bhld", decode_seed: str = "sink",
):
    """BLASST attention: FlashAttention that skips negligible key tiles (docs/DESIGN.md §3).

    Args:
        q: ``(B, Hq, Lq, Dqk)`` queries (or 3-D ``(Hq, Lq, Dqk)``, taken as ``B = 1``).
        k: ``(B, Hkv, Lk, Dqk)`` keys, ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        v: ``(B, Hkv, Lk, Dv)`` values; ``Dv != Dqk`` is allowed (MLA).
            The shapes above are those of ``layout="bhld"``; see ``layout``.
        thresh: BLASST's lambda, a probability in ``[0, 1)``. A tile is skipped when for every
            row ``exp(tile_max - running_max) < thresh``. ``0`` is exact dense attention.
            See :func:`threshold_for` for the calibrated ``scale_factor / context_len``.
        causal: bottom-right aligned causal mask (row ``i`` sees keys ``j <= i + Lk - Lq``).
        scale: score scale, default ``1 / sqrt(Dqk)``.
        backend: ``"reference"`` (numpy), ``"cpu"`` (Numba parallel), ``"cuda"`` (Numba
            CUDA) or ``"auto"`` (CUDA for CUDA arrays, else CPU).
        block_q, block_k: tile sizes (defaults in :mod:`blasst_ref.tiling`), any integer
            type, >= 1. Queries with ``Lq <= 16`` take the split-KV decode path, where a
            tile's rows are the query rows of one kv group and ``block_q`` is not used. A
            tile longer than what it tiles is one tile of that length (the stats report the
            size asked for).
        return_stats: a bool; also return an :class:`AttentionStats`.
        layout: the order of the axes of ``q``, ``k``, ``v`` and the output.
            ``"bhld"`` (default, PyTorch SDPA's): ``(B, H, L, D)``, as above. ``"blhd"``
            (FlashAttention's ``flash_attn_func``): ``(B, L, H, D)`` -- ``q (B, Lq, Hq,
            Dqk)``, ``k (B, Lk, Hkv, Dqk)``, ``v (B, Lk, Hkv, Dv)``, output ``(B, Lq, Hq,
            Dv)``, C-contiguous (3-D: ``(L, H, D)``). The kernels work in ``"bhld"``: on the
            host, ``"blhd"`` inputs are read through transposed views and the output is
            copied once into ``"blhd"``; on the CUDA backend, whose kernels read the
            caller's memory in place and need C-contiguous arrays, ``"blhd"`` makes
            transposed copies of q, k, v and the output on the GPU with the caller's
            library (torch or CuPy; Numba device arrays are refused: give them in
            ``"bhld"``). Shape errors name the layout they read the shapes in.
        decode_seed: the split-KV skip test of decode (``Lq <= 16``, docs/DESIGN.md §3.5).
            ``"sink"`` (default): every chunk of keys tests its tiles against
            ``max(m_r, s0_r)``, ``s0_r`` the row's max scaled score over key tile 0 (the
            attention-sink tile), so that a chunk far from the sinks skips as much as the
            threshold allows; ``"none"``: each chunk against its own running max ``m_r``
            only (more tiles kept, the threshold-vs-length law of calibration broken at
            long contexts; for comparison). The error bound is the same for both. Prefill
            accepts either and ignores it (its rows visit tile 0 first).

    Returns:
        ``out`` of shape ``(B, Hq, Lq, Dv)`` (3-D for 3-D inputs; ``(B, Lq, Hq, Dv)`` in
        ``"blhd"``), same dtype and kind of array as ``q`` (numpy outputs in the machine's
        byte order); or ``(out, stats)``. Accumulation is float32 (float64 for float64).
        torch CPU tensors are read as numpy views (no copy) and give a torch tensor;
        bfloat16 ones are computed in float32 (:mod:`blasst_ref.torch` has SDPA's names).

    Raises:
        TypeError / ValueError: naming the argument and what was expected; also for a
            ``scale`` that the compute dtype (float32 for float16/float32 inputs) cannot
            hold as a finite positive number.

    Thread safety: calls from several threads at once are safe (see the README's "Thread
    safety"); while any ``backend="cpu"`` call runs, BLAS is limited to one thread
    process-wide, and the previous limit comes back when the last one returns.

    NaN/inf values never crash or hang a kernel. NaN/inf in ``q`` or ``k`` propagate as in
    :func:`dense_attention` at every threshold (a NaN score never lets its tile be skipped).
    A NaN/inf in ``v`` reaches the rows that see its key, and, as in FlashAttention, also
    the rows of a computed tile that holds it under the causal mask (``0 * NaN``); rows whose
    tile over it was skipped or never visited stay clean.
    """
    if not isinstance(return_stats, (bool, np.bool_)):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    on_device, (b, hq, lq, dqk), hkv, lk = _validate(
        q, k, v, thresh, causal, scale, backend, block_q, block_k, layout, decode_seed
    )
    if backend == "auto":
        backend = "cuda" if on_device else "cpu"
    thresh = float(thresh)
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    block_q, block_k = tiling.default_blocks(
        lq, _tile_size("block_q", block_q), _tile_size("block_k", block_k))
    run_q, run_k = _kernel_tiles(lq, lk, block_q, block_k)
    decode = tiling.is_decode(lq)
    blhd = layout == "blhd"

    if backend == "cuda":
        try:
            from . import cuda as cuda_backend
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "backend='cuda' needs numba-cuda and a CUDA GPU: pip install 'blasst_ref[cuda]'"
                f" ({exc})"
            ) from exc
        if blhd:
            q, k, v = (_device_swap_lh(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
        out, tile_map, kernel = cuda_backend.attention(
            q, k, v, thresh, bool(causal), scale, run_q, run_k, decode_seed=decode_seed
        )
        if blhd:
            out = _device_swap_lh("out", out)
    else:
        three_d = q.ndim == 3
        q4, k4, v4 = (x[None] if three_d else x for x in (q, k, v))
        if blhd:
            q4, k4, v4 = (np.swapaxes(x, 1, 2) for x in (q4, k4, v4))
        out, tile_map = _run_host(backend, q4, k4, v4, thresh, bool(causal), scale, run_q, run_k,
                                  decode_seed)
        kernel = backend
        if blhd:
            out = np.ascontiguousarray(np.swapaxes(out, 1, 2))
        if three_d:
            out = out[0]
    if not return_stats:
        return out
    # A GPU backend leaves its tile map on the device: it crosses to the host only here.
    tile_map = tile_map.copy_to_host() if hasattr(tile_map, "copy_to_host") else np.asarray(tile_map)
    return out, stats_of_tile_map(tile_map, backend, decode, hq // hkv, lq, block_q, block_k,
                                  kernel)
