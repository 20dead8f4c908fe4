"""Threshold calibration: the ``thresh * L = alpha * exp(beta * sparsity)`` law
(docs/DESIGN.md §5).

BLASST's threshold must shrink as the context grows: the probability of a background key,
relative to the row maximum, falls roughly as ``1 / L``, so a fixed threshold skips more and
more of a longer context. The public implementations (TensorRT-LLM's
``threshold_scale_factor``, ModelOpt's ``DynamicThresholdCalibrator``) therefore set
``thresh = scale_factor / L`` and calibrate the scale factor:

1. on sample inputs at several context lengths ``L``, run BLASST at a sweep of trial
   thresholds and measure the tile sparsity each one gives (and the output error against
   dense attention);
2. fit ``ln(thresh * L) = ln(alpha) + beta * sparsity`` by least squares;
3. for a target sparsity ``s``: ``scale_factor = alpha * exp(beta * s)`` and
   ``thresh(L) = scale_factor / L``.

Which points enter the fit (documented choice): only positive thresholds whose measured
sparsity lies in ``FIT_RANGE`` (0.05 to 0.98: below, sparsity is noise around 0; above, the
tiles that can never be skipped -- first tiles, sinks, the diagonal -- saturate it), and, at
each length, only the *smallest* threshold of a run of thresholds that all give the same
sparsity (a plateau says nothing about how sparsity grows with the threshold, and its many
points would pull the line towards it).

For one input rather than a law, :func:`find_threshold` (:mod:`.search`) bisects for the
threshold that skips a target share of its tiles (the benchmarks' ``auto:S`` thresholds).

Run as a program for a calibration on :func:`blasst_ref.workloads.llm_like` inputs::

    python -m blasst_ref.calibrate --phase prefill --lengths 1024 2048 4096 8192 \\
        --target 0.5 0.7 0.9 [--save cal.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .. import rule, tiling
from ..api import BACKENDS, attention, threshold_for
from ..reference import dense_attention
from .search import ThresholdSearch, find_threshold

__all__ = ["Calibration", "CalibrationPoint", "calibrate", "default_thresholds", "FIT_RANGE",
           "ThresholdSearch", "find_threshold"]

#: Sparsities that enter the fit (inclusive).
FIT_RANGE = (0.05, 0.98)
#: Above this many scores per head (``Lq * Lk``), the error reference is the same backend
#: at ``thresh = 0`` (float32) instead of the float64 oracle, whose score matrix would not fit
#: in memory. Its rounding error (~1e-6) is far below the errors it measures.
MAX_ORACLE_SCORES = 1 << 24
PHASES = ("prefill", "decode")
#: The ``"format"`` entry of a saved calibration.
CALIBRATION_FORMAT = "blasst_ref.calibration/1"
_PLATEAU = 1e-9  # sparsities closer than this count as equal


@dataclass(frozen=True)
class CalibrationPoint:
    """One row of :attr:`Calibration.table`: all samples of one length at one threshold.

    Attributes:
        context_len: ``L = Lk`` of the samples, in keys.
        thresh: the trial threshold.
        sparsity: skipped / visited tiles, pooled over the samples of this length.
        rel_error: relative L2 error of the attention output against dense attention,
            ``||out - dense|| / ||dense||`` pooled over the samples (dimensionless).
        n_samples: number of samples of this length.
        in_fit: whether the point entered the least-squares fit (module docstring).
    """

    context_len: int
    thresh: float
    sparsity: float
    rel_error: float
    n_samples: int
    in_fit: bool

    def __post_init__(self):
        _set_fields(self, context_len=_positive_int("context_len", self.context_len),
                    thresh=_number_in("thresh", self.thresh, 0.0, 1.0, "[0, 1)"),
                    sparsity=_number_in("sparsity", self.sparsity, 0.0, 1.0, "[0, 1]"),
                    rel_error=_error_value("rel_error", self.rel_error),
                    n_samples=_positive_int("n_samples", self.n_samples),
                    in_fit=_bool("in_fit", self.in_fit))


@dataclass(frozen=True)
class Calibration:
    """The result of :func:`calibrate`: the fitted law and the measurements behind it.

    Every field is checked and held as a plain Python value when the object is built (numpy
    scalars become ``int``/``float``/``bool``, a list of points a tuple), so that a
    calibration can always be saved; a bad value is a ``ValueError``/``TypeError`` naming
    the field.

    Attributes:
        alpha, beta: the fit ``thresh * L = alpha * exp(beta * sparsity)``.
        phase: ``"prefill"`` or ``"decode"`` (fit them separately).
        causal, block_q, block_k, backend: how the samples were run (``block_q``/``block_k``
            ``None`` means the defaults of :mod:`blasst_ref.tiling`).
        table: :class:`CalibrationPoint` rows, sorted by ``(context_len, thresh)``.
        r2: coefficient of determination of the fit of ``ln(thresh * L)`` on sparsity.
        decode_seed: the split-KV skip test the decode samples ran with (``"sink"``, the
            default of :func:`blasst_ref.attention`, or ``"none"``; docs/DESIGN.md §3.5);
            use the calibrated thresholds with the same one. Files written before the seed
            existed were measured unseeded and load as ``"none"``.
    """

    alpha: float
    beta: float
    phase: str
    causal: bool
    block_q: int | None
    block_k: int | None
    backend: str
    table: tuple = field(repr=False)
    r2: float = float("nan")
    decode_seed: str = "sink"

    def __post_init__(self):
        rule.decode_seeded(self.decode_seed)  # ValueError naming the allowed values
        if isinstance(self.table, (str, bytes)) or not isinstance(self.table, (tuple, list)):
            raise TypeError(f"table must be a list of points, got {self.table!r}")
        for i, p in enumerate(self.table):
            if not isinstance(p, CalibrationPoint):
                raise TypeError(f"table[{i}] must be a CalibrationPoint, got {type(p).__name__}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be 'prefill' or 'decode', got {self.phase!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                             f"got {self.backend!r}")
        _set_fields(self, alpha=_positive_finite("alpha", self.alpha),
                    beta=_finite("beta", self.beta), causal=_bool("causal", self.causal),
                    block_q=_block("block_q", self.block_q),
                    block_k=_block("block_k", self.block_k),
                    table=tuple(self.table), r2=_number("r2", self.r2))

    # -- using the law ------------------------------------------------------------------

    def scale_factor(self, target_sparsity: float) -> float:
        """``alpha * exp(beta * target_sparsity)``: the ``scale_factor`` of
        :func:`blasst_ref.threshold_for` for that target (in keys)."""
        s = _check_target(target_sparsity)
        return self.alpha * math.exp(self.beta * s)

    def threshold(self, context_len: int, target_sparsity: float) -> float:
        """The threshold for a context of ``context_len`` keys: ``scale_factor(s) / L``.

        Raises ``ValueError`` if that is not a threshold in ``[0, 1)`` (the context is too
        short for the target)."""
        return threshold_for(context_len, self.scale_factor(target_sparsity))

    # -- reading the measurements ---------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """The context lengths of the samples, ascending."""
        return sorted({p.context_len for p in self.table})

    def _interpolate(self, context_len: int, target_sparsity: float):
        """``(thresh, rel_error)`` at the target, interpolated between the two bracketing
        trial thresholds (linear in ``ln(thresh)`` and in the error); NaNs if never reached."""
        s = _check_target(target_sparsity)
        rows = [p for p in self.table if p.context_len == context_len and p.thresh > 0]
        if not rows:
            raise ValueError(f"context_len {context_len} is not in the table {self.lengths}")
        rows.sort(key=lambda p: p.thresh)
        prev = None
        for p in rows:
            if p.sparsity >= s:
                if prev is None or p.sparsity == prev.sparsity:
                    return p.thresh, p.rel_error
                w = (s - prev.sparsity) / (p.sparsity - prev.sparsity)
                lt = math.log(prev.thresh) + w * (math.log(p.thresh) - math.log(prev.thresh))
                return math.exp(lt), prev.rel_error + w * (p.rel_error - prev.rel_error)
            prev = p
        return float("nan"), float("nan")

    def measured_threshold(self, context_len: int, target_sparsity: float) -> float:
        """The threshold that gave ``target_sparsity`` at one calibrated length, read off the
        table by linear interpolation in ``ln(thresh)`` between the two bracketing trial
        thresholds (no fit involved). NaN if the sweep never reached the target."""
        return self._interpolate(context_len, target_sparsity)[0]

    def measured_error(self, context_len: int, target_sparsity: float) -> float:
        """The relative L2 output error at ``target_sparsity`` at one calibrated length,
        interpolated like :meth:`measured_threshold`. NaN if never reached."""
        return self._interpolate(context_len, target_sparsity)[1]

    def length_slope(self, target_sparsity: float) -> float:
        """Slope of ``ln(measured threshold)`` against ``ln(L)`` at fixed sparsity, a least
        squares over the calibrated lengths (the ``1/L`` law says -1). NaN if fewer than two
        lengths reached the target."""
        pts = [(math.log(n), math.log(t)) for n in self.lengths
               if not math.isnan(t := self.measured_threshold(n, target_sparsity))]
        if len(pts) < 2:
            return float("nan")
        x, y = np.array(pts).T
        return float(np.polyfit(x, y, 1)[0])

    def format_table(self) -> str:
        """The table as aligned text, one row per (length, threshold)."""
        lines = [f"{'L':>7} {'thresh':>10} {'thresh*L':>10} {'sparsity':>8} {'rel_err':>9}  fit"]
        for p in self.table:
            lines.append(
                f"{p.context_len:>7d} {p.thresh:>10.3e} {p.thresh * p.context_len:>10.3g} "
                f"{p.sparsity:>8.3f} {p.rel_error:>9.2e}  {'*' if p.in_fit else ''}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        seed = f", decode_seed={self.decode_seed!r}" if self.phase == "decode" else ""
        return (f"Calibration({self.phase}, causal={self.causal}{seed}): thresh * L = "
                f"{self.alpha:.4g} * exp({self.beta:.4g} * sparsity)  (R^2 = {self.r2:.3f}, "
                f"{sum(p.in_fit for p in self.table)} points, lengths {self.lengths})")

    # -- plots and files ---------------------------------------------------------------------

    def plot(self, targets=(0.5, 0.7, 0.9), *, lengths=None):
        """Two panels (matplotlib ``Figure``): threshold against ``L`` on log-log axes for
        each target (the fitted line and the measured thresholds), and sparsity against
        ``thresh * L`` (every table point, coloured by length, and the fitted curve)."""
        import matplotlib.pyplot as plt  # lazy: only plotting needs matplotlib

        targets = [_check_target(t) for t in targets]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        lens = np.array(self.lengths, dtype=float)
        grid = np.geomspace(lens.min() / 2, lens.max() * 8, 50) if lengths is None else np.asarray(lengths, float)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, s in enumerate(targets):
            c = colors[i % len(colors)]
            ax1.loglog(grid, self.scale_factor(s) / grid, color=c, label=f"fit, s = {s:g}")
            meas = [self.measured_threshold(int(n), s) for n in lens]
            ax1.loglog(lens, meas, "o", color=c, mfc="none")
        # ticks at the calibrated lengths: over less than two decades matplotlib's minor
        # labels overlap
        ax1.set_xticks(lens, [f"{int(n)}" for n in lens])
        ax1.xaxis.set_minor_formatter(plt.NullFormatter())
        ax1.set_xlabel("context length L (keys)")
        ax1.set_ylabel("threshold")
        ax1.set_title(f"{self.phase}: threshold vs length (o: measured)")
        ax1.legend(fontsize=8)
        for i, n in enumerate(self.lengths):
            rows = [p for p in self.table if p.context_len == n and p.thresh > 0]
            ax2.semilogx([p.thresh * n for p in rows], [p.sparsity for p in rows], "o-",
                         ms=3, lw=0.8, color=colors[i % len(colors)], label=f"L = {n}")
        s_fit = np.linspace(*FIT_RANGE, 50)
        ax2.semilogx(self.alpha * np.exp(self.beta * s_fit), s_fit, "k--", label="fit")
        ax2.set_xlabel("thresh * L")
        ax2.set_ylabel("tile sparsity")
        ax2.set_title("sparsity vs thresh * L")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict:
        d = asdict(self)
        d["table"] = [asdict(p) for p in self.table]
        d["format"] = CALIBRATION_FORMAT
        return d

    def save(self, path) -> None:
        """Write the calibration as JSON (everything, table included).

        Atomic: the JSON goes to a temporary file in the same folder, which then replaces
        ``path`` in one step (``os.replace``). If anything fails, an existing file at
        ``path`` is left as it was. The file gets the permissions a plain ``open`` gives."""
        path = os.fspath(path)
        folder, name = os.path.split(os.path.abspath(path))
        # a fresh name, created exclusively ("x"), with the permissions that the umask gives
        # a new file (tempfile.mkstemp would make it readable by its owner only)
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):  # (it may never have been made)
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a calibration written by :meth:`save`.

        Every field is checked; a file that is not valid JSON, not a calibration, misses a
        field, has an unknown one or a bad value raises ``ValueError`` naming the file and
        the field (``table[3].thresh``)."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except RecursionError:
            raise ValueError(f"{path}: is not a calibration file (JSON nested too deeply)") \
                from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path} is not a JSON file ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{path} is not a blasst_ref calibration file (no "
                             f"\"format\": \"{CALIBRATION_FORMAT}\")")
        d = dict(d)
        d.pop("format")
        d.setdefault("decode_seed", "none")  # files from before the seeded decode test
        try:
            table = d.get("table")
            if isinstance(table, list):
                d["table"] = [_from_fields(CalibrationPoint, p, f"table[{i}]")
                              for i, p in enumerate(table)]
            return _from_fields(cls, d, "")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------
# validation helpers


def _set_fields(obj, **values) -> None:
    for name, value in values.items():  # the dataclasses are frozen
        object.__setattr__(obj, name, value)


def _from_fields(cls, d, where: str):
    """``cls(**d)`` after checking that ``d`` is a dict with exactly ``cls``'s fields (the
    messages name ``where``, e.g. ``table[3]``); the values are checked by ``cls``, whose
    messages get ``where.`` in front of the field name."""
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be an object {{field: value}}, got {d!r}"[:200])
    names = [f.name for f in fields(cls)]
    prefix = f"{where}: " if where else ""
    for name in d:
        if name not in names:
            raise ValueError(f"{prefix}unknown field {name!r}")
    for name in names:
        if name not in d:
            raise ValueError(f"{prefix}missing field {name!r}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}.{exc}") from None


def _number(name, x) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {x!r}")
    return float(x)


def _finite(name, x) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {x!r}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def _positive_finite(name, x) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {x!r}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def _number_in(name, x, lo, hi, interval: str) -> float:
    """A number in ``[lo, hi)`` (``interval`` ends with ')') or ``[lo, hi]``."""
    x = _number(name, x)
    if not (lo <= x < hi if interval.endswith(")") else lo <= x <= hi):  # also rejects NaN
        raise ValueError(f"{name} must be in {interval}, got {x!r}")
    return x


def _error_value(name, x) -> float:
    x = _number(name, x)  # NaN: no reference norm to measure against
    if x < 0:
        raise ValueError(f"{name} must be >= 0 (or NaN), got {x!r}")
    return x


def _positive_int(name, x) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {x!r}")
    if x <= 0:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)


def _block(name, x) -> int | None:
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or x <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {x!r}")
    return int(x)


def _bool(name, x) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return bool(x)


def _check_target(s) -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"target_sparsity must be a number in (0, 1), got {s!r}")
    if not 0.0 < float(s) < 1.0:  # also rejects NaN
        raise ValueError(f"target_sparsity must be in (0, 1), got {s!r}")
    return float(s)


def _check_thresholds(thresholds) -> np.ndarray:
    try:
        t = np.asarray(thresholds, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"thresholds must be a sequence of numbers, got {thresholds!r}") from exc
    if t.size == 0:
        raise ValueError("thresholds is empty; pass trial thresholds in [0, 1), or None")
    bad = t[~((t >= 0) & (t < 1))]
    if bad.size:
        raise ValueError(f"thresholds must be in [0, 1); got {bad[:5].tolist()}")
    return np.unique(t)


def _sample_shapes(samples):
    """Materialise ``samples`` and check each is a (q, k, v) triple of arrays."""
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, (tuple, list)) or len(s) != 3:
            raise TypeError(f"samples[{i}] must be a (q, k, v) triple, got {type(s).__name__}")
        q, k, v = s
        for name, x in zip("qkv", (q, k, v)):
            if not hasattr(x, "shape") or len(x.shape) not in (3, 4):
                raise ValueError(
                    f"samples[{i}]: {name} must be a 4-D (B, H, L, D) or 3-D (H, L, D) array, "
                    f"got {getattr(x, 'shape', type(x).__name__)}"
                )
        out.append((q, k, v))
    if not out:
        raise ValueError("samples is empty: pass an iterable of (q, k, v) triples")
    return out


def default_thresholds(lengths, per_decade: int = 4) -> np.ndarray:
    """The default sweep: log-spaced from ``1e-3 / max(L)`` to 0.9, ``per_decade`` points
    per decade. ``thresh * L = 1e-3`` skips next to nothing on LLM-like inputs and 0.9 skips
    almost every tile that can be skipped, so the sweep spans 0 to ~95% sparsity."""
    lo = 1e-3 / max(lengths)
    n = max(2, int(math.ceil(math.log10(0.9 / lo) * per_decade)) + 1)
    return np.geomspace(lo, 0.9, n)


# ---------------------------------------------------------------------------------------
# the sweep and the fit


def _dense_reference(q, k, v, causal, backend, block_q, block_k):
    q4, k4, v4 = (np.asarray(x)[None] if np.ndim(x) == 3 else np.asarray(x) for x in (q, k, v))
    if q4.shape[2] * k4.shape[2] <= MAX_ORACLE_SCORES:
        group = q4.shape[1] // k4.shape[1]
        # One kv group at a time keeps the float64 score matrix small.
        return np.concatenate(
            [dense_attention(q4[:, g * group:(g + 1) * group], k4[:, g:g + 1], v4[:, g:g + 1],
                             causal=causal) for g in range(k4.shape[1])], axis=1)
    out = attention(q4, k4, v4, 0.0, causal=causal, backend=backend, block_q=block_q,
                    block_k=block_k)
    return np.asarray(out, dtype=np.float64)


def fit_law(context_len, thresh, sparsity):
    """Least squares of ``ln(thresh * L)`` on ``sparsity``: returns ``(alpha, beta, r2)``.

    Arrays of equal length (one entry per point, all thresholds > 0). Raises ``ValueError``
    with fewer than two distinct sparsities."""
    L, t, s = (np.asarray(x, dtype=np.float64) for x in (context_len, thresh, sparsity))
    if len(np.unique(s)) < 2:
        raise ValueError(
            f"the fit needs points with at least two different sparsities in {FIT_RANGE}; got "
            f"{len(s)} point(s). Widen the thresholds sweep or use longer/more peaked samples"
        )
    y = np.log(t * L)
    beta, ln_alpha = np.polyfit(s, y, 1)
    resid = y - (ln_alpha + beta * s)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return float(math.exp(ln_alpha)), float(beta), r2


def _select_fit_points(rows):
    """Mark the points of the fit (module docstring): in FIT_RANGE, smallest of a plateau."""
    chosen = set()
    by_len = {}
    for idx, r in enumerate(rows):
        by_len.setdefault(r["context_len"], []).append(idx)
    for idxs in by_len.values():
        idxs = sorted((i for i in idxs if rows[i]["thresh"] > 0), key=lambda i: rows[i]["thresh"])
        prev_s = None
        for i in idxs:
            s = rows[i]["sparsity"]
            if prev_s is not None and abs(s - prev_s) <= _PLATEAU:
                continue
            prev_s = s
            if FIT_RANGE[0] <= s <= FIT_RANGE[1]:
                chosen.add(i)
    return chosen


def calibrate(samples, *, phase: str = "prefill", causal: bool = True, thresholds=None,
              block_q: int | None = None, block_k: int | None = None, backend: str = "auto",
              progress: bool = True, decode_seed: str = "sink") -> Calibration:
    """Calibrate ``thresh * L = alpha * exp(beta * sparsity)`` on sample inputs
    (docs/DESIGN.md §5).

    Args:
        samples: an iterable of ``(q, k, v)`` in the layout of :func:`blasst_ref.attention`
            (lengths may differ; the head dim ``Dqk`` must be the same for all). The context
            length ``L`` of a sample is its ``Lk``.
        phase: ``"prefill"`` (every sample has ``Lq > 16``) or ``"decode"`` (every sample has
            ``Lq <= 16``: the split-KV path). Fit the two separately: their tiles differ.
        causal: the mask the samples are run with.
        thresholds: trial thresholds in ``[0, 1)`` (the same for every sample), or ``None``
            for :func:`default_thresholds` of the sample lengths.
        block_q, block_k, backend: passed to :func:`blasst_ref.attention`.
        progress: show a tqdm bar over the ``samples x thresholds`` runs.
        decode_seed: the split-KV skip test of the decode samples (``"sink"``, the default,
            or ``"none"``; :func:`blasst_ref.attention`); prefill ignores it.

    Returns:
        A :class:`Calibration`. Its table pools the samples of each length: sparsity is
        skipped / visited tiles over all of them, the error is the relative L2 norm of the
        output error over all of them, against :func:`blasst_ref.dense_attention` (float64)
        or, for more than ``MAX_ORACLE_SCORES`` scores per head, the same backend at
        ``thresh = 0``.

    Raises:
        ValueError / TypeError: empty samples, a sample whose shape does not fit ``phase``,
            mixed head dims, thresholds outside ``[0, 1)``, or too few points for the fit.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    rule.decode_seeded(decode_seed)
    samples = _sample_shapes(samples)
    dims = sorted({int(q.shape[-1]) for q, _, _ in samples})
    if len(dims) > 1:
        raise ValueError(f"samples have mixed head dims Dqk {dims}; calibrate one model shape at a time")
    for i, (q, k, _) in enumerate(samples):
        lq, lk = int(q.shape[-2]), int(k.shape[-2])
        if tiling.is_decode(lq) != (phase == "decode"):
            want = (f"Lq <= {tiling.DECODE_MAX_Q_LEN}" if phase == "decode"
                    else f"Lq > {tiling.DECODE_MAX_Q_LEN}")
            raise ValueError(
                f"samples[{i}] has Lq={lq} (Lk={lk}), but phase={phase!r} needs {want}"
            )
    lengths = [int(k.shape[-2]) for _, k, _ in samples]
    thresholds = (default_thresholds(lengths) if thresholds is None
                  else _check_thresholds(thresholds))

    # lazy, like every optional nicety; tqdm.auto only when a bar is shown: in a notebook
    # without ipywidgets it warns even for a disabled bar
    if progress:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    # per (length, thresh): [skipped, visited, err^2, ref^2, n_samples]
    acc: dict[tuple[int, float], list] = {}
    ran_backend = backend
    bar = tqdm(total=len(samples) * len(thresholds), disable=not progress,
               desc=f"calibrate {phase}", unit="run")
    try:
        for q, k, v in samples:
            L = int(k.shape[-2])
            ref = _dense_reference(q, k, v, causal, backend, block_q, block_k)
            ref_sq = float((ref ** 2).sum())
            for t in thresholds:
                out, st = attention(q, k, v, float(t), causal=causal, backend=backend,
                                    block_q=block_q, block_k=block_k, return_stats=True,
                                    decode_seed=decode_seed)
                ran_backend = st.backend
                err_sq = float(((np.asarray(out, np.float64).reshape(ref.shape) - ref) ** 2).sum())
                a = acc.setdefault((L, float(t)), [0, 0, 0.0, 0.0, 0])
                a[0] += st.skipped_tiles
                a[1] += st.visited_tiles
                a[2] += err_sq
                a[3] += ref_sq
                a[4] += 1
                bar.update()
    finally:
        bar.close()

    rows = []
    for (L, t), (sk, vis, e2, r2_, n) in sorted(acc.items()):
        rows.append(dict(context_len=L, thresh=t, sparsity=sk / vis if vis else 0.0,
                         rel_error=math.sqrt(e2 / r2_) if r2_ > 0 else float("nan"),
                         n_samples=n))
    chosen = _select_fit_points(rows)
    table = tuple(CalibrationPoint(**r, in_fit=i in chosen) for i, r in enumerate(rows))
    fit = [p for p in table if p.in_fit]
    alpha, beta, r2 = fit_law([p.context_len for p in fit], [p.thresh for p in fit],
                              [p.sparsity for p in fit])
    return Calibration(alpha=alpha, beta=beta, phase=phase, causal=bool(causal),
                       block_q=block_q, block_k=block_k, backend=ran_backend, table=table,
                       r2=r2, decode_seed=decode_seed)


