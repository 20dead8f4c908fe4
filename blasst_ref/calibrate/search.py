"""Find the threshold that skips a given share of the tiles of one input.

Speedups are read against *sparsity*, not against the threshold: the benchmark (``auto:S``
thresholds), the demo and tutorial 04 ask "which threshold skips 75% of the tiles of this
input?" and :func:`find_threshold` answers it by bisection. It measures one input; the
law that carries a threshold across context lengths is :func:`blasst_ref.calibrate.calibrate`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..api import attention

__all__ = ["ThresholdSearch", "find_threshold"]


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
                   progress=None, decode_seed: str = "sink") -> ThresholdSearch:
    """Search the threshold whose tile sparsity on ``(q, k, v)`` is ``target`` +- ``tol``.

    Sparsity is a non-decreasing step function of the threshold (docs/DESIGN.md §9 tests that), and
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
        decode_seed: decode's split-KV skip test, as for :func:`blasst_ref.attention`
            (``"sink"`` or ``"none"``; a ``cache`` holds the points of one seed only).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {target!r}")
    cache = {} if cache is None else cache
    evals = 0

    def sparsity_at(x: float) -> float:
        nonlocal evals
        if x not in cache:
            _, st = attention(q, k, v, 10.0 ** x, causal=causal, backend=backend,
                              block_q=block_q, block_k=block_k, return_stats=True,
                              decode_seed=decode_seed)
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
