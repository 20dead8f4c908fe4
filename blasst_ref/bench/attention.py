"""``python -m blasst_ref.bench attention``: time BLASST attention against dense and PyTorch.

What one run does, for every *case* (a problem size, causal or not, prefill or decode):

1. builds a seeded LLM-like input (:func:`blasst_ref.workloads.llm_like`: attention sinks,
   a local window, heavy hitters) or, with ``--workload random``, Gaussian q/k/v;
2. resolves the thresholds: a number is used as is; ``auto:0.75`` searches the threshold
   that skips about 75% of the tiles *of this input* (:func:`find_threshold`), because
   sparsity, not the threshold, is the axis that speedups are read against;
3. computes the exact float64 result once (:func:`blasst_ref.bench.oracle.dense_oracle`);
4. times every (backend, threshold) variant — one warm-up call that includes JIT compilation
   and is excluded, then the median of ``--repeat`` interleaved calls
   (:mod:`blasst_ref.bench.timing`) — and prints one table per case.

Backends (``--backend``):

* ``reference``: the numpy spec, tile by tile. Slow: timed once, no repeats.
* ``cpu``: ``blasst_ref.attention(..., backend="cpu")``, the Numba kernels.
* ``cpu-noskip``: the same kernel with the skip test compiled out
  (``blasst_ref.cpu.blasst_attention(..., skip_test=False)``); thresh=0 only. Issue #2 asks
  that ``cpu`` at thresh=0 costs at most 3% more than this.
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same arrays
  (thresh=0 only; it has no threshold). Optional: used only where ``import torch`` works.
* ``cuda``: ``blasst_ref.attention(..., backend="cuda")`` on device copies of the input
  (timed with a device synchronisation), where ``numba.cuda.is_available()``.
* ``torch-flash``, ``torch-cudnn``: PyTorch SDPA on the GPU, on the *same* device tensors,
  pinned to its FlashAttention or cuDNN backend (``torch.nn.attention.sdpa_kernel``);
  float16/bfloat16 only (those backends take no float32). Added automatically next to
  ``cuda`` when torch has CUDA. A backend that refuses the input (dtype, GQA) is reported in
  the notes and left out, never silently replaced.

GPU variants are timed as the mean of ``n`` back-to-back calls followed by one
synchronisation (``n`` chosen so that a sample lasts a few milliseconds), the way GPU
kernels are usually timed: a single call plus a synchronisation would add the
launch-and-wait round trip to kernels that take 0.1 ms. The median is over such samples.

``--dtype``: ``float32`` (default), ``float16``, ``float64`` (CPU only) and ``bfloat16``
(GPU rows only, on torch bfloat16 tensors: numpy has no bfloat16; the inputs are rounded to
bfloat16 once and every row, the oracle included, sees those values; ``auto:S`` thresholds
are searched with the cuda backend).

Columns: ``ms`` the median wall time; ``GFLOP/s`` the *dense* FLOP count
(:func:`attention_flops`) over that time, so a sparse row's figure is the dense-equivalent
throughput; ``sparsity`` skipped / visited tiles (``return_stats``); ``rel.err``
``||out - exact|| / ||exact||``; ``vs dense`` the backend's own thresh=0 time over this
row's time; ``vs torch`` PyTorch's time over this row's time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import tiling
from . import machine as machine_mod
from .oracle import dense_oracle, rel_l2
from .timing import Variant, calls_needed, measure

BACKENDS = ("reference", "cpu", "cpu-noskip", "torch", "cuda", "torch-flash", "torch-cudnn")
#: GPU peers of the cuda backend: PyTorch SDPA pinned to one of its GPU backends
TORCH_GPU = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION"}
#: a GPU sample lasts about this long (back-to-back calls, one synchronisation)
GPU_SAMPLE_MS = 5.0

# ---------------------------------------------------------------------------------------
# FLOP count (DESIGN.md §4)


def visible_pairs(lq: int, lk: int, causal: bool) -> int:
    """Number of (query row, key) pairs that attention computes, i.e. ``sum_i visible_i``.

    Without a mask every row sees every key: ``Lq * Lk``.

    With bottom-right causal masking row ``i`` (``0 <= i < Lq``) sees keys
    ``j <= i + (Lk - Lq)``, i.e. ``n_i = max(0, i + Lk - Lq + 1)`` keys (never more than
    ``Lk``, since ``i <= Lq - 1``). The rows with ``n_i > 0`` are ``i >= max(0, Lq - Lk)``
    and their counts run ``t0, t0 + 1, ..., Lk`` with ``t0 = max(0, Lq - Lk) + Lk - Lq + 1``,
    an arithmetic series::

        pairs = (t0 + Lk) * (Lk - t0 + 1) / 2

    which is ``Lq * (2 Lk - Lq + 1) / 2`` when ``Lq <= Lk`` (``L (L + 1) / 2`` for square
    prefill, ``Lk`` for one decode row) and ``Lk (Lk + 1) / 2`` when ``Lq > Lk``.
    """
    if lq <= 0 or lk <= 0:
        return 0
    if not causal:
        return lq * lk
    t0 = max(0, lq - lk) + lk - lq + 1
    return (t0 + lk) * (lk - t0 + 1) // 2


def attention_flops(b: int, hq: int, lq: int, lk: int, dqk: int, dv: int, causal: bool) -> int:
    """Dense attention FLOPs, DESIGN.md §4: ``4 * B * Hq * Lq * Lk_visible * (Dqk + Dv) / 2``.

    Each visible (row, key) pair costs one ``Dqk``-long dot product for the score
    (``2 * Dqk`` FLOPs: a multiply and an add per element) and one ``Dv``-long
    multiply-add into the output (``2 * Dv``). With ``Lq * Lk_visible`` = :func:`visible_pairs`
    counted exactly (the causal triangle, including its diagonal) this is::

        flops = 2 * B * Hq * visible_pairs(Lq, Lk, causal) * (Dqk + Dv)

    which for ``Dqk == Dv == D`` and no mask is the familiar ``4 * B * H * Lq * Lk * D``.
    Softmax (exp, max, sum) is not counted, as in FlashAttention's papers. It is the dense
    count: BLASST rows are measured against the same number, so their GFLOP/s is the
    dense-equivalent throughput (skipped work counts as done).
    """
    return 2 * b * hq * visible_pairs(lq, lk, causal) * (dqk + dv)


def dense_kv_bytes(case: "Case") -> int:
    """Bytes of K and V that dense attention reads once: ``B * Hkv * Lk * (Dqk + Dv) *
    itemsize``. Decode is memory-bound, so ``kv_bytes / time`` (the ``GB/s`` column of decode
    tables) is its figure of merit; a skipped tile does not read its V rows, so a sparse
    row's figure is dense-equivalent, like GFLOP/s."""
    return case.b * case.hkv * case.lk * (case.dqk + case.dv) * dtype_itemsize(case.dtype)


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a ``--dtype`` name (``bfloat16`` is not a numpy dtype)."""
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def ideal_prefill_speedup(sparsity: float) -> float:
    """DESIGN §4: the QK product always runs, exp and P.V are skipped: ``2 / (2 - s)``."""
    return 2.0 / (2.0 - sparsity)


# ---------------------------------------------------------------------------------------
# thresholds: numbers, or ``auto:S`` (search the threshold that reaches sparsity S)


@dataclass(frozen=True)
class ThreshSpec:
    """A ``--thresh`` value: ``value`` (a threshold) or ``target`` (``auto:S``, a sparsity)."""

    value: float | None = None
    target: float | None = None

    def __str__(self) -> str:
        return f"auto:{self.target:g}" if self.target is not None else f"{self.value:g}"


def parse_thresh(text: str) -> ThreshSpec:
    """argparse ``type=`` for ``--thresh``: a number in ``[0, 1)`` or ``auto:S``, ``S`` in
    ``[0, 1)`` (``auto:0`` is thresh 0)."""
    t = text.strip().lower()
    if t.startswith("auto:"):
        try:
            s = float(t[5:])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected auto:S with S a target sparsity in [0, 1), e.g. auto:0.75"
            ) from None
        if not 0.0 <= s < 1.0:
            raise argparse.ArgumentTypeError(f"{text!r}: the target sparsity must be in [0, 1)")
        return ThreshSpec(value=0.0) if s == 0 else ThreshSpec(target=s)
    try:
        x = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a threshold is a number in [0, 1) (e.g. 0.001) or auto:S (e.g. auto:0.75)"
        ) from None
    if not 0.0 <= x < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold must be in [0, 1)")
    return ThreshSpec(value=x)


@dataclass
class ThresholdSearch:
    """Result of :func:`find_threshold`.

    Attributes:
        thresh: the threshold found (BLASST's lambda, in ``(0, 1)``).
        sparsity: the sparsity it gives on the searched input.
        target: the sparsity asked for.
        evaluations: attention calls made by this search (cached points are free).
        reached: ``|sparsity - target| <= tol``; False when the target lies in a jump of the
            (step-shaped) sparsity curve or beyond the largest reachable sparsity.
    """

    thresh: float
    sparsity: float
    target: float
    evaluations: int
    reached: bool


def find_threshold(q, k, v, target: float, *, causal: bool, backend: str = "cpu",
                   block_q: int | None = None, block_k: int | None = None,
                   tol: float = 0.02, max_evals: int = 40, cache: dict | None = None,
                   progress=None) -> ThresholdSearch:
    """Search the threshold whose tile sparsity on ``(q, k, v)`` is ``target`` +- ``tol``.

    Sparsity is a non-decreasing step function of the threshold (DESIGN §9 tests that), and
    useful thresholds span decades (``1e-6 .. 0.5``), so this bisects on ``log10(thresh)``
    between ``1e-10`` and ``1 - 1e-9``, calling ``blasst_ref.attention(..., backend=backend,
    return_stats=True)`` at each midpoint, until the sparsity is within ``tol`` of the
    target or the bracket is narrower than 0.001 decade; then it returns the closest point.

    Args:
        q, k, v: the input, as for :func:`blasst_ref.attention`.
        target: sparsity in ``(0, 1)``.
        causal, block_q, block_k: as for the runs the threshold is meant for (the tiling
            decides the sparsity).
        backend: the backend that measures sparsity (``"cpu"``; ``"reference"`` is slow).
        tol: accepted ``|sparsity - target|``.
        max_evals: cap on attention calls.
        cache: a dict ``{log10(thresh): sparsity}`` shared between searches on the *same*
            input (e.g. ``auto:0.5`` then ``auto:0.75``): its points narrow the bracket.
        progress: called with ``1`` after every evaluation (e.g. ``tqdm.update``).
    """
    from .. import attention

    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {target!r}")
    cache = {} if cache is None else cache
    evals = 0

    def sparsity_at(x: float) -> float:
        nonlocal evals
        if x not in cache:
            _, st = attention(q, k, v, 10.0 ** x, causal=causal, backend=backend,
                              block_q=block_q, block_k=block_k, return_stats=True)
            cache[x] = st.sparsity
            evals += 1
            if progress:
                progress(1)
        return cache[x]

    lo, hi = -10.0, math.log10(1.0 - 1e-9)
    # narrow the bracket with what earlier searches on this input already know
    for x, s in cache.items():
        if s < target and x > lo:
            lo = x
        elif s >= target and x < hi:
            hi = x
    while evals < max_evals:
        best = min(cache.items(), key=lambda kv: abs(kv[1] - target), default=None)
        if best is not None and abs(best[1] - target) <= tol:
            break
        if hi - lo < 1e-3:
            break
        mid = 0.5 * (lo + hi)
        if sparsity_at(mid) < target:
            lo = mid
        else:
            hi = mid
    if not cache:  # max_evals == 0
        sparsity_at(0.5 * (lo + hi))
    x, s = min(cache.items(), key=lambda kv: abs(kv[1] - target))
    return ThresholdSearch(thresh=10.0 ** x, sparsity=s, target=target, evaluations=evals,
                           reached=abs(s - target) <= tol)


# ---------------------------------------------------------------------------------------
# cases and presets


@dataclass(frozen=True)
class Case:
    """One problem to benchmark: sizes, mask, input, thresholds.

    Shapes: q ``(b, hq, lq, dqk)``, k ``(b, hkv, lk, dqk)``, v ``(b, hkv, lk, dv)``.
    ``phase`` is ``"decode"`` iff ``lq <= tiling.DECODE_MAX_Q_LEN`` (the split-KV path).
    """

    title: str
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    dqk: int
    dv: int
    causal: bool
    thresholds: tuple[ThreshSpec, ...]
    workload: str = "llm"
    seed: int = 0
    dtype: str = "float32"
    knobs: tuple[tuple[str, float], ...] = ()  #: llm_like knobs, e.g. (("peakedness", 2.0),)

    @property
    def phase(self) -> str:
        return "decode" if tiling.is_decode(self.lq) else "prefill"

    def sizes(self) -> str:
        return (f"B={self.b} Hq={self.hq} Hkv={self.hkv} Lq={self.lq} Lk={self.lk} "
                f"Dqk={self.dqk} Dv={self.dv} {'causal' if self.causal else 'no mask'} "
                f"{self.dtype}")


def _specs(*texts: str) -> tuple[ThreshSpec, ...]:
    return tuple(parse_thresh(t) for t in texts)


#: Sizes of issue #2 (DESIGN §4). Prefill sparse and decode use ``auto:`` thresholds so that
#: "about 75% of the tiles skipped" holds on whatever input llm_like generates.
PRESETS: dict[str, tuple[Case, ...]] = {
    "issue2-dense": (
        Case("prefill dense, causal", 1, 8, 8, 4096, 4096, 64, 64, True, _specs("0")),
        Case("prefill dense, no mask", 1, 8, 8, 4096, 4096, 64, 64, False, _specs("0")),
    ),
    "issue2-prefill": (
        Case("prefill sparse, causal", 1, 8, 8, 8192, 8192, 64, 64, True,
             _specs("0", "auto:0.5", "auto:0.75", "auto:0.9")),
    ),
    "issue2-decode": (
        Case("decode sparse, GQA 32/8", 1, 32, 8, 1, 32768, 128, 128, True,
             _specs("0", "auto:0.5", "auto:0.75")),
    ),
    # a few seconds: to check that everything runs (not for numbers)
    "smoke": (
        Case("smoke prefill", 1, 2, 1, 256, 256, 32, 32, True, _specs("0", "auto:0.5")),
        Case("smoke decode", 1, 4, 2, 1, 2048, 32, 32, True, _specs("0", "auto:0.5")),
    ),
}
PRESETS["issue2"] = PRESETS["issue2-dense"] + PRESETS["issue2-prefill"] + PRESETS["issue2-decode"]

#: Defaults per phase when sizes are not given: the issue's sizes.
PHASE_DEFAULTS = {
    "prefill": dict(B=1, Hq=8, Hkv=None, L=[4096], Lq=None, D=64),
    "decode": dict(B=1, Hq=32, Hkv=8, L=[32768], Lq=1, D=128),
}


def make_inputs(case: Case):
    """Seeded ``(q, k, v)`` for a case: :func:`blasst_ref.workloads.llm_like` (``"llm"``) or
    standard normal (``"random"``, nearly uniform attention: little to skip)."""
    if case.dtype == "bfloat16":  # float32 arrays holding bfloat16 values (rounded by torch)
        import torch

        q, k, v = make_inputs(replace(case, dtype="float32"))
        return tuple(torch.from_numpy(x).to(torch.bfloat16).float().numpy() for x in (q, k, v))
    if case.workload == "llm":
        from ..workloads import llm_like  # imported lazily: written alongside this module

        return llm_like(case.b, case.hq, case.hkv, case.lq, case.lk, case.dqk,
                        v_dim=case.dv, seed=case.seed, dtype=case.dtype, **dict(case.knobs))
    rng = np.random.default_rng(case.seed)
    dt = np.dtype(case.dtype)
    q = rng.standard_normal((case.b, case.hq, case.lq, case.dqk)).astype(dt)
    k = rng.standard_normal((case.b, case.hkv, case.lk, case.dqk)).astype(dt)
    v = rng.standard_normal((case.b, case.hkv, case.lk, case.dv)).astype(dt)
    return q, k, v


# ---------------------------------------------------------------------------------------
# backends


def cpu_available() -> tuple[bool, str]:
    """Whether ``blasst_ref.cpu`` imports (the Numba kernels), and why not."""
    try:
        from ..cpu import blasst_attention  # noqa: F401
    except Exception as exc:  # ImportError, or a numba error while defining the kernels
        return False, f"blasst_ref.cpu does not import: {type(exc).__name__}: {exc}"
    return True, ""


def torch_available() -> tuple[bool, str]:
    try:
        import torch  # noqa: F401
    except Exception as exc:
        return False, f"torch is not installed ({type(exc).__name__}: {exc})"
    return True, ""


def cuda_available() -> tuple[bool, str]:
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        # The simulator runs every GPU thread as a Python thread: right for tests, useless
        # (minutes per call) for timings and the demo.
        return False, "NUMBA_ENABLE_CUDASIM=1: Numba's CUDA simulator is not a GPU to time"
    try:
        from numba import cuda

        if cuda.is_available():
            return True, ""
        return False, "numba.cuda.is_available() is False (no CUDA GPU or driver)"
    except Exception as exc:
        return False, f"numba.cuda does not import: {exc}"


def torch_cuda_available() -> tuple[bool, str]:
    ok, why = torch_available()
    if not ok:
        return ok, why
    import torch

    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (CPU-only torch, or no GPU)"
    return True, ""


def backend_available(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for a ``--backend`` name."""
    if name in ("cpu", "cpu-noskip"):
        return cpu_available()
    if name == "torch":
        return torch_available()
    if name == "cuda":
        return cuda_available()
    if name in TORCH_GPU:
        return torch_cuda_available()
    return True, ""


def torch_gpu_sdpa_call(q, k, v, *, causal: bool, scale: float, backend: str):
    """``(call, note)`` running SDPA on CUDA tensors ``q, k, v`` pinned to ``backend``
    (a :data:`TORCH_GPU` key), or ``(None, reason)`` when that backend refuses the input.

    GQA: ``enable_gqa=True`` first; if the backend refuses it, the kv heads are repeated once
    before timing (and the note says so: torch then reads more K/V bytes than we do).
    Causal as :func:`torch_sdpa_call` (``is_causal`` for ``Lq == Lk``, nothing for a
    one-row decode, else an explicit bottom-right boolean mask)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    kind = getattr(SDPBackend, TORCH_GPU[backend])
    hq, hkv, lq, lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kwargs: dict[str, Any] = {"scale": scale}
    notes = []
    if causal:
        offset = tiling.causal_offset(lq, lk)
        if lq == lk:
            kwargs["is_causal"] = True
        elif offset < lk - 1:
            mask = torch.arange(lk, device=q.device)[None, :] <= \
                torch.arange(lq, device=q.device)[:, None] + offset
            kwargs["attn_mask"] = mask
            notes.append("explicit bottom-right mask")
    tries = [("enable_gqa", q, k, v, {"enable_gqa": True})] if hq != hkv else \
        [("", q, k, v, {})]
    if hq != hkv:
        rk = k.repeat_interleave(hq // hkv, dim=1).contiguous()
        rv = v.repeat_interleave(hq // hkv, dim=1).contiguous()
        tries.append(("GQA via repeat_interleave before timing", q, rk, rv, {}))
    errors = []
    for label, tq, tk, tv, extra in tries:
        kw = dict(kwargs, **extra)

        def call(tq=tq, tk=tk, tv=tv, kw=kw):
            with torch.inference_mode(), sdpa_kernel(kind):
                return F.scaled_dot_product_attention(tq, tk, tv, **kw)

        try:
            call()
            torch.cuda.synchronize()
        except Exception as exc:  # this backend does not take this input
            errors.append(f"{label or 'plain'}: {str(exc).splitlines()[0][:120]}")
            continue
        return call, "; ".join(notes + ([label] if label and label != "enable_gqa" else []))
    return None, f"{backend} refuses this input ({' | '.join(errors)})"


def _gpu_timed(call, sync, target_ms: float = GPU_SAMPLE_MS):
    """``(timed_fn, n)``: ``timed_fn`` makes ``n`` back-to-back calls (no synchronisation
    between them) so that one sample lasts about ``target_ms``; divide its time by ``n``.
    Also serves as the warm-up (compilation) of ``call``."""
    import time

    call()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    one = (time.perf_counter() - t0) * 1e3
    n = int(min(200, max(1, round(target_ms / max(one, 1e-3)))))

    def timed():
        for _ in range(n):
            call()

    return timed, n


def torch_supports_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa=True`` (torch >= 2.5)."""
    import torch

    x = torch.zeros(1, 2, 1, 4)
    y = torch.zeros(1, 1, 1, 4)
    try:
        torch.nn.functional.scaled_dot_product_attention(x, y, y, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def torch_sdpa_call(q, k, v, *, causal: bool, scale: float):
    """A zero-argument callable running PyTorch SDPA on ``q, k, v`` (numpy, no copy), and a
    note on how GQA and the causal mask were expressed.

    * GQA (``Hq > Hkv``): ``enable_gqa=True`` where this torch has it; else the kv heads are
      repeated with ``repeat_interleave`` once, before timing (torch then reads Hq/Hkv times
      more K/V bytes than we do).
    * causal: torch's ``is_causal`` is aligned top-left, ours bottom-right; they agree for
      ``Lq == Lk``. For ``Lq == 1`` the bottom-right mask hides nothing (no mask is passed);
      otherwise an explicit boolean mask is passed.
    """
    import torch

    F = torch.nn.functional
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v))
    hq, hkv, lq, lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kwargs: dict[str, Any] = {"scale": scale}
    notes = []
    if hq != hkv:
        if torch_supports_gqa():
            kwargs["enable_gqa"] = True
            notes.append("GQA via enable_gqa=True")
        else:
            tk = tk.repeat_interleave(hq // hkv, dim=1).contiguous()
            tv = tv.repeat_interleave(hq // hkv, dim=1).contiguous()
            notes.append("GQA via repeat_interleave of the kv heads before timing")
    if causal:
        offset = tiling.causal_offset(lq, lk)
        if lq == lk:
            kwargs["is_causal"] = True
            notes.append("is_causal=True")
        elif offset >= lk - 1:
            notes.append("causal mask hides nothing at this Lq: no mask")
        else:
            mask = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset
            kwargs["attn_mask"] = torch.from_numpy(mask)
            notes.append("bottom-right causal as an explicit boolean attn_mask")

    def call():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, **kwargs)

    return call, "; ".join(notes)


def _to_device(arrays, dtype=None):
    """Device copies for the cuda backend: torch CUDA tensors if torch has CUDA, else CuPy,
    else numba device arrays. Returns ``(arrays, sync, to_host)``. ``dtype="bfloat16"``:
    torch bfloat16 tensors (torch only)."""
    try:
        import torch

        if torch.cuda.is_available():
            dev = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays]
            if dtype == "bfloat16":
                dev = [t.to(torch.bfloat16) for t in dev]
            return dev, torch.cuda.synchronize, lambda x: x.float().cpu().numpy()
    except Exception:
        pass
    try:
        import cupy

        dev = [cupy.asarray(a) for a in arrays]
        return dev, cupy.cuda.Device().synchronize, cupy.asnumpy
    except Exception:
        pass
    from numba import cuda

    # numba's host-side device-array API is being deprecated upstream (DESIGN §3): only a
    # fallback here, for machines with neither torch-CUDA nor CuPy.
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
    return dev, cuda.synchronize, lambda x: x.copy_to_host()


