"""The numpy oracle and the readable BLASST specification (docs/DESIGN.md §3).

Two functions, both meant to be read:

* :func:`dense_attention` — exact softmax attention in float64: the oracle that every test
  compares against.
* :func:`blasst_attention_reference` — BLASST written tile by tile with online softmax,
  exactly as the fast kernels do it, for any tile size. It is the specification the Numba
  CPU and CUDA kernels are checked against: same tiles, same skip decisions, same numbers up
  to rounding.

Shapes (PyTorch SDPA's layout): ``q`` is ``(B, Hq, Lq, Dqk)``, ``k`` is ``(B, Hkv, Lk, Dqk)``,
``v`` is ``(B, Hkv, Lk, Dv)``, the output ``(B, Hq, Lq, Dv)``; query head ``h`` reads kv head
``h // (Hq // Hkv)``. Causal masking is aligned bottom-right: row ``i`` sees key ``j`` iff
``j <= i + (Lk - Lq)``; a row that sees no key returns zeros.

The skip rule
-------------
For one tile with row maxima ``m~_r`` (scaled, causally masked scores) and running maxima
``m_r`` from the earlier tiles of the same rows, the tile is skipped when every row agrees:

    exp(m~_r - m_r) < thresh   for every row r,   written   m~_r - m_r < log(thresh).

Each row's vote is :func:`blasst_ref.rule.row_votes_skip`, the one function every backend
compiles; its docstring gives the cases of ``thresh == 0``, ``-inf`` and NaN. A skipped tile
changes neither ``m``, nor the running sum ``l``, nor the accumulator.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import rule, tiling
from .rule import COMPUTED, NOT_VISITED, SKIPPED  # noqa: F401 (AttentionStats.tile_map codes)
from .rule import log_threshold as _log_thresh


def _as_4d(x: np.ndarray) -> np.ndarray:
    return x[None] if x.ndim == 3 else x


def dense_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> np.ndarray:
    """Exact softmax attention, computed in float64: the oracle.

    Args:
        q: ``(B, Hq, Lq, Dqk)`` (or ``(Hq, Lq, Dqk)``).
        k: ``(B, Hkv, Lk, Dqk)`` with ``Hq % Hkv == 0``.
        v: ``(B, Hkv, Lk, Dv)``.
        causal: bottom-right aligned mask, row ``i`` sees keys ``j <= i + Lk - Lq``.
        scale: score scale, default ``1 / sqrt(Dqk)``.

    Returns:
        float64 array ``(B, Hq, Lq, Dv)`` (3-D if the inputs were 3-D). Rows that see no key
        are zeros; NaN/inf values propagate as in ``softmax(q k^T * scale) v``.
    """
    three_d = np.ndim(q) == 3
    q, k, v = (_as_4d(np.asarray(x)).astype(np.float64) for x in (q, k, v))
    _, hq, lq, dqk = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(dqk) if scale is None else float(scale)
    group = hq // hkv
    k = np.repeat(k, group, axis=1)  # kv head h // group serves query head h
    v = np.repeat(v, group, axis=1)

    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    visible = np.ones((lq, lk), dtype=bool)
    if causal:
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        visible = j <= i + tiling.causal_offset(lq, lk)
    s = np.where(visible, s, -np.inf)
    row_sees_keys = visible.any(axis=1)  # (Lq,)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(s, axis=-1, keepdims=True)
        m = np.where(row_sees_keys[:, None], m, 0.0)  # rows with no key: any finite shift
        p = np.where(visible, np.exp(s - m), 0.0)
        out = np.einsum("bhij,bhjd->bhid", p, v) / p.sum(axis=-1, keepdims=True)
    out = np.where(row_sees_keys[:, None], out, 0.0)
    return out[0] if three_d else out


class ReferenceResult(NamedTuple):
    """What :func:`blasst_attention_reference` returns.

    Attributes:
        out: ``(B, Hq, Lq, Dv)`` in the compute dtype (float32, or float64 for float64 input).
        tile_map: int8 tile decisions (``NOT_VISITED``/``COMPUTED``/``SKIPPED``);
            prefill: ``(B, Hq, n_q_tiles, n_k_tiles)``; decode: ``(B, Hkv, 1, n_k_tiles)``
            (one row of tiles per kv group: the group decides together).
        margin: float64, same shape: ``max_r(m~_r - m_r) - log(thresh)`` of every visited
            tile (a tile is skipped iff its margin is negative), NaN where not visited. Tests
            use it to excuse disagreements that lie within rounding of the threshold.
        decode: whether the split-KV decode form was used.
        lse: ``(B, Hq, Lq)`` in the compute dtype: each row's log-sum-exp over the keys it
            kept, ``log(sum_j exp(s_j))`` of the scaled scores of its kept tiles; ``-inf``
            for a row that sees no key. With ``tile_map`` it is what the backward needs
            (:mod:`blasst_ref.reference_backward`).
    """

    out: np.ndarray
    tile_map: np.ndarray
    margin: np.ndarray
    decode: bool
    lse: np.ndarray


class _OnlineSoftmax:
    """Running state of online softmax for a block of rows: max ``m``, sum ``l``, ``acc``."""

    def __init__(self, rows: int, dv: int, dtype):
        self.m = np.full(rows, -np.inf, dtype)
        self.l = np.zeros(rows, dtype)
        self.acc = np.zeros((rows, dv), dtype)

    def update(self, s: np.ndarray, visible: np.ndarray, v_tile: np.ndarray) -> None:
        """Fold one kept tile in: scores ``s`` ``(rows, cols)``, mask ``visible``, ``v_tile``
        ``(cols, Dv)``."""
        with np.errstate(invalid="ignore", over="ignore"):
            tile_max = np.max(np.where(visible, s, -np.inf), axis=1)
            m_new = np.maximum(self.m, tile_max)
            # A row that has still seen nothing keeps l = 0 and acc = 0: shift by 0, not -inf.
            shift = np.where(m_new == -np.inf, 0.0, m_new).astype(s.dtype)
            alpha = np.exp(self.m - shift)  # rescales the old state to the new max
            p = np.where(visible, np.exp(s - shift[:, None]), 0.0).astype(s.dtype)
            self.l = self.l * alpha + p.sum(axis=1)
            self.acc = self.acc * alpha[:, None] + p @ v_tile
        self.m = m_new


def _rows_vote_skip(tile_max: np.ndarray, m_ref: np.ndarray, log_thresh: float) -> bool:
    """The skip rule: every row votes for the tile (:func:`blasst_ref.rule.row_votes_skip`,
    row by row, against its reference ``m_ref``: the running max)."""
    log_thresh = np.float64(log_thresh)  # float32 gaps, compared in float64
    with np.errstate(invalid="ignore"):  # -inf - -inf: a row that has seen nothing
        return all(rule.row_votes_skip(t, m, log_thresh) for t, m in zip(tile_max, m_ref))


def _tile_margin(tile_max: np.ndarray, m_ref: np.ndarray, log_thresh: float) -> float:
    """A diagnostic, not the rule: ``max_r(m~_r - m_ref_r) - log(thresh)``, negative exactly
    when :func:`_rows_vote_skip` skips the tile (a row whose gap is NaN counts as ``+inf``),
    so its size says how close to the threshold a decision was."""
    with np.errstate(invalid="ignore"):
        gap = tile_max - m_ref
    gap = np.where(np.isnan(gap), np.inf, gap)
    return float(np.max(gap)) - log_thresh


def _visible_mask(rows_q: np.ndarray, j0: int, j1: int, offset: int, causal: bool) -> np.ndarray:
    """``(rows, j1 - j0)`` mask of keys ``j0..j1-1`` that query rows ``rows_q`` may see."""
    cols = np.arange(j0, j1)[None, :]
    if not causal:
        return np.ones((len(rows_q), j1 - j0), dtype=bool)
    return cols <= rows_q[:, None] + offset


def _tile_scores(q_rows, k, rows_q, j0, j1, offset, causal):
    """Scores ``(rows, j1 - j0)`` of keys ``j0..j1-1``, their visibility mask, and each
    row's max over the keys it may see (``-inf`` where it sees none; NaN kept)."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = q_rows @ k[j0:j1].T  # q_rows is pre-scaled
    visible = _visible_mask(rows_q, j0, j1, offset, causal)
    with np.errstate(invalid="ignore"):
        tile_max = np.max(np.where(visible, s, -np.inf), axis=1)
    return s, visible, tile_max


