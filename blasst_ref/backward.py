"""Gradients of BLASST attention (docs/DESIGN.md §11): a forward that saves, a backward that uses.

::

    out, saved = blasst_ref.attention_forward(q, k, v, thresh, causal=True)
    dq, dk, dv = blasst_ref.attention_backward(dout, q, k, v, out, saved)

:func:`attention_forward` is :func:`blasst_ref.attention` that also returns a
:class:`SavedForBackward`: each query row's log-sum-exp (``lse``) and the tile decisions
(``tile_map``). :func:`attention_backward` returns the gradient of the function the forward
*actually computed*: softmax attention over the keys of the tiles each row kept. Skipped tiles
contribute exactly zero to ``dq``, ``dk``, ``dv``; everything else is FlashAttention-2's
backward (``S`` and ``P`` recomputed from ``q``, ``k`` and ``lse``). The tile decisions are a
piecewise-constant function of the inputs and carry no gradient, like the argmax of a max
pooling. :mod:`blasst_ref.reference_backward` is the readable specification; the oracle the
tests use is :func:`blasst_ref.dense_attention_backward` with ``keep=saved.kept_keys(Lk)``.

Backends: ``"reference"`` (numpy), ``"cpu"`` (Numba parallel) and ``"cuda"`` (Numba CUDA,
SIMT kernels). On the CUDA backend the forward kernels do not write ``lse``; a small kernel
computes it from the forward's tile map instead (the same kept keys, one extra ``Q K^T``
over the kept tiles, no ``V``).

Wrapping it for ``torch.autograd`` takes a few lines (CPU tensors through numpy without a
copy; ``tests/test_backward.py`` runs ``torch.autograd.gradcheck`` on exactly this)::

    class BlasstAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, thresh, causal):
            arrays = (t.detach().numpy() for t in (q, k, v))
            out, ctx.saved = attention_forward(*arrays, thresh, causal=causal)
            out = torch.from_numpy(out)
            ctx.save_for_backward(q, k, v, out)
            return out

        @staticmethod
        def backward(ctx, dout):
            arrays = (t.detach().numpy() for t in (dout.contiguous(), *ctx.saved_tensors))
            grads = attention_backward(*arrays, ctx.saved)
            return (*map(torch.from_numpy, grads), None, None)

CUDA tensors go in as they are (``attention_forward(q, k, v, ...)``; the outputs are CUDA
tensors too); the CUDA backward needs C-contiguous arrays, hence ``dout.contiguous()``.

Thread-safety: both functions are pure (no state between calls) and may run from several
threads; the CPU kernels share Numba's thread pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import api, reference, tiling
from .reference_backward import dense_attention_backward, kept_keys

__all__ = ["SavedForBackward", "attention_forward", "attention_backward",
           "dense_attention_backward"]


@dataclass(frozen=True)
class SavedForBackward:
    """What :func:`attention_forward` saves for :func:`attention_backward`.

    Attributes:
        lse: ``(B, Hq, Lq)`` (``(Hq, Lq)`` for 3-D inputs), float32 (float64 for float64
            inputs), an array of the inputs' kind (numpy, or the CUDA inputs' library): each
            query row's log-sum-exp over the scaled scores of the keys it kept,
            ``log(sum_j exp(scale * q_i . k_j))``; ``-inf`` for a row that sees no key.
        tile_map: int8 tile decisions, as ``AttentionStats.tile_map`` (``1`` computed, ``2``
            skipped, ``0`` masked away): prefill ``(B, Hq, n_q_tiles, n_k_tiles)``, decode
            ``(B, Hkv, 1, n_k_tiles)``. On the CUDA backend a device array of the inputs'
            library, owned by this object.
        causal, scale, block_q, block_k: the forward's arguments, resolved (defaults filled).
        phase: ``"prefill"`` or ``"decode"`` (``Lq <= 16``, split-KV; a kv group's rows share
            one decision per key tile, and the backward treats all ``Lq`` rows as one tile).
        backend: the backend that ran the forward; the backward runs there by default.
    """

    lse: object = field(repr=False)
    tile_map: object = field(repr=False)
    causal: bool
    scale: float
    block_q: int
    block_k: int
    phase: str
    backend: str

    def _host_tile_map(self) -> np.ndarray:
        tm = self.tile_map
        return tm.copy_to_host() if hasattr(tm, "copy_to_host") else np.asarray(tm)

    @property
    def sparsity(self) -> float:
        """Skipped / visited tiles of the forward (as ``AttentionStats.sparsity``)."""
        tm = self._host_tile_map()
        visited = int(np.count_nonzero(tm != reference.NOT_VISITED))
        return int(np.count_nonzero(tm == reference.SKIPPED)) / visited if visited else 0.0

    def kept_keys(self, kv_len: int) -> np.ndarray:
        """bool ``(B, Hq, Lq, Lk)``: the keys each query row kept (its tile was computed and
        the causal mask shows it): the ``keep`` of :func:`dense_attention_backward`."""
        shape = tuple(self.lse.shape)
        b, hq, lq = (1, *shape) if len(shape) == 2 else shape
        tm = self._host_tile_map()
        return kept_keys(tm, lq, kv_len, hq, causal=self.causal, block_q=self.block_q,
                         block_k=self.block_k)


def _compute_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def _host_4d(x, dtype):
    x = np.ascontiguousarray(x, dtype=dtype)
    return x[None] if x.ndim == 3 else x


def attention_forward(q, k, v, thresh: float = 0.0, *, causal: bool = False,
                      scale: float | None = None, backend: str = "auto",
                      block_q: int | None = None, block_k: int | None = None,
                      decode_seed: str = "sink"):
    """:func:`blasst_ref.attention` that also returns what the backward needs.

    Args:
        q, k, v, thresh, causal, scale, backend, block_q, block_k, decode_seed: as
            :func:`blasst_ref.attention` (same validation, same errors).

    Returns:
        ``(out, saved)``: ``out`` exactly as :func:`blasst_ref.attention` returns it, and a
        :class:`SavedForBackward` (per-row ``lse`` and the tile map).
    """
    on_device, (b, hq, lq, dqk), hkv, lk = api.validate_arguments(
        q, k, v, thresh, causal, scale, backend, block_q, block_k, decode_seed
    )
    if backend == "auto":
        backend = "cuda" if on_device else "cpu"
    thresh, causal = float(thresh), bool(causal)
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    block_q, block_k = tiling.default_blocks(lq, block_q, block_k)

    if backend == "cuda":
        from . import cuda as cuda_backend
        from .cuda import backward_v1

        out, tile_map, _ = cuda_backend.attention(q, k, v, thresh, causal, scale, block_q,
                                                  block_k, decode_seed=decode_seed)
        tile_map = backward_v1.own_tile_map(q, tile_map)  # the fast path reuses its buffer
        lse = backward_v1.row_lse(q, k, tile_map, causal, scale, block_q, block_k)
    else:
        three_d = q.ndim == 3
        dtype = _compute_dtype(q.dtype)
        q4, k4, v4 = (_host_4d(x, dtype) for x in (q, k, v))
        if backend == "reference":
            res = reference.blasst_attention_reference(
                q4, k4, v4, thresh, causal=causal, scale=scale, block_q=block_q,
                block_k=block_k, decode_seed=decode_seed,
            )
            out, tile_map, lse = res.out, res.tile_map, res.lse
        else:
            from . import cpu

            lse = np.empty((b, hq, lq), dtype)
            out, tile_map = cpu.blasst_attention(q4, k4, v4, thresh, causal, scale, block_q,
                                                 block_k, lse=lse, decode_seed=decode_seed)
        out = out.astype(q.dtype, copy=False)
        if three_d:
            out, lse = out[0], lse[0]
    phase = "decode" if tiling.is_decode(lq) else "prefill"
    return out, SavedForBackward(lse, tile_map, causal, scale, block_q, block_k, phase, backend)


def _check_backward_args(dout, q, k, v, out, saved, backend):
    if not isinstance(saved, SavedForBackward):
        raise TypeError(f"saved must be the SavedForBackward that attention_forward returned, "
                        f"got {type(saved).__name__}")
    on_device, (b, hq, lq, dqk), hkv, lk = api.validate_arguments(
        q, k, v, 0.0, saved.causal, saved.scale, "auto", saved.block_q, saved.block_k
    )
    dv = tuple(v.shape)[-1]
    expect = tuple(q.shape[:-1]) + (dv,)
    for name, x in (("dout", dout), ("out", out)):
        if on_device == isinstance(x, np.ndarray):
            kind = "a CUDA array" if on_device else "a numpy array"
            raise TypeError(f"{name} must be {kind}, as q, k and v are; got {type(x).__name__}")
        shape = tuple(x.shape)
        if shape != expect:
            raise ValueError(f"{name} must have the output's shape {expect} "
                             f"(q's shape with Dv = {dv}), got {shape}")
    lse_shape = tuple(saved.lse.shape)
    if lse_shape != tuple(q.shape[:-1]):
        raise ValueError(f"saved.lse has shape {lse_shape}, but q {tuple(q.shape)} needs "
                         f"{tuple(q.shape[:-1])}: saved belongs to another forward call")
    n_kt = tiling.num_tiles(lk, saved.block_k)
    if tiling.is_decode(lq):
        map_shape = (b, hkv, 1, n_kt)
    else:
        map_shape = (b, hq, tiling.num_tiles(lq, saved.block_q), n_kt)
    if tuple(saved.tile_map.shape) != map_shape:
        raise ValueError(f"saved.tile_map has shape {tuple(saved.tile_map.shape)}, but these "
                         f"inputs need {map_shape}: saved belongs to another forward call")
    if backend is None:
        backend = saved.backend
    if backend not in ("reference", "cpu", "cuda"):
        raise ValueError(f"backend must be 'reference', 'cpu', 'cuda' or None, got {backend!r}")
    if (backend == "cuda") != on_device:
        where = "CUDA arrays" if on_device else "numpy arrays"
        raise TypeError(f"backend={backend!r} cannot take {where}; the backward runs where "
                        f"the forward ran (backend=None)")
    return backend, (b, hq, lq, dqk), hkv, lk


def attention_backward(dout, q, k, v, out, saved: SavedForBackward, *, backend: str | None = None):
    """Gradients of BLASST attention with respect to ``q``, ``k`` and ``v``.

    Args:
        dout: ``(B, Hq, Lq, Dv)``, the gradient of the loss with respect to ``out``.
        q, k, v: the forward's inputs, ``(B, Hq, Lq, Dqk)``, ``(B, Hkv, Lk, Dqk)``,
            ``(B, Hkv, Lk, Dv)`` (3-D without ``B`` as in the forward).
        out: the forward's output ``(B, Hq, Lq, Dv)``.
        saved: the :class:`SavedForBackward` of that forward call.
        backend: None runs the backward on the forward's backend; the host backends
            (``"reference"``, ``"cpu"``) may stand in for each other.

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``, of their dtype and kind of array,
        computed in float32 (float64 for float64 inputs). ``dk`` and ``dv`` sum over the query
        heads of each kv group (GQA/MQA). Tiles the forward skipped, or never visited,
        contribute zero.

    Raises:
        TypeError / ValueError: naming the argument, for arrays that do not match the forward.
    """
    backend, (b, hq, lq, dqk), hkv, lk = _check_backward_args(dout, q, k, v, out, saved,
                                                               backend)
    if backend == "cuda":
        from .cuda import backward_v1

        return backward_v1.attention_backward(
            dout, q, k, v, out, saved.lse, saved.tile_map, saved.causal, saved.scale,
            saved.block_q, saved.block_k,
        )

    three_d = q.ndim == 3
    dtype = _compute_dtype(q.dtype)
    dout4, q4, k4, v4, out4 = (_host_4d(x, dtype) for x in (dout, q, k, v, out))
    lse4 = np.ascontiguousarray(saved.lse, dtype)
    lse4 = lse4[None] if three_d else lse4
    tile_map = saved._host_tile_map()
    if backend == "reference":
        from .reference_backward import attention_backward_reference

        grads = attention_backward_reference(
            dout4, q4, k4, v4, out4, lse4, tile_map, causal=saved.causal, scale=saved.scale,
            block_q=saved.block_q, block_k=saved.block_k,
        )
    else:
        from . import cpu

        grads = cpu.blasst_attention_backward(
            dout4, q4, k4, v4, out4, lse4, np.ascontiguousarray(tile_map), saved.causal,
            saved.scale, saved.block_q, saved.block_k,
        )
    return tuple((g[0] if three_d else g).astype(x.dtype, copy=False)
                 for g, x in zip(grads, (q, k, v)))