# ---------------------------------------------------------------------------------------
# running one case


@dataclass
class CaseResult:
    """Rows of one case, plus notes printed under its table."""

    case: Case
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _vname(backend: str, thresh: float) -> str:
    """The unique name of one timed variant."""
    return f"{backend}@{float(thresh)!r}"


def _tile_sparsity(tile_map) -> tuple[float, int, int]:
    from ..reference import NOT_VISITED, SKIPPED

    tm = np.asarray(tile_map)
    visited = int((tm != NOT_VISITED).sum())
    skipped = int((tm == SKIPPED).sum())
    return (skipped / visited if visited else 0.0), skipped, visited


def resolve_thresholds(case: Case, q, k, v, *, block_q, block_k, tol, search_backend,
                       progress_factory=None) -> tuple[list[tuple[float, str]], list[str]]:
    """Turn the case's specs into ``[(thresh, label)]`` (thresh 0 first, always present: it
    is every backend's baseline) and notes about ``auto:`` searches."""
    out: list[tuple[float, str]] = [(0.0, "0")]
    notes = []
    cache: dict = {}
    for spec in case.thresholds:
        if spec.target is None:
            if all(t != spec.value for t, _ in out):
                out.append((spec.value, f"{spec.value:g}"))
            continue
        bar = progress_factory(f"auto:{spec.target:g} search") if progress_factory else None
        res = find_threshold(q, k, v, spec.target, causal=case.causal, backend=search_backend,
                             block_q=block_q, block_k=block_k, tol=tol, cache=cache,
                             progress=None if bar is None else bar.update)
        if bar is not None:
            bar.close()
        notes.append(
            f"auto:{spec.target:g} -> thresh {res.thresh:.3g} (sparsity {res.sparsity:.3f} "
            f"on this input, {res.evaluations} {search_backend} calls"
            + ("" if res.reached else f"; target not reached within {tol:g}") + ")"
        )
        if all(t != res.thresh for t, _ in out):
            out.append((res.thresh, str(spec)))
    return out, notes