def _seeded_reference(m: np.ndarray, s0: np.ndarray) -> np.ndarray:
    """``m_ref_r = max_nan(m_r, s0_r)`` row by row (:func:`blasst_ref.rule.max_nan`): the
    reference of docs/DESIGN.md §3.5's seeded decode (``s0 = -inf`` gives ``m`` itself)."""
    return np.array([rule.max_nan(a, b) for a, b in zip(m, s0)], dtype=m.dtype)


def _process_tile(state, q_rows, k, v, rows_q, j0, j1, offset, causal, log_thresh, s0=None):
    """Score one tile, apply the skip rule, and fold it in if kept. Returns (code, margin).

    ``s0``: the rows' sink maxima (seeded decode), or ``None``: the rows' reference is their
    running max ``state.m``."""
    s, visible, tile_max = _tile_scores(q_rows, k, rows_q, j0, j1, offset, causal)
    m_ref = state.m if s0 is None else _seeded_reference(state.m, s0)
    margin = _tile_margin(tile_max, m_ref, log_thresh)  # reported, not used to decide
    if _rows_vote_skip(tile_max, m_ref, log_thresh):
        return SKIPPED, margin  # no exp, no V load, no P.V; m, l, acc unchanged
    state.update(s, visible, v[j0:j1])
    return COMPUTED, margin


