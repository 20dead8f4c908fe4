"""The BLASST skip rule (docs/DESIGN.md §3.3), written once as plain scalar functions.

Every backend runs these same functions, compiled the minitorch way for its target:

* the numpy reference (:mod:`blasst_ref.reference`) calls them as they are, row by row;
* the Numba CPU kernels compile them with ``numba.njit(inline="always")``
  (:mod:`blasst_ref.cpu.online`);
* the Numba CUDA kernels compile them with ``numba.cuda.jit(device=True, inline=True)``
  (:mod:`blasst_ref.cuda.rule`, which also puts them into the namespace of the generated
  kernel sources).

What is here: the tile codes of ``AttentionStats.tile_map``; :func:`log_threshold`;
:func:`row_votes_skip`, one row's vote; :func:`max_nan`, the maximum that keeps NaN; and the
causal mask and horizons (docs/DESIGN.md §3.2's bottom-right alignment): :func:`key_visible`,
:func:`last_visible_key` of a row, :func:`row_sees_keys`, and :func:`visited_k_tiles` of a
block of rows.

So that one source compiles for all three, each function is a few lines of scalar
arithmetic and comparisons that call nothing else (no other function of the package, no
numpy), and nothing in this module imports numba. The tile geometry (how many tiles, which
rows a decode tile holds, the split-KV chunks) is :mod:`blasst_ref.tiling`'s, which calls
:func:`visited_k_tiles` for its causal tile ranges.

The rule
--------
A tile of rows ``r`` with row maxima ``m~_r`` (of the scaled scores that the causal mask lets
through) is skipped when **every** row votes for it, and row ``r`` votes when

    exp(m~_r - m_ref_r) < thresh,   tested as   m~_r - m_ref_r < log(thresh)

(:func:`row_votes_skip`). ``m_ref_r`` is the reference the row measures its tile against. In
prefill and in the unseeded split-KV decode it is the row's running max ``m_r`` over the tiles
it has kept so far. docs/DESIGN.md §3.5's seeded decode measures every chunk's tiles against
``m_ref_r = max_nan(m_r, s0_r)``, with ``s0_r`` the row's max score over key tile 0; that is
a change of the argument a kernel passes, not of the rule. How the votes of a tile's rows are
combined (every row must vote; padding rows past ``Lq`` do not count) is the kernels' own
business: a loop on the CPU, a block-wide barrier on the GPU.
"""

from __future__ import annotations

import math

#: ``AttentionStats.tile_map`` codes: a tile that causality masks entirely is never
#: visited and not counted;
NOT_VISITED = 0
#: a visited tile that was kept (exp, running sum and ``P V`` computed);
COMPUTED = 1
#: a visited tile that the threshold test skipped (no exp, no V load, no ``P V``).
SKIPPED = 2


def log_threshold(thresh):
    """``log(thresh)``, the right-hand side of :func:`row_votes_skip`: ``-inf`` for
    ``thresh == 0`` (so that nothing is ever skipped), a float64 otherwise.

    Kernels take the float64 result as an argument; a host computes it once per call."""
    if thresh == 0:
        return -math.inf
    return math.log(thresh)


def row_votes_skip(tile_max, m_ref, log_thresh):
    """Whether one row votes to skip its tile: ``tile_max - m_ref < log_thresh``.

    Args:
        tile_max: the row's max over the tile's scaled scores that it may see (``m~_r``);
            ``-inf`` when the causal mask hides every key of the tile from this row.
        m_ref: the reference the row measures the tile against: its running max over the
            tiles it has kept (``-inf`` before its first tile), or the seeded reference of
            docs/DESIGN.md §3.5's decode.
        log_thresh: :func:`log_threshold` of the threshold, a float64.

    The difference is taken in the type of ``tile_max`` and ``m_ref`` (float32 in the float32
    and float16 kernels and the reference's float32 compute) and compared in float64: every
    backend passes the same types, so that every backend takes the same decision.

    Special values, all from IEEE arithmetic (a comparison with NaN is false):

    * ``thresh == 0`` (``log_thresh == -inf``): never votes (nothing is below ``-inf``), so
      ``thresh = 0`` is exact dense attention;
    * ``m_ref == -inf`` (the row has seen nothing yet: its first tile): the difference is
      ``+inf``, or NaN when ``tile_max`` is ``-inf`` too; never votes, so a row block's first
      tile is always computed;
    * ``tile_max == -inf`` with a finite ``m_ref`` (every key of the tile masked for this
      row): votes (for any ``thresh > 0``): the row has nothing to add;
    * a NaN ``tile_max`` (a NaN score the row can see) or a NaN ``m_ref`` (a row that has
      already folded a NaN in): never votes, so a NaN is never skipped away;
    * ``tile_max == +inf``: never votes.
    """
    return tile_max - m_ref < log_thresh