def run_case(case: Case, backends: list[str], *, repeat: int, block_q=None, block_k=None,
             tol: float = 0.02, with_error: bool = True, machine_line: str = "",
             quiet: bool = False) -> CaseResult:
    """Benchmark one case on ``backends``; returns its rows (see the module docstring)."""
    from tqdm.auto import tqdm

    from .. import attention

    def bar(desc, total=None):
        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                    disable=True if quiet else None)

    result = CaseResult(case)
    q, k, v = make_inputs(case)
    scale = 1.0 / math.sqrt(case.dqk)
    bq, bk = tiling.default_blocks(case.lq, block_q, block_k)
    gpu = [b_ for b_ in backends if b_ == "cuda" or b_ in TORCH_GPU]
    dev = None
    if gpu:  # one set of device tensors for every GPU row
        dev = _to_device((q, k, v), case.dtype)
    search_backend = "cpu" if cpu_available()[0] else "reference"
    sq, sk, sv = q, k, v
    if "cuda" in backends:
        # the thresholds are searched with the GPU kernel on the same device arrays
        # (same tiles, same skip rule as the CPU's; much faster at B=8, Lk=64k; the only
        # way for bfloat16, which numpy does not have)
        search_backend = "cuda"
        sq, sk, sv = dev[0]
    if case.dtype == "bfloat16" and "cuda" not in backends:  # torch rows: no threshold
        threshes, notes = [(0.0, "0")], []
    else:
        threshes, notes = resolve_thresholds(
            case, sq, sk, sv, block_q=block_q, block_k=block_k, tol=tol,
            search_backend=search_backend,
            progress_factory=lambda d: bar(f"{case.title}: {d}"),
        )
    result.notes += notes
    exact = dense_oracle(q, k, v, causal=case.causal, scale=scale) if with_error else None

    variants: list[Variant] = []
    meta: dict[str, dict] = {}

    def add(name, backend, thresh, label, fn, **kw):
        variants.append(Variant(name, fn, **kw))
        meta[name] = dict(backend=backend, thresh=thresh, thresh_spec=label)

    for backend in backends:
        if backend == "reference":
            for t, label in threshes:
                add(_vname("reference", t), backend, t, label,
                    lambda t=t: attention(q, k, v, t, causal=case.causal, backend="reference",
                                          block_q=block_q, block_k=block_k, return_stats=True),
                    max_repeat=1)  # slow: one timed run after the warm-up
        elif backend == "cpu":
            for t, label in threshes:
                kw = dict(causal=case.causal, backend="cpu", block_q=block_q, block_k=block_k)
                add(_vname("cpu", t), backend, t, label,
                    lambda t=t, kw=kw: attention(q, k, v, t, return_stats=True, **kw),
                    timed_fn=lambda t=t, kw=kw: attention(q, k, v, t, **kw))
        elif backend == "cpu-noskip":
            from .. import cpu

            qc, kc, vc = (np.ascontiguousarray(x) for x in (q, k, v))
            add(_vname("cpu-noskip", 0.0), backend, 0.0, "0",
                lambda: cpu.blasst_attention(qc, kc, vc, 0.0, case.causal, scale, bq, bk,
                                             skip_test=False))
        elif backend == "torch":
            call, note = torch_sdpa_call(q, k, v, causal=case.causal, scale=scale)
            if note:
                result.notes.append(f"torch SDPA: {note}")
            add(_vname("torch", 0.0), backend, 0.0, "0", call)
        elif backend == "cuda":
            (dq, dk, dvv), sync, to_host = dev
            for t, label in threshes:
                kw = dict(causal=case.causal, backend="cuda", block_q=block_q, block_k=block_k)
                timed, n = _gpu_timed(lambda t=t, kw=kw: attention(dq, dk, dvv, t, **kw), sync)
                add(_vname("cuda", t), backend, t, label,
                    lambda t=t, kw=kw: attention(dq, dk, dvv, t, return_stats=True, **kw),
                    timed_fn=timed, sync=sync)
                meta[_vname("cuda", t)].update(to_host=to_host, inner=n)
        elif backend in TORCH_GPU:
            (dq, dk, dvv), sync, to_host = dev
            call, note = torch_gpu_sdpa_call(dq, dk, dvv, causal=case.causal, scale=scale,
                                             backend=backend)
            if call is None:
                result.notes.append(note)
                continue
            if note:
                result.notes.append(f"{backend}: {note}")
            timed, n = _gpu_timed(call, sync)
            add(_vname(backend, 0.0), backend, 0.0, "0", call, timed_fn=timed, sync=sync)
            meta[_vname(backend, 0.0)].update(to_host=to_host, inner=n)
        else:  # pragma: no cover - argparse restricts the choices
            raise ValueError(f"unknown backend {backend!r}")

    def on_warm(variant, res):
        """Reduce the warm-up output to (sparsity, skipped, visited, rel_err) right away."""
        m = meta[variant.name]
        if m["backend"] == "torch":
            out, sp = res.numpy(), (0.0, 0, 0)
        elif m["backend"] in TORCH_GPU:
            out, sp = m["to_host"](res), (0.0, 0, 0)
        elif m["backend"] == "cpu-noskip":
            out, tile_map = res
            sp = _tile_sparsity(tile_map)
        else:
            out, st = res
            if "to_host" in m:
                out = m["to_host"](out)
            sp = (st.sparsity, st.skipped_tiles, st.visited_tiles)
        err = rel_l2(out, exact) if exact is not None else None
        return (*sp, err)

    progress = bar(case.title, total=calls_needed(variants, repeat))
    timings = measure(variants, repeat, progress=progress.update, on_warm=on_warm)
    progress.close()

    flops = attention_flops(case.b, case.hq, case.lq, case.lk, case.dqk, case.dv, case.causal)
    kv_bytes = dense_kv_bytes(case)
    def med(name):  # per call (GPU samples hold `inner` back-to-back calls)
        return timings[name].median_ms / meta[name].get("inner", 1)

    torch_ms = med(_vname("torch", 0.0)) if _vname("torch", 0.0) in timings else None
    flash_ms = med(_vname("torch-flash", 0.0)) if _vname("torch-flash", 0.0) in timings \
        else None
    for vr in variants:
        m, tm = meta[vr.name], timings[vr.name]
        inner = m.get("inner", 1)
        ms = tm.median_ms / inner
        sparsity, skipped, visited, err = tm.result
        dense_name = _vname(m["backend"], 0.0)
        dense_ms = med(dense_name) if m["backend"] in ("reference", "cpu", "cuda") else None
        row = dict(
            case=case.title, phase=case.phase, backend=m["backend"],
            B=case.b, Hq=case.hq, Hkv=case.hkv, Lq=case.lq, Lk=case.lk, Dqk=case.dqk,
            Dv=case.dv, causal=case.causal, dtype=case.dtype, workload=case.workload,
            knobs=dict(case.knobs),
            block_q=None if case.phase == "decode" else bq, block_k=bk,
            thresh=m["thresh"], thresh_spec=m["thresh_spec"],
            sparsity=sparsity, skipped_tiles=skipped, visited_tiles=visited,
            ms=ms, ms_min=tm.min_ms / inner, repeats=len(tm.samples_ms), calls_per_sample=inner,
            warmup_ms=tm.warmup_ms, flops=flops, gflops=flops / (ms * 1e6),
            rel_err=err, kv_bytes=kv_bytes, kv_gbps=kv_bytes / (ms * 1e6),
            speedup_vs_dense=(dense_ms / ms) if dense_ms else None,
            speedup_vs_torch=(torch_ms / ms) if torch_ms else None,
            speedup_vs_flash=(flash_ms / ms) if flash_ms else None,
            ideal_speedup=ideal_prefill_speedup(sparsity) if m["thresh"] > 0 else None,
            machine=machine_line,
        )
        if vr.name == _vname("cpu", 0.0) and _vname("cpu-noskip", 0.0) in timings:
            noskip_ms = timings[_vname("cpu-noskip", 0.0)].median_ms
            row["overhead_vs_noskip"] = tm.median_ms / noskip_ms - 1.0
        result.rows.append(row)
    result.notes += target_notes(result)
    return result