def _row_lse(m: np.ndarray, l: np.ndarray, sees_keys: np.ndarray) -> np.ndarray:
    """Each row's log-sum-exp ``m + log(l)`` of its kept scores; ``-inf`` for no key."""
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = m + np.log(l)
    return np.where(sees_keys, lse, -np.inf)


def _finish(acc: np.ndarray, l: np.ndarray, sees_keys: np.ndarray) -> np.ndarray:
    """Divide by the softmax sum; rows that see no key are zeros (FlashAttention's rule)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / l[:, None]
    return np.where(sees_keys[:, None], out, 0.0)


def _prefill(q, k, v, log_thresh, causal, scale, block_q, block_k, dtype):
    b_, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    offset = tiling.causal_offset(lq, lk)
    n_qt, n_kt = tiling.num_tiles(lq, block_q), tiling.num_tiles(lk, block_k)
    out = np.empty((b_, hq, lq, dv), dtype)
    tile_map = np.full((b_, hq, n_qt, n_kt), NOT_VISITED, np.int8)
    margin = np.full((b_, hq, n_qt, n_kt), np.nan)
    lse = np.empty((b_, hq, lq), dtype)
    for b in range(b_):
        for h in range(hq):
            kh, vh = k[b, h // group], v[b, h // group]
            for qt in range(n_qt):
                i0, i1 = qt * block_q, min(lq, (qt + 1) * block_q)
                rows_q = np.arange(i0, i1)
                q_rows = q[b, h, i0:i1] * dtype.type(scale)
                state = _OnlineSoftmax(i1 - i0, dv, dtype)
                k_tiles = tiling.causal_k_tiles(i0, i1, lq, lk, block_k) if causal else n_kt
                for kt in range(k_tiles):
                    j0, j1 = kt * block_k, min(lk, (kt + 1) * block_k)
                    code, mg = _process_tile(
                        state, q_rows, kh, vh, rows_q, j0, j1, offset, causal, log_thresh
                    )
                    tile_map[b, h, qt, kt], margin[b, h, qt, kt] = code, mg
                sees = (rows_q + offset >= 0) if causal else np.ones(i1 - i0, bool)
                out[b, h, i0:i1] = _finish(state.acc, state.l, sees)
                lse[b, h, i0:i1] = _row_lse(state.m, state.l, sees)
    return out, tile_map, margin, lse


def _merge_splits(states, dtype):
    """Log-sum-exp merge of split-KV partial states into ``(acc, l, m)``: ``acc`` and ``l``
    relative to the common max ``m``."""
    m_all = np.stack([s.m for s in states])  # (splits, rows)
    with np.errstate(invalid="ignore"):
        m_max = np.max(m_all, axis=0)
        shift = np.where(m_max == -np.inf, 0.0, m_max)
        w = np.exp(m_all - shift).astype(dtype)  # a split that saw nothing weighs 0
    l = sum(wi * s.l for wi, s in zip(w, states))
    acc = sum(wi[:, None] * s.acc for wi, s in zip(w, states))
    return acc, l, m_max


def _decode(q, k, v, log_thresh, causal, scale, block_k, dtype, seeded=True):
    b_, hq, lq, dqk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    offset = tiling.causal_offset(lq, lk)
    n_kt = tiling.num_tiles(lk, block_k)
    split_tiles = tiling.decode_split_tiles(lk, block_k)
    # Tiles beyond the last row's horizon are masked for every row: never visited.
    k_tiles = tiling.causal_k_tiles(0, lq, lq, lk, block_k) if causal else n_kt
    out = np.empty((b_, hq, lq, dv), dtype)
    tile_map = np.full((b_, hkv, 1, n_kt), NOT_VISITED, np.int8)
    margin = np.full((b_, hkv, 1, n_kt), np.nan)
    lse = np.empty((b_, hq, lq), dtype)
    rows_q = np.tile(np.arange(lq), group)  # row r is (head g*group + r // Lq, query r % Lq)
    sees = (rows_q + offset >= 0) if causal else np.ones(group * lq, bool)
    for b in range(b_):
        for g in range(hkv):
            heads = slice(g * group, (g + 1) * group)
            q_rows = q[b, heads].reshape(group * lq, dqk) * dtype.type(scale)
            states = []
            for c0 in range(0, max(k_tiles, 1), split_tiles):  # one chunk = one split
                state = _OnlineSoftmax(group * lq, dv, dtype)
                s0 = None
                if seeded and 0 < c0 < k_tiles:
                    # the sink reference: tile 0's row maxima, scored by this chunk itself
                    # (Q K^T only: no exp, no V, nothing folded in). Chunk 0 needs none:
                    # tile 0 is its first tile, and its running max covers it from then on.
                    s0 = _tile_scores(q_rows, k[b, g], rows_q, 0, min(lk, block_k), offset,
                                      causal)[2]
                for kt in range(c0, min(k_tiles, c0 + split_tiles)):
                    j0, j1 = kt * block_k, min(lk, (kt + 1) * block_k)
                    code, mg = _process_tile(
                        state, q_rows, k[b, g], v[b, g], rows_q, j0, j1, offset, causal,
                        log_thresh, s0,
                    )
                    tile_map[b, g, 0, kt], margin[b, g, 0, kt] = code, mg
                states.append(state)
            acc, l, m = _merge_splits(states, dtype)
            out[b, heads] = _finish(acc, l, sees).reshape(group, lq, dv)
            lse[b, heads] = _row_lse(m, l, sees).reshape(group, lq)
    return out, tile_map, margin, lse


def blasst_attention_reference(
    q, k, v, thresh: float = 0.0, *, causal: bool = False, scale: float | None = None,
    block_q: int | None = None, block_k: int | None = None, decode_seed: str = "sink",
) -> ReferenceResult:
    """BLASST attention, tile by tile, in numpy: the specification of every backend.

    Args:
        q, k, v: 4-D arrays in the layout of the module docstring (validated by the caller;
            :func:`blasst_ref.attention` does that).
        thresh: BLASST's lambda in ``[0, 1)``; 0 is exact dense attention.
        causal, scale: as :func:`dense_attention`.
        block_q, block_k: tile sizes (defaults from :mod:`blasst_ref.tiling`). In decode
            (``Lq <= tiling.DECODE_MAX_Q_LEN``) ``block_q`` is not used: the rows of a tile
            are all query rows of one kv group, and keys are cut into split-KV chunks.
        decode_seed: ``"sink"`` (default): in decode every split-KV chunk tests its tiles
            against ``max(m_r, s0_r)``, ``s0_r`` the row's max scaled score over key tile 0
            (docs/DESIGN.md §3.5); ``"none"``: against its own running max only. Prefill
            does not use it.

    Computes in float32 (float64 for float64 inputs), as the kernels do.
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    dtype = np.dtype(np.float64 if q.dtype == np.float64 else np.float32)
    q, k, v = (x.astype(dtype, copy=False) for x in (q, k, v))
    lq = q.shape[2]
    block_q, block_k = tiling.default_blocks(lq, block_q, block_k)
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else float(scale)
    log_thresh = _log_thresh(thresh)
    if tiling.is_decode(lq):
        out, tile_map, margin, lse = _decode(q, k, v, log_thresh, causal, scale, block_k, dtype,
                                             rule.decode_seeded(decode_seed))
        return ReferenceResult(out, tile_map, margin, True, lse)
    out, tile_map, margin, lse = _prefill(
        q, k, v, log_thresh, causal, scale, block_q, block_k, dtype
    )
    return ReferenceResult(out, tile_map, margin, False, lse)
