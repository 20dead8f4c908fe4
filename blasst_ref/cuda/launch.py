"""Which kernel version serves a call, and how it is launched (llm.c ``dev/cuda`` style).

The kernels live one version per module, numbered in the order they were written; each
module opens with what it does differently and what it measured (the history is in
docs/BENCHMARKS.md):

=====================  =======  ===========================================================
module                 phase    takes
=====================  =======  ===========================================================
:mod:`.prefill_v3`     prefill  tensor cores: float16 / bfloat16, ``Dqk = Dv`` in {64, 128},
                                aligned arrays, a real GPU
:mod:`.prefill_v2`     prefill  ``Dqk = Dv`` in {64, 128}, default tiles, aligned arrays
:mod:`.prefill_v1`     prefill  any shape whose tile fits (the catch-all)
:mod:`.decode_v3`      decode   tensor cores: float16 / bfloat16, ``Dqk = Dv`` in {64, 128},
                                at most 16 rows per kv group, aligned arrays, a real GPU
:mod:`.decode_v2`      decode   16-byte-vector head dims, aligned arrays
:mod:`.decode_v1`      decode   any shape whose score tile fits (the catch-all)
=====================  =======  ===========================================================

plus :mod:`.combine` (the split-KV merge every decode version ends with). Every version
makes the same skip decisions (the rule is :mod:`blasst_ref.rule`'s; the tests compare tile
maps with the reference).

The version table
-----------------
:data:`VERSIONS` lists each module's :class:`~.problem.KernelVersion`, newest first.
:func:`choose` asks the versions of a call's phase in that order and takes the first whose
``accepts(problem, **options)`` returns a plan; ``version=N`` asks only version N (and says
so when it does not take the shape). The last version of each phase takes every shape that
fits at all, and raises the ``ValueError`` that explains a shape no version can take.

How to add a version
--------------------
1. Write ``blasst_ref/cuda/<phase>_v<N>.py``: a header (what it does differently, what it
   measured), ``accepts(problem, **options) -> plan | None`` (``None`` for every shape,
   dtype or alignment it does not handle, and for options it does not know that force
   another version), ``launch(plan, problem, q, k, v, out, tile_map, log_thresh, scale)``
   through Numba's dispatcher, and optionally ``fast(plan, problem)`` (a runner for the
   raw-pointer host path, built on :class:`.numba_internals.RawKernel`) and
   ``sources(plan, problem)`` (its generated source), ending with ``VERSION =
   KernelVersion(...)``. Vote with :mod:`.rule`'s compiled functions; use
   :mod:`.numba_internals` for anything Numba does not offer publicly.
2. Put its ``VERSION`` at the head of its phase in :data:`VERSIONS`.
3. Add ``N`` to ``VERSIONS`` in tests/test_cuda_prefill.py or tests/test_cuda_decode.py:
   every kernel test then runs it against the reference, tile map by tile map.

Host paths
----------
* **general** (:func:`launch_prefill`, :func:`launch_decode`): Numba device arrays and
  Numba's public dispatcher; every version, the simulator, any array library.
* **fast** (:func:`fast_plan`): runners cached per shape, dtype, mask and tiles, raw launches
  from data pointers (:mod:`.numba_internals`, ~0.1 ms of host time per call instead of
  ~0.5-0.8 ms); only versions with a ``fast`` runner, only where the internals are there.
  Where one is missing, the general path runs instead (:mod:`.numba_internals` explains).

Generated source
----------------
prefill v2's kernel body and decode v2's score step are generated Python;
:func:`dump_source` (or ``python -m blasst_ref.cuda dump-source prefill_v2 --dir kernels``)
writes the text of a version for a shape to files you can open.
"""

from __future__ import annotations

import os

import numpy as np
from numba import config

from . import (decode_v1, decode_v2, decode_v3, numba_internals, prefill_v1, prefill_v2,
               prefill_v3)
from .intrinsics import aligned16
from .problem import KernelVersion, Problem

__all__ = ["VERSIONS", "choose", "dump_source", "fast_plan", "launch_decode",
           "launch_prefill", "version"]

#: The kernel versions, newest first within each phase (see "How to add a version").
VERSIONS: list[KernelVersion] = [
    prefill_v3.VERSION,
    prefill_v2.VERSION,
    prefill_v1.VERSION,
    decode_v3.VERSION,
    decode_v2.VERSION,
    decode_v1.VERSION,
]


def version(name: str) -> KernelVersion:
    """The table entry called ``name`` (``"prefill_v2"``)."""
    for entry in VERSIONS:
        if entry.name == name:
            return entry
    raise ValueError(f"no kernel version {name!r}; there are "
                     f"{', '.join(e.name for e in VERSIONS)}")


