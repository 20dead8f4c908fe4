"""The backward of BLASST attention in numpy: the readable specification (docs/DESIGN.md §11).

BLASST computes, for each query row ``i``, softmax attention over the keys of the tiles it
*kept*: a skipped tile changes neither the running max, nor the running sum, nor the output.
So, with the tile decisions held fixed, the function is

    O_i = sum_{j in K(i)} P_ij v_j,     P_ij = exp(s_ij - lse_i),     s_ij = scale * q_i . k_j,
    lse_i = log sum_{j in K(i)} exp(s_ij),

where ``K(i)`` is the set of keys that row ``i`` sees (causal mask) *in a kept tile*. Its
gradient is FlashAttention-2's backward restricted to the kept tiles; a skipped tile
contributes exactly zero to ``dQ``, ``dK`` and ``dV``. (The decisions themselves are a
piecewise-constant function of the inputs: they have no gradient, and between decision
boundaries the function is smooth.)

Given ``dO = dL/dO`` and ``D_i = sum_d dO_id O_id`` (``= sum_j P_ij dP_ij``), every kept tile
adds, with ``S``, ``P`` recomputed from ``Q``, ``K`` and the stored ``lse``::

    P   = exp(S - lse)              (0 where the causal mask hides a key)
    dV += P^T dO
    dP  = dO V^T
    dS  = P * (dP - D)              (the softmax Jacobian, row by row)
    dQ += scale * dS K
    dK += scale * dS^T Q

In GQA/MQA the query heads of a kv group share ``K`` and ``V``, so ``dK`` and ``dV`` sum
over them. Nothing but ``Q, K, V, O, dO``, each row's ``lse`` and the tile decisions is
needed: that is what the forward saves.

Two functions:

* :func:`attention_backward_reference` -- the tile loop above, for any tile size, in the
  compute dtype of the kernels (float32, float64 for float64): the spec the CPU and CUDA
  backward kernels are checked against.
* :func:`dense_attention_backward` -- the oracle: the gradient of the dense softmax formula
  with an explicit key mask, in float64, written the way autograd would differentiate it
  (softmax Jacobian ``P * (dP - rowsum(P * dP))``, not the ``D = rowsum(dO * O)`` trick).
  :func:`kept_keys` turns a tile map into that mask.
"""

from __future__ import annotations

import numpy as np

from . import tiling
from .reference import COMPUTED

__all__ = ["attention_backward_reference", "dense_attention_backward", "kept_keys"]


def _as_4d(x: np.ndarray) -> np.ndarray:
    return x[None] if x.ndim == 3 else x


def kept_keys(tile_map, q_len: int, kv_len: int, hq: int, *, causal: bool, block_q: int,
              block_k: int) -> np.ndarray:
    """The keys each query row kept: bool ``(B, Hq, Lq, Lk)``.

    Args:
        tile_map: int8 tile decisions of a forward (``AttentionStats.tile_map``): prefill
            ``(B, Hq, n_q_tiles, n_k_tiles)``, decode ``(B, Hkv, 1, n_k_tiles)``.
        q_len, kv_len, hq: ``Lq``, ``Lk`` and the number of query heads.
        causal, block_q, block_k: as in that forward (``block_q`` unused in decode).

    Key ``j`` is kept by row ``i`` iff its tile was computed (not skipped, not masked
    away) and, under ``causal``, ``j <= i + Lk - Lq``.
    """
    tile_map = np.asarray(tile_map)
    rows = tiling.backward_block_q(q_len, block_q)
    per = hq // tile_map.shape[1]  # query heads per map row: 1, or the group in decode
    computed = np.repeat(tile_map == COMPUTED, per, axis=1)  # (B, Hq, n_qt, n_kt)
    keep = np.repeat(np.repeat(computed, rows, axis=2)[:, :, :q_len], block_k, axis=3)
    keep = keep[..., :kv_len]
    if causal:
        i = np.arange(q_len)[:, None]
        j = np.arange(kv_len)[None, :]
        keep = keep & (j <= i + tiling.causal_offset(q_len, kv_len))
    return keep