def target_notes(result: CaseResult) -> list[str]:
    """One line per issue #2 target that this case's rows speak to (measured, not asserted:
    on a busy machine they are noisy)."""
    rows = {(r["backend"], r["thresh"]): r for r in result.rows}
    notes = []
    cpu0 = rows.get(("cpu", 0.0))
    if cpu0 and cpu0.get("overhead_vs_noskip") is not None:
        notes.append(f"thresh=0 overhead of the skip test (cpu vs cpu-noskip): "
                     f"{100 * cpu0['overhead_vs_noskip']:+.1f}% (issue #2: <= 3%)")
    if cpu0 and cpu0["speedup_vs_torch"] and result.case.phase == "prefill":
        notes.append(f"cpu dense vs torch SDPA: {cpu0['speedup_vs_torch']:.2f}x "
                     f"(issue #2: >= 1.0x)")
    goal = 1.4 if result.case.phase == "decode" else 1.5
    for r in result.rows:
        if r["backend"] in ("cpu", "cuda") and r["thresh"] > 0 and r["speedup_vs_dense"]:
            notes.append(
                f"{r['backend']} at sparsity {r['sparsity']:.2f}: {r['speedup_vs_dense']:.2f}x "
                f"over its dense (ideal 2/(2-s) = {r['ideal_speedup']:.2f}x; issue #2 at ~0.75: "
                f">= {goal}x)")
    return notes


