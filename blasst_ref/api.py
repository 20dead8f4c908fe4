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

from . import reference, tiling

BACKENDS = ("auto", "reference", "cpu", "cuda")
_HOST_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


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


def _validate(q, k, v, thresh, causal, scale, backend, block_q, block_k):
    on_device = _check_arrays(q, k, v)
    (qs, qd), (ks, kd), (vs, vd) = (
        _shape_and_dtype(name, x) for name, x in (("q", q), ("k", k), ("v", v))
    )

    if len(qs) not in (3, 4):
        raise ValueError(f"q must be 4-D (B, Hq, Lq, Dqk) or 3-D (Hq, Lq, Dqk), got shape {qs}")
    for name, s in (("k", ks), ("v", vs)):
        if len(s) != len(qs):
            raise ValueError(
                f"{name} must have the same rank as q ({len(qs)}-D), got shape {s}; expected "
                + ("(B, Hkv, Lk, D)" if len(qs) == 4 else "(Hkv, Lk, D)")
            )
    q4, k4, v4 = ((1, *s) if len(s) == 3 else tuple(s) for s in (qs, ks, vs))
    b, hq, lq, dqk = q4
    if k4[0] != b or v4[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k4[0]}, v {v4[0]}")
    if k4[1] != v4[1]:
        raise ValueError(f"k and v must have the same number of kv heads, got k {k4[1]}, v {v4[1]}")
    hkv = k4[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads Hq={hq} must be a multiple of the number of kv heads "
            f"Hkv={hkv} (MHA: Hkv == Hq, GQA: Hq % Hkv == 0, MQA: Hkv == 1)"
        )
    if k4[2] != v4[2]:
        raise ValueError(f"k and v must have the same length Lk, got k {k4[2]}, v {v4[2]}")
    if k4[3] != dqk:
        raise ValueError(f"q and k must have the same head dim Dqk, got q {dqk}, k {k4[3]}")
    for name, n in (("batch B", b), ("query heads Hq", hq), ("query length Lq", lq),
                    ("key length Lk", k4[2]), ("head dim Dqk", dqk), ("value dim Dv", v4[3])):
        if n == 0:
            raise ValueError(f"{name} is 0: q {qs}, k {ks}, v {vs}; every dimension must be >= 1")

    allowed = ("float16", "float32") if on_device else ("float16", "float32", "float64")
    for name, d in (("q", qd), ("k", kd), ("v", vd)):
        if d.name not in allowed and not (on_device and d.name == "bfloat16"):
            extra = ", or bfloat16 (torch)" if on_device else ""
            raise TypeError(f"{name} has unsupported dtype {d}; expected one of "
                            f"{', '.join(allowed)}{extra}")
    if not (str(qd) == str(kd) == str(vd)):
        raise TypeError(f"q, k and v must share one dtype, got q {qd}, k {kd}, v {vd}")

    if isinstance(thresh, bool) or not isinstance(thresh, numbers.Real):
        raise TypeError(f"thresh must be a real number in [0, 1), got {thresh!r}")
    if not (0.0 <= float(thresh) < 1.0):  # also rejects NaN
        raise ValueError(f"thresh must be in [0, 1), got {thresh!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a positive real number or None, got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk is None:
            continue
        if isinstance(blk, bool) or not isinstance(blk, numbers.Integral):
            raise TypeError(f"{name} must be a positive integer or None, got {blk!r}")
        if blk <= 0:
            raise ValueError(f"{name} must be >= 1, got {blk}")
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
    return on_device, (b, hq, lq, dqk), hkv, k4[2]


# ---------------------------------------------------------------------------------------
# statistics


def _stats(tile_map, backend, decode, group, lq, block_q, block_k) -> AttentionStats:
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
    )


# ---------------------------------------------------------------------------------------
# the public entry point


