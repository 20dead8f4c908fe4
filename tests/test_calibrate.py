"""blasst_ref.calibrate: the threshold law thresh * L = alpha * exp(beta * s)
(docs/DESIGN.md §5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blasst_ref
from blasst_ref.calibrate import (
    FIT_RANGE, Calibration, CalibrationPoint, calibrate, default_thresholds, find_threshold,
    fit_law, main,
)
from blasst_ref.bench.backends import cpu_available
from blasst_ref.workloads import llm_like

BACKEND = "reference"  # small sizes: the numpy oracle is fast enough and needs no JIT


def _prefill_samples(lengths, heads=4, seed=0):
    return [llm_like(1, heads, 1, n, n, 64, seed=seed + n) for n in lengths]


@pytest.fixture(scope="module")
def prefill_cal():
    return calibrate(_prefill_samples([512, 1024]), phase="prefill", backend=BACKEND,
                     thresholds=default_thresholds([1024], per_decade=3), progress=False)


@pytest.fixture(scope="module")
def decode_cal():
    samples = [llm_like(1, 8, 2, 1, n, 64, seed=n) for n in (1024, 2048, 4096)]
    return calibrate(samples, phase="decode", backend=BACKEND, progress=False)


# ---------------------------------------------------------------------------------------
# the fit


@settings(deadline=None)
@given(ln_alpha=st.floats(-6, 6), beta=st.floats(1, 20), seed=st.integers(0, 2**16))
def test_fit_recovers_known_law(ln_alpha, beta, seed):
    """Synthetic measurements from a known law (with small noise in the sparsity, as tile
    counts have) give back alpha and beta."""
    rng = np.random.default_rng(seed)
    alpha = math.exp(ln_alpha)
    s = rng.uniform(0.05, 0.95, 60)
    L = rng.choice([1024, 4096, 16384, 65536], 60)
    t = alpha * np.exp(beta * s) / L
    s_meas = s + rng.normal(0, 0.002, 60)
    a_hat, b_hat, r2 = fit_law(L, t, s_meas)
    # noise of 0.002 in s moves ln(thresh*L) by ~beta * 0.002: both estimates stay close
    assert abs(b_hat - beta) < 0.03 * beta
    assert abs(math.log(a_hat) - ln_alpha) < 0.05 * beta
    assert r2 > 0.99


def test_fit_needs_two_sparsities():
    with pytest.raises(ValueError, match="two different sparsities"):
        fit_law([1024, 2048], [1e-3, 1e-4], [0.5, 0.5])


def test_scale_factor_and_threshold_follow_the_law(prefill_cal):
    cal = prefill_cal
    for s in (0.3, 0.5, 0.7):
        assert cal.scale_factor(s) == pytest.approx(cal.alpha * math.exp(cal.beta * s))
        for n in (1024, 65536):
            assert cal.threshold(n, s) == pytest.approx(cal.scale_factor(s) / n)
    assert cal.beta > 0  # more sparsity needs a larger threshold
    assert 0 < FIT_RANGE[0] < FIT_RANGE[1] < 1
    fit = [p for p in cal.table if p.in_fit]
    assert len(fit) >= 5
    assert all(FIT_RANGE[0] <= p.sparsity <= FIT_RANGE[1] and p.thresh > 0 for p in fit)


# ---------------------------------------------------------------------------------------
# the measurements


def test_sparsity_and_error_monotone_in_threshold(prefill_cal, decode_cal):
    for cal in (prefill_cal, decode_cal):
        for n in cal.lengths:
            rows = sorted((p for p in cal.table if p.context_len == n), key=lambda p: p.thresh)
            sp = [p.sparsity for p in rows]
            assert np.all(np.diff(sp) >= 0), (cal.phase, n, sp)
            assert sp[0] < 0.1 and sp[-1] > 0.5  # the default sweep spans the range
            assert rows[0].rel_error < 1e-3  # next to nothing skipped: next to dense


def test_table_errors_are_against_dense(prefill_cal):
    """Recompute one table entry by hand."""
    p = next(p for p in prefill_cal.table if p.context_len == 512 and 0.3 < p.sparsity < 0.8)
    q, k, v = _prefill_samples([512])[0]
    out, stt = blasst_ref.attention(q, k, v, p.thresh, causal=True, backend=BACKEND,
                                    return_stats=True)
    ref = blasst_ref.dense_attention(q, k, v, causal=True)
    assert stt.sparsity == p.sparsity
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) == pytest.approx(p.rel_error, rel=1e-6)
    assert p.n_samples == 1


def test_calibrated_threshold_transfers_to_unseen_length(prefill_cal):
    """Calibrated on L = 512 and 1024, the law's threshold hits the target within 5 points
    at L = 2048, a length it never saw (other seeds too). Not tested at 0.7: there the
    exponential law misses by 5-7 points on this workload (docs/CALIBRATION.md says why)."""
    q, k, v = _prefill_samples([2048], seed=7)[0]
    for target in (0.3, 0.5, 0.9):
        t = prefill_cal.threshold(2048, target)
        _, stt = blasst_ref.attention(q, k, v, t, causal=True, backend=BACKEND, return_stats=True)
        assert abs(stt.sparsity - target) <= 0.05, (target, t, stt.sparsity)


def test_measured_threshold_and_slope(prefill_cal):
    cal = prefill_cal
    for n in cal.lengths:
        t = cal.measured_threshold(n, 0.5)
        rows = sorted((p for p in cal.table if p.context_len == n), key=lambda p: p.thresh)
        below = max(p.thresh for p in rows if p.sparsity < 0.5)
        above = min(p.thresh for p in rows if p.sparsity >= 0.5)
        assert below < t <= above
    assert math.isnan(cal.measured_threshold(512, 0.999))
    # The 1/L law on this workload: the measured slope is near -1.
    assert -1.4 < cal.length_slope(0.5) < -0.6


def test_decode_calibration(decode_cal):
    assert decode_cal.phase == "decode" and decode_cal.beta > 0
    assert decode_cal.lengths == [1024, 2048, 4096]


# ---------------------------------------------------------------------------------------
# files, plots, command line


def test_json_round_trip(prefill_cal, tmp_path):
    path = tmp_path / "cal.json"
    prefill_cal.save(path)
    back = Calibration.load(path)
    assert back == prefill_cal
    assert back.threshold(4096, 0.6) == prefill_cal.threshold(4096, 0.6)
    assert isinstance(back.table[0], CalibrationPoint)
    (tmp_path / "other.json").write_text(json.dumps({"alpha": 1}))
    with pytest.raises(ValueError, match="not a blasst_ref calibration"):
        Calibration.load(tmp_path / "other.json")


def test_plot(prefill_cal):
    import matplotlib

    matplotlib.use("Agg")
    fig = prefill_cal.plot(targets=(0.5, 0.7))
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_cli(capsys, tmp_path):
    out_path = tmp_path / "c.json"
    rc = main(["--phase", "decode", "--lengths", "512", "1024", "--target", "0.3", "0.5",
               "--heads", "4", "--kv-heads", "1", "--backend", BACKEND, "--quiet",
               "--eval-lengths", "1024", "4096", "--save", str(out_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "thresh * L =" in text and "L=4096" in text and "sparsity" in text
    cal = Calibration.load(out_path)
    assert cal.phase == "decode" and cal.lengths == [512, 1024]
    assert f"{cal.scale_factor(0.5):.4g}" in text


# ---------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_named(prefill_cal):
    q, k, v = llm_like(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="samples is empty"):
        calibrate([], progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="samples is empty"):
        calibrate(iter([]), progress=False, backend=BACKEND)
    with pytest.raises(TypeError, match=r"samples\[0\]"):
        calibrate([(q, k)], progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="thresholds"):
        calibrate([(q, k, v)], thresholds=[0.1, 1.0], progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="thresholds"):
        calibrate([(q, k, v)], thresholds=[-0.1], progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="thresholds"):
        calibrate([(q, k, v)], thresholds=[], progress=False, backend=BACKEND)
    q2, k2, v2 = llm_like(1, 2, 1, 64, 64, 32)
    with pytest.raises(ValueError, match="mixed head dims"):
        calibrate([(q, k, v), (q2, k2, v2)], progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="phase='decode'"):
        calibrate([(q, k, v)], phase="decode", progress=False, backend=BACKEND)
    qd, kd, vd = llm_like(1, 2, 1, 1, 64, 16)
    with pytest.raises(ValueError, match=r"samples\[1\].*phase='prefill'"):
        calibrate([(q, k, v), (qd, kd, vd)], phase="prefill", progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="phase"):
        calibrate([(q, k, v)], phase="train", progress=False, backend=BACKEND)
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target_sparsity"):
            prefill_cal.scale_factor(bad)
        with pytest.raises(ValueError, match="target_sparsity"):
            prefill_cal.threshold(4096, bad)
    with pytest.raises(ValueError, match="context_len"):
        prefill_cal.threshold(0, 0.5)
    with pytest.raises(ValueError, match="not in the table"):
        prefill_cal.measured_threshold(777, 0.5)


# ---------------------------------------------------------------------------------------
# find_threshold: one input, one target sparsity

#: the search makes tens of calls at L=512: the Numba kernels when they import
SEARCH_BACKEND = "cpu" if cpu_available()[0] else "reference"


def test_find_threshold_reaches_target():
    q, k, v = llm_like(1, 4, 2, 512, 512, 32, seed=1, peakedness=2.0)
    cache: dict = {}
    for target in (0.5, 0.75):
        res = find_threshold(q, k, v, target, causal=True, backend=SEARCH_BACKEND, tol=0.03,
                             cache=cache)
        assert res.reached and abs(res.sparsity - target) <= 0.03, res
        assert 0 < res.thresh < 1
        _, stats = blasst_ref.attention(q, k, v, res.thresh, causal=True,
                                        backend=SEARCH_BACKEND, return_stats=True)
        assert stats.sparsity == pytest.approx(res.sparsity)  # the search reports what it saw
    with pytest.raises(ValueError):
        find_threshold(q, k, v, 1.0, causal=True, backend=SEARCH_BACKEND)
