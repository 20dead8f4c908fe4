"""Tile geometry shared by every backend (docs/DESIGN.md §3).

Skip decisions are taken per tile, so two backends make the same decisions only if they cut
the score matrix into the same tiles. Everything that fixes the tiling lives here, as small
pure functions of the problem shape, and every backend (the numpy reference, the Numba CPU
kernels, the CUDA kernels) calls them. Nothing in this module imports numba. The one tile range
that kernels compute themselves, the causal horizon of a row block, is
:func:`blasst_ref.rule.visited_k_tiles`, which they compile from the same source and which
host code reaches through :func:`visited_k_tiles` / :func:`causal_k_tiles` here.

Phases
------
* **prefill**: tiles of ``block_q`` query rows x ``block_k`` keys, one query head at a time.
* **decode** (``Lq <= DECODE_MAX_Q_LEN``): the rows of one tile are *all* query rows of all
  query heads of one kv group (``group * Lq`` rows), so the group decides together, as in
  TensorRT-LLM's XQA. The keys are cut into split-KV chunks of whole tiles; each chunk has its
  own running max and the chunks are merged by log-sum-exp. Seeded (``decode_seed="sink"``,
  docs/DESIGN.md §3.5) a chunk tests its tiles against the sink tile's max too; unseeded its
  first tile is dense.
"""

from __future__ import annotations

import math

from . import rule

#: A query length at or below this is served by the split-KV decode path.
DECODE_MAX_Q_LEN = 16

#: Default tile sizes. Backends may be asked for other sizes; these are chosen for the CPU
#: kernels (the QK and PV tile products fit in L2 and are large enough for BLAS to be
#: efficient) and used by the reference too, so that default decisions are comparable.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
DEFAULT_DECODE_BLOCK_K = 64

#: Split-KV chunking for decode: a chunk holds at least this many key tiles (short chunks
#: cost sparsity: unseeded, each chunk's first tile is dense; seeded, each chunk scores key
#: tile 0 once more) ...
MIN_TILES_PER_SPLIT = 32
#: ... and there are at most this many chunks per (batch, kv head).
MAX_SPLITS = 64


def is_decode(q_len: int) -> bool:
    """True when a query length of ``q_len`` is served by the split-KV decode path."""
    return q_len <= DECODE_MAX_Q_LEN


def default_blocks(q_len: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """Fill in default tile sizes. In decode ``block_q`` is ignored (the tile's rows are the
    kv group's query rows), and returned as 0 by the caller's convention elsewhere."""
    if is_decode(q_len):
        return (block_q or DEFAULT_BLOCK_Q, block_k or DEFAULT_DECODE_BLOCK_K)
    return (block_q or DEFAULT_BLOCK_Q, block_k or DEFAULT_BLOCK_K)


def backward_block_q(q_len: int, block_q: int) -> int:
    """Query rows of a tile in the backward: the forward's ``block_q`` in prefill; in decode
    all ``q_len`` rows, since there the rows of a kv group share one decision per key tile
    (the tile map is ``(B, Hkv, 1, n_k_tiles)``)."""
    return q_len if is_decode(q_len) else block_q


def num_tiles(length: int, block: int) -> int:
    """Number of tiles of ``block`` that cover ``length`` (the last may be partial)."""
    return -(-length // block)


def causal_offset(q_len: int, kv_len: int) -> int:
    """Bottom-right causal alignment: query row ``i`` sees keys ``j <= i + offset``."""
    return kv_len - q_len


def causal_k_tiles(q_start: int, q_stop: int, q_len: int, kv_len: int, block_k: int) -> int:
    """Number of key tiles that rows ``[q_start, q_stop)`` visit under causal masking.

    The last row of the range sees keys ``j <= q_stop - 1 + offset``; key tiles beyond that
    are masked for every row of the range and are never visited (nor counted). Returns 0 when
    no row of the range sees any key (``Lq > Lk``)."""
    return rule.visited_k_tiles(q_stop, q_len, kv_len, block_k, True)


def visited_k_tiles(q_stop: int, q_len: int, kv_len: int, block_k: int, causal: bool) -> int:
    """Number of key tiles that rows below ``q_stop`` visit: :func:`causal_k_tiles` under
    the causal mask, every tile (``num_tiles(kv_len, block_k)``) without it. In decode a
    tile's rows are every query position of a kv group: ``q_stop = q_len``."""
    return rule.visited_k_tiles(q_stop, q_len, kv_len, block_k, causal)


def decode_split_tiles(kv_len: int, block_k: int) -> int:
    """Key tiles per split-KV chunk in decode, a pure function of ``(Lk, block_k)``.

    At least ``MIN_TILES_PER_SPLIT`` tiles per chunk, and at most ``MAX_SPLITS`` chunks."""
    n_kt = num_tiles(kv_len, block_k)
    return max(MIN_TILES_PER_SPLIT, math.ceil(n_kt / MAX_SPLITS))


def decode_num_splits(kv_len: int, block_k: int) -> int:
    """Number of split-KV chunks in decode (see :func:`decode_split_tiles`)."""
    return num_tiles(num_tiles(kv_len, block_k), decode_split_tiles(kv_len, block_k))