def _run_host(backend, q, k, v, thresh, causal, scale, block_q, block_k):
    """Runs a host backend on 4-D arrays. float16 is computed in float32 and cast back."""
    out_dtype = q.dtype
    compute = np.float64 if q.dtype == np.float64 else np.float32
    q, k, v = (np.ascontiguousarray(x, dtype=compute) for x in (q, k, v))
    if backend == "reference":
        res = reference.blasst_attention_reference(
            q, k, v, thresh, causal=causal, scale=scale, block_q=block_q, block_k=block_k
        )
        out, tile_map = res.out, res.tile_map
    else:
        from . import cpu  # imported lazily: numba JIT machinery only when asked for

        out, tile_map = cpu.blasst_attention(q, k, v, thresh, causal, scale, block_q, block_k)
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
    return_stats: bool = False,
):
    """BLASST attention: FlashAttention that skips negligible key tiles (docs/DESIGN.md §3).

    Args:
        q: ``(B, Hq, Lq, Dqk)`` queries (or 3-D ``(Hq, Lq, Dqk)``, taken as ``B = 1``).
        k: ``(B, Hkv, Lk, Dqk)`` keys, ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        v: ``(B, Hkv, Lk, Dv)`` values; ``Dv != Dqk`` is allowed (MLA).
        thresh: BLASST's lambda, a probability in ``[0, 1)``. A tile is skipped when for every
            row ``exp(tile_max - running_max) < thresh``. ``0`` is exact dense attention.
            See :func:`threshold_for` for the calibrated ``scale_factor / context_len``.
        causal: bottom-right aligned causal mask (row ``i`` sees keys ``j <= i + Lk - Lq``).
        scale: score scale, default ``1 / sqrt(Dqk)``.
        backend: ``"reference"`` (numpy), ``"cpu"`` (Numba parallel), ``"cuda"`` (Numba
            CUDA) or ``"auto"`` (CUDA for CUDA arrays, else CPU).
        block_q, block_k: tile sizes (defaults in :mod:`blasst_ref.tiling`). Queries with
            ``Lq <= 16`` take the split-KV decode path, where a tile's rows are the query rows
            of one kv group and ``block_q`` is not used.
        return_stats: also return an :class:`AttentionStats`.

    Returns:
        ``out`` of shape ``(B, Hq, Lq, Dv)`` (3-D for 3-D inputs), same dtype and kind of
        array as ``q``; or ``(out, stats)``. Accumulation is float32 (float64 for float64).
        torch CPU tensors are read as numpy views (no copy) and give a torch tensor;
        bfloat16 ones are computed in float32 (:mod:`blasst_ref.torch` has SDPA's names).

    Raises:
        TypeError / ValueError: naming the argument and what was expected.

    NaN/inf values never crash or hang a kernel. NaN/inf in ``q`` or ``k`` propagate as in
    :func:`dense_attention` at every threshold (a NaN score never lets its tile be skipped).
    A NaN/inf in ``v`` reaches the rows that see its key, and, as in FlashAttention, also
    the rows of a computed tile that holds it under the causal mask (``0 * NaN``); rows whose
    tile over it was skipped or never visited stay clean.
    """
    on_device, (b, hq, lq, dqk), hkv, lk = _validate(
        q, k, v, thresh, causal, scale, backend, block_q, block_k
    )
    if backend == "auto":
        backend = "cuda" if on_device else "cpu"
    thresh = float(thresh)
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    block_q, block_k = tiling.default_blocks(lq, block_q, block_k)
    decode = tiling.is_decode(lq)

    if backend == "cuda":
        try:
            from . import cuda as cuda_backend
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "backend='cuda' needs numba-cuda and a CUDA GPU: pip install 'blasst_ref[cuda]'"
                f" ({exc})"
            ) from exc
        out, tile_map = cuda_backend.attention(
            q, k, v, thresh, bool(causal), scale, block_q, block_k
        )
    else:
        three_d = q.ndim == 3
        q4, k4, v4 = (x[None] if three_d else x for x in (q, k, v))
        out, tile_map = _run_host(backend, q4, k4, v4, thresh, bool(causal), scale, block_q, block_k)
        if three_d:
            out = out[0]
    if not return_stats:
        return out
    # A GPU backend leaves its tile map on the device: it crosses to the host only here.
    tile_map = tile_map.copy_to_host() if hasattr(tile_map, "copy_to_host") else np.asarray(tile_map)
    return out, _stats(tile_map, backend, decode, hq // hkv, lq, block_q, block_k)
