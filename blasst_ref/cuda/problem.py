"""The vocabulary of the kernel version table (:mod:`.launch`): what a call looks like
(:class:`Problem`) and what a kernel version offers (:class:`KernelVersion`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import tiling

__all__ = ["KernelVersion", "Problem", "pow2_ceil", "pow2_floor"]


@dataclass(frozen=True)
class Problem:
    """One attention call as the kernels see it: shapes, dtype, mask and tiles.

    Attributes:
        batch, q_heads, kv_heads, q_len, kv_len, dqk, dv: ``q (B, Hq, Lq, Dqk)``,
            ``k (B, Hkv, Lk, Dqk)``, ``v (B, Hkv, Lk, Dv)``.
        dtype: the arrays' dtype (float32, float16, or a 2-byte integer type holding
            bfloat16 bits).
        causal: bottom-right aligned mask.
        block_q, block_k: the tile of the skip decision (``block_q`` unused in decode).
        aligned: every array's data starts on a 16-byte boundary and is C-contiguous (the
            vector loads of the v2 kernels need it).
        split_tiles, n_splits: decode's split-KV chunking (``tiling``'s by default).
        seeded: decode's seeded skip test (``decode_seed="sink"``, docs/DESIGN.md §3.5): a
            chunk that does not start at key tile 0 scores that tile itself and tests its
            tiles against ``max(m_r, s0_r)``; ``False`` (``"none"``): against ``m_r`` only.
            Every decode version honours it; prefill ignores it (stored as ``False``).
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    dqk: int
    dv: int
    dtype: np.dtype
    causal: bool
    block_q: int
    block_k: int
    aligned: bool = True
    split_tiles: int = 0
    n_splits: int = 0
    seeded: bool = True

    @classmethod
    def of(cls, q_shape, k_shape, v_shape, dtype, causal, block_q, block_k, *, aligned=True,
           split_tiles=None, n_splits=None, seeded=True) -> "Problem":
        """The problem of 4-D shapes ``q (B, Hq, Lq, Dqk)``, ``k``, ``v``."""
        b, hq, lq, dqk = (int(n) for n in q_shape)
        hkv, lk, dv = int(k_shape[1]), int(k_shape[2]), int(v_shape[3])
        if tiling.is_decode(lq):
            split_tiles = tiling.decode_split_tiles(lk, block_k) if split_tiles is None \
                else split_tiles
            n_splits = tiling.decode_num_splits(lk, block_k) if n_splits is None else n_splits
        return cls(b, hq, hkv, lq, lk, dqk, dv, np.dtype(dtype), bool(causal), int(block_q),
                   int(block_k), bool(aligned), int(split_tiles or 0), int(n_splits or 0),
                   bool(seeded) and tiling.is_decode(lq))

    @property
    def decode(self) -> bool:
        """Served by the split-KV decode kernels (``Lq <= tiling.DECODE_MAX_Q_LEN``)."""
        return tiling.is_decode(self.q_len)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Rows of a decode tile: every query position of every query head of a kv group."""
        return (self.q_heads // self.kv_heads) * self.q_len

    @property
    def n_q_tiles(self) -> int:
        return tiling.num_tiles(self.q_len, self.block_q)

    @property
    def n_k_tiles(self) -> int:
        return tiling.num_tiles(self.kv_len, self.block_k)

    @property
    def k_tiles(self) -> int:
        """Key tiles a decode tile visits (the causal horizon of its last query row)."""
        return tiling.visited_k_tiles(self.q_len, self.q_len, self.kv_len, self.block_k,
                                      self.causal)

    @property
    def tile_map_shape(self) -> tuple:
        if self.decode:
            return (self.batch, self.kv_heads, 1, self.n_k_tiles)
        return (self.batch, self.q_heads, self.n_q_tiles, self.n_k_tiles)


@dataclass(frozen=True)
class KernelVersion:
    """What one kernel version module offers the version table (:mod:`.launch`).

    Attributes:
        name: ``"prefill_v2"``; ``phase``: ``"prefill"`` or ``"decode"``; ``number``: 2.
        accepts: ``accepts(problem, **options) -> plan or None``: the version's launch plan
            for ``problem``, or ``None`` where it does not take it (the table then asks the
            next version). ``options`` are the version's own tuning knobs (tests, tuning);
            it ignores the others.
        launch: ``launch(plan, problem, q, k, v, out, tile_map, log_thresh, scale)``:
            launch through Numba's public dispatcher (Numba device arrays, 4-D).
        kernels: ``kernels(plan, problem) -> [(label, dispatcher, argtypes)]``: the kernels
            a call launches, with their argument types (for register reports,
            ``python -m blasst_ref.bench cuda registers``).
        fast: ``fast(plan, problem) -> runner`` or ``None``: a runner for the raw-pointer
            host path (:mod:`.numba_internals`), whose ``run(qp, kp, vp, outp, log_thresh,
            scale)`` launches one call and returns the tile map.
        sources: ``sources(plan, problem, sim=False) -> {file name: text}`` or ``None``:
            the generated kernel source of a plan, for :func:`.launch.dump_source`.
        gpu_plan: ``gpu_plan(problem) -> plan or None``: the plan a GPU would use, on any
            machine (the simulator's defaults differ); ``None``: ``accepts`` is that.
    """

    name: str
    phase: str
    number: int
    accepts: Callable[..., Any]
    launch: Callable[..., None]
    kernels: Callable[..., list]
    fast: Callable[..., Any] | None = None
    sources: Callable[..., dict] | None = None
    gpu_plan: Callable[..., Any] | None = None

    def plan_on_gpu(self, problem):
        """The plan a GPU would use for ``problem`` (``None``: this version does not take
        it)."""
        return (self.gpu_plan or self.accepts)(problem)


def pow2_floor(n: int) -> int:
    """The largest power of two ``<= max(n, 1)``."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def pow2_ceil(n: int) -> int:
    """The smallest power of two ``>= max(n, 1)``."""
    return 1 << (max(1, int(n)) - 1).bit_length()