# ---------------------------------------------------------------------------------------
# output


def _fmt(x, spec, none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


COLUMNS = ("backend", "thresh", "sparsity", "ms", "GFLOP/s", "rel.err", "vs dense", "vs torch")
DECODE_COLUMNS = COLUMNS[:5] + ("GB/s",) + COLUMNS[5:]
#: with GPU peers, the last column compares with torch-flash instead of CPU torch
GPU_COLUMNS = COLUMNS[:-1] + ("vs flash",)
GPU_DECODE_COLUMNS = DECODE_COLUMNS[:-1] + ("vs flash",)


def format_table(result: CaseResult) -> str:
    """The case's header line (sizes, FLOPs), its table, and its notes."""
    c = result.case
    flops = attention_flops(c.b, c.hq, c.lq, c.lk, c.dqk, c.dv, c.causal)
    phase = "" if c.title.startswith(c.phase) else f" [{c.phase}]"
    workload = "llm_like" if c.workload == "llm" else "Gaussian"
    if c.knobs:
        workload += "(" + ", ".join(f"{k}={v:g}" for k, v in c.knobs) + ")"
    lines = [f"== {c.title}{phase}: {c.sizes()}, {workload} input, "
             f"{flops / 1e9:.2f} GFLOP (dense count)"]
    body = []
    vs_flash = any(r.get("speedup_vs_flash") for r in result.rows)
    for r in result.rows:
        thresh = "0" if r["thresh"] == 0 else f"{r['thresh']:.3g}"
        if r["thresh_spec"].startswith("auto:"):
            thresh += f" ({r['thresh_spec']})"
        ms = _fmt(r["ms"], ".2f") + (" (1 run)" if r["repeats"] == 1 else "")
        cells = [r["backend"], thresh, _fmt(r["sparsity"], ".3f"), ms,
                 _fmt(r["gflops"], ".1f"), _fmt(r["rel_err"], ".1e"),
                 _fmt(r["speedup_vs_dense"], ".2f") + ("x" if r["speedup_vs_dense"] else ""),
                 _fmt(r["speedup_vs_torch"], ".2f") + ("x" if r["speedup_vs_torch"] else "")]
        if vs_flash:
            sf = r.get("speedup_vs_flash")
            cells[-1] = _fmt(sf, ".2f") + ("x" if sf else "")
        if r["ms"] is not None and r["ms"] < 0.1:
            cells[3] = _fmt(r["ms"], ".4f")
        if c.phase == "decode":  # memory-bound: show the dense K+V read rate too
            cells.insert(5, _fmt(r["kv_gbps"], ".1f"))
        body.append(cells)
    if vs_flash:
        columns = GPU_DECODE_COLUMNS if c.phase == "decode" else GPU_COLUMNS
    else:
        columns = DECODE_COLUMNS if c.phase == "decode" else COLUMNS
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(columns)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in body]
    lines += [f"  * {n}" for n in result.notes]
    return "\n".join(lines)


