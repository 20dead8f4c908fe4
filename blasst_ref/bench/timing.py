"""Timing: a warm-up call (JIT compile, excluded), then the median of interleaved repeats.

Why interleaved: the numbers that matter are *ratios* between variants on the same input
(sparse vs dense, ours vs PyTorch, with vs without the skip test). On a shared or
frequency-scaling machine, load drifts over seconds; timing variant A ten times and then
variant B ten times puts that drift into the ratio. Running the rounds A B C, B C A, C A B,
... exposes every variant to the same drift, and the median of each discards the outliers.

Times are wall-clock milliseconds from :func:`time.perf_counter`. For GPU variants pass a
``sync`` callable (e.g. ``torch.cuda.synchronize``) so that a call is timed to completion.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Variant:
    """One thing to time.

    Attributes:
        name: a label, unique within one :func:`measure` call.
        fn: a zero-argument callable; the value of its *first* (warm-up) call is kept in
            :attr:`Timing.result`, so it can return the output and statistics to check.
        timed_fn: what the repeats call, if it differs from ``fn`` (e.g. ``fn`` also asks for
            statistics that the timed calls must not pay for); default ``fn``.
        max_repeat: cap on timed repeats (``None``: no cap); for slow, un-jitted variants.
        warm_is_timed: the warm-up call compiles nothing (e.g. the numpy reference), so its
            time counts as a sample; together with ``max_repeat=1`` the variant runs once.
        sync: called after each call before the clock stops (GPU variants).
    """

    name: str
    fn: Callable[[], Any]
    timed_fn: Callable[[], Any] | None = None
    max_repeat: int | None = None
    warm_is_timed: bool = False
    sync: Callable[[], None] | None = None


@dataclass
class Timing:
    """What :func:`measure` found for one :class:`Variant`.

    Attributes:
        median_ms: median wall time of the timed calls, milliseconds.
        min_ms: fastest timed call, milliseconds.
        samples_ms: every timed call, milliseconds, in order.
        warmup_ms: the warm-up call (includes JIT compilation), milliseconds.
        result: the warm-up call's return value.
    """

    median_ms: float
    min_ms: float
    samples_ms: list[float] = field(repr=False)
    warmup_ms: float
    result: Any = field(repr=False, default=None)


def _timed(fn, sync) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - t0) * 1e3, r


def measure(
    variants: list[Variant], repeat: int, *, progress: Callable[[int], None] | None = None,
    on_warm: Callable[[Variant, Any], Any] | None = None, pause_s: float = 0.0,
    blocks: int = 0, rewarm: int = 2,
) -> dict[str, Timing]:
    """Time each variant: one warm-up call, then ``repeat`` interleaved rounds.

    Args:
        variants: what to time (names must be unique).
        repeat: timed calls per variant (``>= 1``), capped per variant by ``max_repeat``.
        progress: called with ``1`` after every call (e.g. ``tqdm.update``).
        on_warm: called as ``on_warm(variant, result)`` right after each warm-up call; its
            return value replaces the result kept in :attr:`Timing.result`. Lets a caller
            reduce a large output (e.g. to an error norm) before the next variant runs.
        pause_s: untimed sleep after every call. Variants that use different thread pools
            (numpy's OpenBLAS, Numba's OpenMP, ONNX Runtime) leave their idle threads
            spinning for a while after a call (OpenBLAS: up to ~0.1 s); without a pause those
            threads steal the cores from the next variant and the ratio measures the
            interference, not the variants.
        blocks: 0 (default) times in interleaved rounds. ``blocks = b > 0`` instead times
            each variant in ``b`` blocks of ``repeat / b`` back-to-back calls (blocks in
            the order A B C, C B A, ...), each block after ``rewarm`` untimed calls: the
            steady state of each variant, for variants whose thread pools (OpenBLAS,
            Numba's OpenMP) disturb each other when they alternate call by call on few
            cores.

    Returns:
        ``{name: Timing}``. The warm-up call is excluded from the median unless the variant
        says ``warm_is_timed``.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    warm: dict[str, tuple[float, Any]] = {}
    for v in variants:
        ms, r = _timed(v.fn, v.sync)
        if pause_s:
            time.sleep(pause_s)
        if on_warm is not None:
            r = on_warm(v, r)
        warm[v.name] = (ms, r)
        if v.warm_is_timed:
            samples[v.name].append(ms)
        if progress:
            progress(1)
    n = len(variants)
    if blocks:
        # Steady state per variant: a block of back-to-back calls, its first `rewarm`
        # untimed (they absorb the other variants' idle thread pools and wake this one's);
        # blocks in the order A B C, then C B A, ... so that drift hits every variant alike.
        per_block = max(1, -(-repeat // blocks))
        for blk in range(blocks):
            order = variants if blk % 2 == 0 else variants[::-1]
            for v in order:
                for _ in range(rewarm):
                    _timed(v.timed_fn or v.fn, v.sync)
                for _ in range(per_block):
                    cap = repeat if v.max_repeat is None else min(repeat, v.max_repeat)
                    if len(samples[v.name]) >= cap:
                        break
                    ms, _ = _timed(v.timed_fn or v.fn, v.sync)
                    samples[v.name].append(ms)
                    if progress:
                        progress(1)
        repeat = 0  # the interleaved rounds below are replaced by the blocks
    for rnd in range(repeat):
        # rotate the order each round: no variant always runs right after the same other one
        for v in variants[rnd % n:] + variants[:rnd % n] if n else []:
            cap = repeat if v.max_repeat is None else min(repeat, v.max_repeat)
            if len(samples[v.name]) >= cap:
                continue
            ms, _ = _timed(v.timed_fn or v.fn, v.sync)
            samples[v.name].append(ms)
            if pause_s:
                time.sleep(pause_s)
            if progress:
                progress(1)
    return {
        v.name: Timing(
            median_ms=statistics.median(samples[v.name]),
            min_ms=min(samples[v.name]),
            samples_ms=samples[v.name],
            warmup_ms=warm[v.name][0],
            result=warm[v.name][1],
        )
        for v in variants
    }


def calls_needed(variants: list[Variant], repeat: int) -> int:
    """How many calls :func:`measure` will make (for a progress bar's total)."""
    total = 0
    for v in variants:
        cap = repeat if v.max_repeat is None else min(repeat, v.max_repeat)
        timed = max(0, cap - (1 if v.warm_is_timed else 0))
        total += 1 + timed
    return total


#: a GPU sample lasts about this long (:func:`back_to_back`)
GPU_SAMPLE_MS = 5.0


def back_to_back(call, sync, target_ms: float = GPU_SAMPLE_MS):
    """``(timed_fn, n)``: ``timed_fn`` makes ``n`` back-to-back calls (no synchronisation
    between them) so that one sample lasts about ``target_ms``; divide its time by ``n``.
    Also serves as the warm-up (compilation) of ``call``."""
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