def choose(problem: Problem, number: int | None = None, **options):
    """``(KernelVersion, plan)`` for ``problem``: the newest version of its phase that takes
    it, or version ``number`` (``ValueError`` where that one does not)."""
    phase = "decode" if problem.decode else "prefill"
    table = [e for e in VERSIONS if e.phase == phase]
    if number is not None:
        table = [e for e in table if e.number == number]
        if not table:
            raise ValueError(f"there is no {phase} kernel version {number}")
        p = table[0].accepts(problem, **options)
        if p is None:
            raise ValueError(f"{phase} v{number} does not apply to this shape / alignment")
        return table[0], p
    for entry in table:
        p = entry.accepts(problem, **options)
        if p is not None:
            return entry, p
    raise ValueError(f"no {phase} kernel version takes this problem: {problem}")


def _contiguous(*arrays) -> bool:
    """Whether every array is C-contiguous (the v2 kernels read them as flat vectors)."""
    for a in arrays:
        check = getattr(a, "is_c_contiguous", None)
        if check is not None and not check():
            return False
    return True


def _run(problem, number, options, arrays, log_thresh, scale):
    """Launch the chosen version; where it hits a missing internal, stop using the
    internals (:func:`.numba_internals.disable`) and choose again without them."""
    entry, p = choose(problem, number, **options)
    try:
        entry.launch(p, problem, *arrays, log_thresh, scale)
    except numba_internals.InternalsMissing as exc:
        numba_internals.disable(str(exc))
        entry, p = choose(problem, number, **options)
        entry.launch(p, problem, *arrays, log_thresh, scale)
    return entry.name


def launch_prefill(q, k, v, out, tile_map, log_thresh, causal, scale, block_q, block_k,
                   *, threads_per_row=None, d_chunk=None, version=None, v2_layout=None):
    """BLASST prefill on the GPU, in place, through Numba's dispatcher.

    Args:
        q: ``(B, Hq, Lq, Dqk)``, k: ``(B, Hkv, Lk, Dqk)``, v: ``(B, Hkv, Lk, Dv)``: Numba
            device arrays (``cuda.as_cuda_array`` views of the caller's memory), C-contiguous,
            one dtype, float32 or float16.
        out: ``(B, Hq, Lq, Dv)``, q's dtype, written completely.
        tile_map: int8 ``(B, Hq, n_q_tiles, n_k_tiles)``, zero on entry; visited tiles get
            1 (computed) or 2 (skipped), exactly as ``reference.blasst_attention_reference``.
        log_thresh: :func:`blasst_ref.rule.log_threshold` of the threshold.
        causal: bottom-right aligned mask. scale: score scale.
        block_q, block_k: the tile of the skip decision.
        threads_per_row, d_chunk: version 1's launch plan (:func:`.prefill_v1.plan`; either
            implies ``version=1``); for tests and tuning.
        version: a version number, or ``None``: the newest that takes the shape
            (:func:`choose`).
        v2_layout: ``(TR, TC)`` thread layout of version 2 (tests and tuning).

    Accumulates in float32. The launch is asynchronous (Numba's default stream). Returns
    the name of the version that ran (``"prefill_v3"``).
    """
    problem = Problem.of(q.shape, k.shape, v.shape, q.dtype, causal, block_q, block_k,
                         aligned=aligned16(q, k, v, out) and _contiguous(q, k, v, out))
    options = {"threads_per_row": threads_per_row, "d_chunk": d_chunk, "layout": v2_layout}
    if threads_per_row is not None or d_chunk is not None:
        version = 1 if version is None else version
    if problem.batch * problem.q_heads * problem.n_q_tiles == 0:
        return choose(problem, version, **options)[0].name  # (refuses a version that does
        # not apply)
    return _run(problem, version, options, (q, k, v, out, tile_map), log_thresh, scale)


def launch_decode(q, k, v, out, tile_map, log_thresh, causal, scale, block_k, split_tiles,
                  n_splits, *, threads=None, chunk=None, version=None, seeded=True):
    """BLASST split-KV decode on the GPU, through Numba's dispatcher.

    Args:
        q: ``(B, Hq, Lq, Dqk)`` with ``Lq <= 16``; k: ``(B, Hkv, Lk, Dqk)``;
            v: ``(B, Hkv, Lk, Dv)``: Numba device arrays, C-contiguous, one dtype
            (float32 or float16).
        out: ``(B, Hq, Lq, Dv)``, same dtype, written completely.
        tile_map: int8 ``(B, Hkv, 1, n_k_tiles)``, zero on entry; 1 computed / 2 skipped
            (tiles past the causal horizon stay 0), exactly as the reference.
        log_thresh: :func:`blasst_ref.rule.log_threshold` of the threshold.
        causal: bottom-right aligned mask. scale: score scale (applied to q in float32).
        block_k: keys per tile.
        split_tiles, n_splits: ``tiling.decode_split_tiles`` / ``tiling.decode_num_splits``
            of ``(Lk, block_k)`` (any values with ``n_splits * split_tiles >= n_k_tiles``
            work; the reference uses those of ``tiling``).
        threads: threads per block of the split kernel (a multiple of 32, or any power of
            two under the simulator); default: each version's (32 on the simulator).
        chunk: force the head-dim chunk ``DC`` of version 1 (implies ``version=1``).
        version: a version number, or ``None``: the newest that takes the shape.
        seeded: the seeded skip test (``decode_seed="sink"``, the default; docs/DESIGN.md
            §3.5), or ``False`` for the unseeded one (``"none"``).

    Accumulates in float32. Launches two kernels on the default stream; returns the name of
    the version that ran (``"decode_v3"``).
    """
    problem = Problem.of(q.shape, k.shape, v.shape, q.dtype, causal, 0, block_k,
                         aligned=aligned16(q, k, v), split_tiles=split_tiles,
                         n_splits=n_splits, seeded=seeded)
    if n_splits * split_tiles < problem.n_k_tiles:
        raise ValueError(f"{n_splits} splits of {split_tiles} tiles do not cover "
                         f"{problem.n_k_tiles} tiles")
    threads = threads or (32 if config.ENABLE_CUDASIM else None)  # simulator: 1 thread each
    if chunk is not None:
        version = 1 if version is None else version
    return _run(problem, version, {"threads": threads, "chunk": chunk},
                (q, k, v, out, tile_map), log_thresh, scale)


