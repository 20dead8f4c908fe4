"""What ``python -m blasst_ref.bench attention`` runs: cases, thresholds, presets, inputs.

* :class:`Case`: one problem (sizes, mask, dtype, workload and its knobs) with the
  thresholds to time it at;
* :class:`ThreshSpec` / :func:`parse_thresh`: a threshold, or ``auto:S``, the threshold
  that skips a share ``S`` of this input's tiles (searched when the case runs);
* :data:`PRESETS`: fixed cases, named after what they measure;
* :func:`make_inputs`: a case's seeded ``(q, k, v)``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np

from .. import tiling

__all__ = ["Case", "PHASE_DEFAULTS", "PRESETS", "ThreshSpec", "make_inputs", "parse_thresh",
           "thresh_specs"]


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


def thresh_specs(*texts: str) -> tuple[ThreshSpec, ...]:
    """``--thresh`` texts (e.g. ``"0", "auto:0.75"``) as :class:`ThreshSpec` values."""
    return tuple(parse_thresh(t) for t in texts)


#: Fixed cases, named after what they measure. ``cpu-dense``: our dense CPU kernel against
#: PyTorch SDPA; ``cpu-prefill`` and ``cpu-decode``: BLASST's speedup over our own dense at
#: 50-90% tile sparsity (docs/DESIGN.md §4.4's CPU targets; the tables of
#: docs/BENCHMARKS.md); ``cpu``: all three. Sparse rows use ``auto:`` thresholds so that "about 75% of the tiles skipped"
#: holds on whatever input llm_like generates.
PRESETS: dict[str, tuple[Case, ...]] = {
    "cpu-dense": (
        Case("prefill dense, causal", 1, 8, 8, 4096, 4096, 64, 64, True, thresh_specs("0")),
        Case("prefill dense, no mask", 1, 8, 8, 4096, 4096, 64, 64, False, thresh_specs("0")),
    ),
    "cpu-prefill": (
        Case("prefill sparse, causal", 1, 8, 8, 8192, 8192, 64, 64, True,
             thresh_specs("0", "auto:0.5", "auto:0.75", "auto:0.9")),
    ),
    "cpu-decode": (
        Case("decode sparse, GQA 32/8", 1, 32, 8, 1, 32768, 128, 128, True,
             thresh_specs("0", "auto:0.5", "auto:0.75")),
    ),
    # a few seconds: to check that everything runs (not for numbers)
    "smoke": (
        Case("smoke prefill", 1, 2, 1, 256, 256, 32, 32, True, thresh_specs("0", "auto:0.5")),
        Case("smoke decode", 1, 4, 2, 1, 2048, 32, 32, True, thresh_specs("0", "auto:0.5")),
    ),
}
PRESETS["cpu"] = PRESETS["cpu-dense"] + PRESETS["cpu-prefill"] + PRESETS["cpu-decode"]

#: Defaults per phase when sizes are not given: the sizes of the ``cpu-*`` presets.
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
        from ..workloads import llm_like

        return llm_like(case.b, case.hq, case.hkv, case.lq, case.lk, case.dqk,
                        v_dim=case.dv, seed=case.seed, dtype=case.dtype, **dict(case.knobs))
    rng = np.random.default_rng(case.seed)
    dt = np.dtype(case.dtype)
    q = rng.standard_normal((case.b, case.hq, case.lq, case.dqk)).astype(dt)
    k = rng.standard_normal((case.b, case.hkv, case.lk, case.dqk)).astype(dt)
    v = rng.standard_normal((case.b, case.hkv, case.lk, case.dv)).astype(dt)
    return q, k, v