def attention_backward_reference(dout, q, k, v, out, lse, tile_map, *, causal: bool = False,
                                 scale: float | None = None, block_q: int | None = None,
                                 block_k: int | None = None):
    """Gradients of BLASST attention, tile by tile, in numpy: the specification.

    Args:
        dout: ``(B, Hq, Lq, Dv)``, the gradient of the loss with respect to the output.
        q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``; v: ``(B, Hkv, Lk, Dv)``.
        out: ``(B, Hq, Lq, Dv)``, the forward's output.
        lse: ``(B, Hq, Lq)``, each row's log-sum-exp over its kept scaled scores (``-inf``
            for a row that sees no key): ``ReferenceResult.lse``.
        tile_map: the forward's decisions (``ReferenceResult.tile_map``); only tiles coded
            ``COMPUTED`` contribute.
        causal, scale, block_q, block_k: exactly as in the forward (the tiles must be the
            forward's tiles).

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``, in float32 (float64 for float64
        ``q``), the compute dtype of the kernels.
    """
    dtype = np.dtype(np.float64 if np.asarray(q).dtype == np.float64 else np.float32)
    dout, q, k, v, out = (np.asarray(x).astype(dtype, copy=False) for x in (dout, q, k, v, out))
    lse = np.asarray(lse).astype(dtype, copy=False)
    tile_map = np.asarray(tile_map)
    n_b, hq, lq, dqk = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    block_q, block_k = tiling.default_blocks(lq, block_q, block_k)
    scale = 1.0 / np.sqrt(dqk) if scale is None else float(scale)
    rows = tiling.backward_block_q(lq, block_q)
    per = hq // tile_map.shape[1]  # head h reads map row h // per (per = group in decode)
    offset = tiling.causal_offset(lq, lk)
    n_qt, n_kt = tiling.num_tiles(lq, rows), tiling.num_tiles(lk, block_k)

    # D_i = dO_i . O_i = sum_j P_ij dP_ij: the softmax Jacobian's row term, once per row
    delta = np.sum(dout * out, axis=-1)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(n_b):
        for h in range(hq):
            g = h // group  # the kv head this query head reads
            for qt in range(n_qt):
                i0, i1 = qt * rows, min(lq, (qt + 1) * rows)
                q_s = q[b, h, i0:i1] * dtype.type(scale)
                do = dout[b, h, i0:i1]
                for kt in range(n_kt):
                    if tile_map[b, h // per, qt, kt] != COMPUTED:
                        continue  # skipped, or masked away: contributes exactly zero
                    j0, j1 = kt * block_k, min(lk, (kt + 1) * block_k)
                    s = q_s @ k[b, g, j0:j1].T
                    visible = np.ones((i1 - i0, j1 - j0), bool)
                    if causal:
                        visible = np.arange(j0, j1)[None, :] <= np.arange(i0, i1)[:, None] + offset
                    with np.errstate(invalid="ignore", over="ignore"):
                        p = np.where(visible, np.exp(s - lse[b, h, i0:i1, None]), 0.0)
                    dv[b, g, j0:j1] += p.T @ do
                    dp = do @ v[b, g, j0:j1].T
                    ds = p * (dp - delta[b, h, i0:i1, None])
                    dq[b, h, i0:i1] += (ds @ k[b, g, j0:j1]) * dtype.type(scale)
                    dk[b, g, j0:j1] += ds.T @ q_s  # q_s carries the scale
    return dq, dk, dv


def dense_attention_backward(dout, q, k, v, *, causal: bool = False, scale: float | None = None,
                             keep=None):
    """The float64 oracle: gradients of softmax attention over an explicit key mask.

    Computes ``O = softmax(S + log(mask)) V`` with ``S = scale * Q K^T`` and
    ``mask = keep & causal``, and returns its vector-Jacobian product with ``dout`` the way
    autograd derives it: ``dV = P^T dO``, ``dP = dO V^T``,
    ``dS = P * (dP - rowsum(P * dP))``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``,
    ``dK`` and ``dV`` summed over the query heads of each kv group.

    Args:
        dout: ``(B, Hq, Lq, Dv)``; q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``;
            v: ``(B, Hkv, Lk, Dv)`` (3-D without ``B`` also accepted).
        causal, scale: as :func:`blasst_ref.dense_attention`.
        keep: optional bool mask broadcastable to ``(B, Hq, Lq, Lk)``, e.g. :func:`kept_keys`
            of a BLASST forward; None keeps every key (dense attention).

    Returns:
        float64 ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``. Rows with no key have zero
        output and zero gradient.
    """
    three_d = np.ndim(q) == 3
    dout, q, k, v = (_as_4d(np.asarray(x)).astype(np.float64) for x in (dout, q, k, v))
    n_b, hq, lq, dqk = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / np.sqrt(dqk) if scale is None else float(scale)
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)

    mask = np.ones((n_b, hq, lq, lk), bool)
    if keep is not None:
        mask &= np.broadcast_to(np.asarray(keep, bool)[(None,) * (4 - np.ndim(keep))],
                                mask.shape)
    if causal:
        mask &= np.arange(lk)[None, :] <= np.arange(lq)[:, None] + tiling.causal_offset(lq, lk)
    has_key = mask.any(axis=-1, keepdims=True)

    s = np.einsum("bhid,bhjd->bhij", q, kr) * scale
    s = np.where(mask, s, -np.inf)
    m = np.where(has_key, s.max(axis=-1, keepdims=True), 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    p = e / np.where(has_key, e.sum(axis=-1, keepdims=True), 1.0)  # 0 for a row with no key

    dv = np.einsum("bhij,bhid->bhjd", p, dout)
    dp = np.einsum("bhid,bhjd->bhij", dout, vr)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dq = np.einsum("bhij,bhjd->bhid", ds, kr) * scale
    dk = np.einsum("bhij,bhid->bhjd", ds, q) * scale

    def per_kv_head(x):  # (B, Hq, Lk, D) -> (B, Hkv, Lk, D): sum over each group's heads
        return x.reshape(n_b, hkv, group, lk, x.shape[-1]).sum(axis=2)

    dk, dv = per_kv_head(dk), per_kv_head(dv)
    return (dq[0], dk[0], dv[0]) if three_d else (dq, dk, dv)