_FAST: dict = {}
_MAX_FAST = 64


def fast_plan(q_shape, k_shape, v_shape, dtype, causal, block_q, block_k, seeded=True):
    """A runner for the raw-pointer host path (``runner.run(qp, kp, vp, outp, log_thresh,
    scale) -> tile_map``) of 4-D shapes on 16-byte aligned arrays, cached per shape, dtype,
    mask, tiles and decode seed (``seeded``: docs/DESIGN.md §3.5's seeded decode test; a
    call with a cached shape costs one dict lookup); ``None`` where the
    version that serves the problem has none, no version takes it, or the internals are
    missing (the general path then runs; :mod:`.numba_internals`)."""
    if not numba_internals.available():
        return None
    key = (q_shape, k_shape, v_shape, dtype, causal, block_q, block_k, bool(seeded))
    runner = _FAST.get(key, False)
    if runner is False:
        runner = _build_fast(Problem.of(q_shape, k_shape, v_shape, dtype, causal, block_q,
                                        block_k, seeded=seeded))
        if runner is False:  # an internal failed: not cached, the general path from now on
            return None
        if len(_FAST) >= _MAX_FAST:
            _FAST.clear()
        _FAST[key] = runner
    return runner


def _build_fast(problem: Problem):
    try:
        entry, p = choose(problem)
    except ValueError:  # the general path raises it with the caller's arrays
        return None
    if entry.fast is None:
        return None
    try:
        return entry.fast(p, problem)
    except numba_internals.InternalsMissing as exc:
        numba_internals.disable(str(exc))
        return False


def dump_source(name: str, directory=None, *, batch=1, q_heads=32, kv_heads=8, q_len=None,
                kv_len=4096, dqk=128, dv=None, dtype="float16", causal=True, block_q=128,
                block_k=64, simulator=False, seeded=True) -> dict:
    """The generated kernel source of version ``name`` for one shape, to read.

    Args:
        name: a version with generated source: ``"prefill_v2"`` (the whole kernel) or
            ``"decode_v2"`` (its score step ``_kscore``).
        directory: where to write the files (created); ``None`` writes nothing.
        batch ... block_k: the shape (``q_len`` defaults to 4096 for prefill, 1 for decode;
            ``dv`` to ``dqk``); the plan is the GPU's, whatever machine this is.
        simulator: the simulator's variant of the text instead (prefill v2 differs in its
            reduction scratch).

    Returns:
        ``{path: text}`` (``{file name: text}`` without ``directory``).
    """
    entry = version(name)
    if entry.sources is None:
        raise ValueError(f"{name} has no generated source: its kernel is written out in "
                         f"blasst_ref/cuda/{name}.py")
    if q_len is None:
        q_len = 1 if entry.phase == "decode" else 4096
    dv = dqk if dv is None else dv
    problem = Problem.of((batch, q_heads, q_len, dqk), (batch, kv_heads, kv_len, dqk),
                         (batch, kv_heads, kv_len, dv), np.dtype(dtype), causal, block_q,
                         block_k, seeded=seeded)
    if problem.decode != (entry.phase == "decode"):
        raise ValueError(f"{name} serves {entry.phase}, and q_len={q_len} is "
                         f"{'decode' if problem.decode else 'prefill'}")
    p = entry.plan_on_gpu(problem)
    if p is None:
        raise ValueError(f"{name} does not take this shape: {problem}")
    texts = entry.sources(p, problem, sim=simulator)
    if directory is None:
        return texts
    os.makedirs(directory, exist_ok=True)
    out = {}
    for fname, text in texts.items():
        path = os.path.join(directory, fname)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        out[path] = text
    return out