def max_nan(a, b):
    """``max(a, b)`` that propagates NaN, as ``np.maximum`` does: NaN if either is NaN
    (CUDA's ``fmaxf`` and Python's ``max`` drop it). Running and tile maxima use it so that a
    NaN score reaches :func:`row_votes_skip` (and never lets its tile be skipped)."""
    if a > b or a != a:
        return a
    return b


def key_visible(row, key, q_len, kv_len, causal):
    """Whether query row ``row`` may see key ``key`` (``0 <= key``): the key exists
    (``key < kv_len``) and, under the causal mask (aligned bottom-right, docs/DESIGN.md §3.2),
    ``key <= row + kv_len - q_len``. A score the mask hides is ``-inf``: it takes no part in
    a tile's max, and its probability is 0."""
    return key < kv_len and (not causal or key <= row + kv_len - q_len)


def last_visible_key(row, q_len, kv_len, causal):
    """The last key query row ``row`` may see: ``kv_len - 1``, or under the causal mask
    (aligned bottom-right, docs/DESIGN.md §3.2) ``min(kv_len - 1, row + kv_len - q_len)``.

    Negative when the row sees no key at all (causal, ``q_len > kv_len``): such a row
    outputs zeros."""
    if causal:
        return min(kv_len - 1, row + kv_len - q_len)
    return kv_len - 1


def row_sees_keys(row, q_len, kv_len, causal):
    """Whether query row ``row`` sees at least one key: always without a mask; under the
    causal mask when ``row + kv_len - q_len >= 0``. A row that sees none outputs zeros
    (FlashAttention's rule), not the ``0 / 0`` of an empty softmax."""
    return not causal or row + kv_len - q_len >= 0


def visited_k_tiles(q_stop, q_len, kv_len, block_k, causal):
    """How many key tiles (from tile 0) the query rows below ``q_stop`` visit: every tile
    without a mask; under the causal mask the tiles up to the last visible key of row
    ``q_stop - 1`` (the later ones are masked for every row: never visited, never counted),
    and 0 when that row sees no key. A decode tile's rows are all query positions of a kv
    group, so there ``q_stop = q_len``."""
    n_k_tiles = (kv_len + block_k - 1) // block_k
    if not causal:
        return n_k_tiles
    last = q_stop - 1 + kv_len - q_len
    if last < 0:
        return 0
    return min(n_k_tiles, last // block_k + 1)


#: The values of ``attention(..., decode_seed=...)`` (docs/DESIGN.md §3.5): ``"sink"``, every
#: split-KV chunk measures its tiles against ``m_ref_r = max_nan(m_r, s0_r)`` with ``s0_r`` the
#: row's max scaled score over key tile 0 (the default); ``"none"``, against its own running
#: max ``m_r`` only (``s0_r = -inf``).
DECODE_SEEDS = ("sink", "none")


def decode_seeded(decode_seed):
    """Whether ``decode_seed`` asks for the seeded split-KV test (``"sink"``: True, ``"none"``:
    False); a ``ValueError`` naming the allowed values for anything else. Host code only
    (kernels take the bool)."""
    if isinstance(decode_seed, str) and decode_seed in DECODE_SEEDS:
        return decode_seed == "sink"
    raise ValueError(f"decode_seed must be one of {', '.join(map(repr, DECODE_SEEDS))}, "
                     f"got {decode_seed!r}")


#: The functions kernels compile, in this order (each target unpacks its compilations into
#: these names: :mod:`blasst_ref.cpu.online`, :mod:`blasst_ref.cuda.rule`).
KERNEL_FUNCTIONS = (row_votes_skip, max_nan, key_visible, last_visible_key, row_sees_keys,
                    visited_k_tiles)