def write_plot(results: list[CaseResult], path: str, machine_line: str) -> None:
    """PNG: speedup over own dense vs sparsity with the ideal ``2/(2-s)`` curve when any row
    has a threshold > 0; otherwise a bar chart of time per backend and case."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = [r for res in results for r in res.rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if any(r["thresh"] > 0 for r in rows):
        s = np.linspace(0, 1, 101)
        ax.plot(s, 2 / (2 - s), "k--", lw=1, label="ideal 2/(2-s): QK kept, exp and P.V skipped")
        for res in results:
            for backend in dict.fromkeys(r["backend"] for r in res.rows):
                pts = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in res.rows
                             if r["backend"] == backend and r["speedup_vs_dense"])
                if len(pts) > 1:
                    ax.plot(*zip(*pts), "o-", label=f"{backend}: {res.case.title}")
        ax.set_xlabel("tile sparsity (skipped / visited tiles)")
        ax.set_ylabel("speedup over the same backend's dense")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    else:
        labels = [f"{r['backend']}\n{r['case']}" for r in rows]
        ax.barh(range(len(rows)), [r["ms"] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel("median time, ms")
        ax.invert_yaxis()
    ax.set_title(machine_line.split(" | ")[0].removeprefix("machine: "), fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# CLI


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return n


def _tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x < 0.5:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 0.5)")
    return x


def _knob(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. peakedness=2")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE must be a number") from None


SIZE_ARGS = ("B", "Hq", "Hkv", "L", "Lq", "D", "Dv", "thresh", "causal", "phase", "workload")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``attention`` subcommand to ``python -m blasst_ref.bench``."""
    p = subparsers.add_parser(
        "attention",
        help="time BLASST attention (dense and sparse) against PyTorch SDPA",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="examples:\n"
               "  python -m blasst_ref.bench attention --preset issue2\n"
               "  python -m blasst_ref.bench attention --L 2048 4096 "
               "--thresh 0 auto:0.5 auto:0.75\n"
               "  python -m blasst_ref.bench attention --phase decode --L 16384 --thresh 0 1e-3 "
               "--json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="fixed cases; 'issue2' reproduces the measurements of issue #2 "
                        "(issue2-dense, issue2-prefill, issue2-decode: the parts)")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                   help="backends to time (default: cpu cpu-noskip, and torch if installed)")
    p.add_argument("--phase", choices=("prefill", "decode"), default=None,
                   help="prefill: Lq = Lk = L; decode: Lq = --Lq (<= 16), Lk = L "
                        "(default prefill)")
    p.add_argument("--L", nargs="+", type=_positive_int, metavar="L",
                   help="sequence length(s); one case each (default 4096 prefill, 32768 decode)")
    p.add_argument("--Lq", type=_positive_int,
                   help="query length (prefill default L; decode default 1, at most 16)")
    p.add_argument("--B", type=_positive_int, help="batch (default 1)")
    p.add_argument("--Hq", "--H", dest="Hq", type=_positive_int,
                   help="query heads (default 8 prefill, 32 decode)")
    p.add_argument("--Hkv", type=_positive_int,
                   help="kv heads, dividing Hq (default Hq prefill, 8 decode)")
    p.add_argument("--D", type=_positive_int, help="head dim Dqk (default 64 prefill, 128 decode)")
    p.add_argument("--Dv", type=_positive_int, help="value dim (default D)")
    p.add_argument("--thresh", nargs="+", type=parse_thresh, metavar="T",
                   help="thresholds in [0, 1), or auto:S to search the threshold reaching tile "
                        "sparsity S on the input (default: 0 auto:0.75); 0 is always run")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                   help="bottom-right causal mask (default: on)")
    p.add_argument("--workload", choices=("llm", "random"), default=None,
                   help="llm: blasst_ref.workloads.llm_like (default); random: Gaussian")
    p.add_argument("--knob", action="append", type=_knob, metavar="NAME=VALUE",
                   help="an llm_like knob (repeatable), e.g. --knob peakedness=2; see "
                        "blasst_ref.workloads.llm_like for the knobs")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   default="float32",
                   help="input dtype (float64: CPU only; bfloat16: GPU only, torch tensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-q", type=_positive_int, default=None, help="prefill tile rows")
    p.add_argument("--block-k", type=_positive_int, default=None, help="tile keys")
    p.add_argument("--repeat", type=_positive_int, default=5,
                   help="timed calls per variant after the warm-up (median reported; default 5)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for numba and torch (default: their own defaults)")
    p.add_argument("--tol", type=_tolerance, default=0.02,
                   help="accepted |sparsity - S| for auto:S (default 0.02)")
    p.add_argument("--no-error", action="store_true",
                   help="skip the float64 exact result and the rel.err column (faster)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per row (JSON lines) instead of tables")
    p.add_argument("--plot", metavar="FILE", help="write a PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run, parser=p)
    return p


def build_cases(args, parser) -> list[Case]:
    """Cases from ``--preset`` or from the size options; argparse errors for bad input."""
    knobs = tuple(args.knob or ())
    if knobs:
        import inspect

        from ..workloads import llm_like

        known = [n for n, prm in inspect.signature(llm_like).parameters.items()
                 if prm.kind is inspect.Parameter.KEYWORD_ONLY
                 and n not in ("v_dim", "seed", "dtype")]
        for name, _ in knobs:
            if name not in known:
                parser.error(f"--knob {name}: llm_like has no such knob; knobs: {', '.join(known)}")
        if args.workload == "random":
            parser.error("--knob applies to --workload llm only")
    if args.preset:
        given = [f"--{a}" for a in SIZE_ARGS if getattr(args, a) is not None]
        if given:
            parser.error(f"--preset {args.preset} fixes the sizes; drop {', '.join(given)} "
                         f"(or drop --preset)")
        return [replace(c, dtype=args.dtype, seed=args.seed, knobs=knobs)
                for c in PRESETS[args.preset]]
    phase = args.phase or "prefill"
    d = PHASE_DEFAULTS[phase]
    b = args.B or d["B"]
    hq = args.Hq or d["Hq"]
    hkv = args.Hkv or d["Hkv"] or hq
    if hkv > hq or hq % hkv:
        parser.error(f"--Hq {hq} must be a multiple of --Hkv {hkv} "
                     f"(MHA: equal, GQA/MQA: Hq % Hkv == 0)")
    dqk = args.D or d["D"]
    dv = args.Dv or dqk
    causal = True if args.causal is None else args.causal
    specs = tuple(args.thresh) if args.thresh else _specs("0", "auto:0.75")
    cases = []
    for L in args.L or d["L"]:
        lq = args.Lq or d["Lq"] or L
        if phase == "decode" and not tiling.is_decode(lq):
            parser.error(f"--phase decode needs --Lq <= {tiling.DECODE_MAX_Q_LEN}, got {lq}")
        if phase == "prefill" and tiling.is_decode(lq):
            parser.error(f"a query length of {lq} <= {tiling.DECODE_MAX_Q_LEN} takes the split-KV "
                         f"decode path: use --phase decode (or a larger --L/--Lq)")
        title = f"{phase} L={L}" + ("" if causal else " no mask")
        cases.append(Case(title, b, hq, hkv, lq, L, dqk, dv, causal, specs,
                          workload=args.workload or "llm", seed=args.seed, dtype=args.dtype,
                          knobs=knobs))
    return cases


def _json_safe(row: dict) -> dict:
    """NaN/inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def run(args) -> int:
    """Entry point of the subcommand (``args`` from :func:`register`'s parser)."""
    parser = args.parser
    cases = build_cases(args, parser)
    if args.backend:
        backends = list(dict.fromkeys(args.backend))
        for name in backends:
            ok, why = backend_available(name)
            if not ok:
                parser.error(f"--backend {name} is not available here: {why}")
    else:
        backends = [b for b in ("cpu", "cpu-noskip", "torch") if backend_available(b)[0]]
        if not backends:
            parser.error("no default backend is available (blasst_ref.cpu does not import); "
                         "pass --backend reference")
    if any(c.dtype == "float64" for c in cases) and "cuda" in backends:
        parser.error("--dtype float64 is not supported by the cuda backend")
    if "cuda" in backends and torch_cuda_available()[0]:
        # the GPU peers of issue #4, on the same device tensors
        backends += [b_ for b_ in TORCH_GPU if b_ not in backends]
    if any(c.dtype == "bfloat16" for c in cases):
        host = [b_ for b_ in backends if b_ in ("reference", "cpu", "cpu-noskip", "torch")]
        if host:
            parser.error(f"--dtype bfloat16 runs on the GPU only (torch rows; numpy has no "
                         f"bfloat16): drop --backend {' '.join(host)}")
    if args.threads:
        import numba

        if args.threads > numba.config.NUMBA_NUM_THREADS:
            parser.error(f"--threads {args.threads} exceeds numba's maximum "
                         f"{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
        numba.set_num_threads(args.threads)
        if "torch" in backends:
            import torch

            torch.set_num_threads(args.threads)

    info = machine_mod.machine_info(gpu="cuda" in backends)
    line = info.line()
    if not args.json:
        print(line, flush=True)
    results = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # inf/NaN in inputs
            res = run_case(case, backends, repeat=args.repeat, block_q=args.block_q,
                           block_k=args.block_k, tol=args.tol, with_error=not args.no_error,
                           machine_line=line, quiet=args.quiet)
        results.append(res)
        if args.json:
            for row in res.rows:
                print(json.dumps(_json_safe(row)), flush=True)
        else:
            print()
            print(format_table(res), flush=True)
    if args.plot:
        write_plot(results, args.plot, line)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    return 0