# ---------------------------------------------------------------------------------------
# command line


def _workload_samples(phase, lengths, n_samples, batch, heads, kv_heads, head_dim, seed, dtype,
                      peakedness=1.0):
    from ..workloads import llm_like

    for L in lengths:
        for j in range(n_samples):
            lq = L if phase == "prefill" else 1
            yield llm_like(batch, heads, kv_heads, lq, L, head_dim,
                           seed=seed + 1000 * j + L, dtype=dtype, peakedness=peakedness)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m blasst_ref.calibrate",
        description="Calibrate BLASST's threshold law thresh * L = alpha * exp(beta * s) on "
                    "LLM-like workloads (blasst_ref.workloads.llm_like, default knobs but "
                    "--peakedness).",
        epilog="The thresholds depend on the workload: python -m blasst_ref.demo runs "
               "peakedness 2, where every logit is doubled, so its thresholds are the squares "
               "of these (1e-3 becomes 1e-6); --peakedness 2 calibrates that workload.",
    )
    p.add_argument("--phase", choices=PHASES, default="prefill",
                   help="prefill (Lq = L, causal) or decode (one query row against L keys, "
                        "the split-KV path); their laws differ, fit them separately "
                        "(default prefill)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="context lengths L (keys)")
    p.add_argument("--target", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                   help="target sparsities in (0, 1)")
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[1024, 4096, 16384, 65536],
                   help="lengths to print thresholds for")
    p.add_argument("--held-out", type=int, nargs="*", default=[],
                   help="lengths to check the fit at: a fresh sample per length (another "
                        "seed) run at the fitted threshold of each target, its sparsity and "
                        "error printed")
    p.add_argument("--samples", type=int, default=1, help="samples per length (seeds)")
    p.add_argument("--batch", type=int, default=1, help="batch size B of each sample (default 1)")
    p.add_argument("--heads", type=int, default=None,
                   help="query heads (default 8 prefill, 32 decode)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 2 / 8)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim D of q, k and v (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "float64"],
                   help="dtype of the samples (default float32)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first sample; sample j at length L uses seed + 1000 j + L")
    p.add_argument("--peakedness", type=float, default=1.0,
                   help="llm_like's peakedness: how sharp the heads are; it multiplies every "
                        "logit, so peakedness p turns a threshold t into t ** p (default 1.0; "
                        "the demo runs 2.0)")
    p.add_argument("--no-causal", action="store_true", help="calibrate without the causal mask")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"],
                   help="the backend that runs the samples (default auto: the CPU kernels, as "
                        "the samples are numpy arrays)")
    p.add_argument("--block-q", type=int, default=None,
                   help="query rows per tile (default: the backend's, 128); sparsity is "
                        "measured in tiles, so the law holds for one tile size")
    p.add_argument("--block-k", type=int, default=None,
                   help="keys per tile (default: the backend's, 64)")
    p.add_argument("--decode-seed", choices=rule.DECODE_SEEDS, default="sink",
                   help="decode's split-KV skip test: sink (every chunk against the sink "
                        "tile's max too, the default) or none (each chunk against its own "
                        "running max only)")
    p.add_argument("--per-decade", type=int, default=4, help="trial thresholds per decade")
    p.add_argument("--save", default=None, help="write the calibration as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    for t in a.target:
        _check_target(t)
    if not (math.isfinite(a.peakedness) and a.peakedness > 0):
        p.error(f"--peakedness must be a finite number > 0, got {a.peakedness}")
    heads = a.heads or (8 if a.phase == "prefill" else 32)
    kv_heads = a.kv_heads or (2 if a.phase == "prefill" else 8)

    t0 = time.perf_counter()
    cal = calibrate(
        list(_workload_samples(a.phase, a.lengths, a.samples, a.batch, heads, kv_heads,
                               a.head_dim, a.seed, a.dtype, a.peakedness)),
        phase=a.phase, causal=not a.no_causal, thresholds=default_thresholds(a.lengths, a.per_decade),
        block_q=a.block_q, block_k=a.block_k, backend=a.backend, progress=not a.quiet,
        decode_seed=a.decode_seed,
    )
    elapsed = time.perf_counter() - t0
    print(cal)
    print(f"workload: llm_like(B={a.batch}, Hq={heads}, Hkv={kv_heads}, D={a.head_dim}, "
          f"{a.dtype}, peakedness={a.peakedness:g}, {a.samples} sample(s)/length, "
          f"seed={a.seed}); backend {cal.backend}; {elapsed:.1f} s")
    if a.peakedness == 1.0:
        print("(python -m blasst_ref.demo runs peakedness 2: every logit doubled, so its "
              "thresholds are\n the squares of these; --peakedness 2 calibrates that workload)")
    print()
    print(cal.format_table())
    print()
    hdr = "".join(f"{'L=' + str(n):>12}" for n in a.eval_lengths)
    print(f"{'target':>7} {'scale':>9} {'slope':>7}  {hdr}   (thresholds from the fit; slope: "
          f"measured d ln(thresh)/d ln(L))")
    for s in a.target:
        cells = []
        for n in a.eval_lengths:
            try:
                cells.append(f"{cal.threshold(n, s):>12.3e}")
            except ValueError:
                cells.append(f"{'>= 1':>12}")
        print(f"{s:>7.2f} {cal.scale_factor(s):>9.4g} {cal.length_slope(s):>7.2f}  {''.join(cells)}")
    print()
    print("measured thresholds (and relative L2 output error) at the calibrated lengths, "
          "interpolated from the table:")
    for s in a.target:
        cells = []
        for n in cal.lengths:
            t, e = cal._interpolate(n, s)
            cells.append(f"L={n}: {t:.3e} (err {e:.1e})" if not math.isnan(t)
                         else f"L={n}: not reached")
        print(f"  s={s:.2f}  " + ", ".join(cells))
    if a.held_out:
        _print_held_out(cal, a, heads, kv_heads)
    if a.save:
        cal.save(a.save)
        print(f"\nsaved to {a.save}")
    return 0


def _print_held_out(cal, a, heads, kv_heads) -> None:
    """The fitted thresholds at lengths the fit never saw: the sparsity and the relative L2
    output error they give on a fresh sample (seed ``a.seed + 7919 + L``)."""
    print()
    print("held out: the fitted threshold on a fresh sample at each length (sparsity, error):")
    for n in a.held_out:
        q, k, v = next(_workload_samples(a.phase, [n], 1, a.batch, heads, kv_heads, a.head_dim,
                                         a.seed + 7919, a.dtype, a.peakedness))
        ref = _dense_reference(q, k, v, not a.no_causal, a.backend, a.block_q, a.block_k)
        cells = []
        for s in a.target:
            try:
                t = cal.threshold(n, s)
            except ValueError:
                cells.append(f"s={s:.2f}: thresh >= 1")
                continue
            out, st = attention(q, k, v, t, causal=not a.no_causal, backend=a.backend,
                                block_q=a.block_q, block_k=a.block_k, return_stats=True,
                                decode_seed=a.decode_seed)
            err = float(np.linalg.norm(np.asarray(out, np.float64).reshape(ref.shape) - ref)
                        / np.linalg.norm(ref))
            cells.append(f"s={s:.2f}: thresh {t:.3e} -> {st.sparsity:.3f} (err {err:.1e})")
        print(f"  L={n}: " + ", ".join(cells))

