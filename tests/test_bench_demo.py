"""The benchmark harness and the demo: they run end to end and count what they claim.

Correctness tests of the harness only: no assertion here depends on a timing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import blasst_ref as br
from blasst_ref.bench import __main__ as bench_main
from blasst_ref.bench.attention_cases import ThreshSpec, parse_thresh
from blasst_ref.bench.backends import cpu_available
from blasst_ref.bench.flops import attention_flops, visible_pairs
from blasst_ref.bench.oracle import dense_oracle, rel_l2
from blasst_ref.bench.timing import Variant, calls_needed, measure
from blasst_ref.bench.torch_peers import torch_available

HAVE_CPU = cpu_available()[0]
HAVE_TORCH = torch_available()[0]
#: every host backend the bench can time here (cpu-noskip and torch exercise their own paths)
HOST_BACKENDS = ["reference"] + (["cpu", "cpu-noskip"] if HAVE_CPU else []) + (
    ["torch"] if HAVE_TORCH else [])

ROW_KEYS = {
    "case", "phase", "backend", "B", "Hq", "Hkv", "Lq", "Lk", "Dqk", "Dv", "causal", "dtype",
    "thresh", "thresh_spec", "sparsity", "skipped_tiles", "visited_tiles", "ms", "ms_min",
    "repeats", "warmup_ms", "flops", "gflops", "rel_err", "speedup_vs_dense",
    "speedup_vs_torch", "machine",
}


# ---------------------------------------------------------------------------------------
# FLOP count


def brute_force_pairs(lq: int, lk: int, causal: bool) -> int:
    """Visible (i, j) pairs by enumeration: row i sees key j iff j <= i + (Lk - Lq)."""
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    return int((j <= i + (lk - lq)).sum()) if causal else lq * lk


@pytest.mark.parametrize("lq, lk", [
    (1, 1), (1, 7), (1, 32768), (5, 9), (16, 1000),         # Lq < Lk (decode, chunked prefill)
    (7, 7), (128, 128), (4096, 4096),                       # Lq == Lk
    (9, 5), (100, 3), (2, 1),                               # Lq > Lk: early rows see nothing
])
@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_match_brute_force(lq, lk, causal):
    assert visible_pairs(lq, lk, causal) == brute_force_pairs(lq, lk, causal)


def test_attention_flops_formula():
    # no mask, Dqk == Dv == D: the familiar 4 * B * H * Lq * Lk * D
    assert attention_flops(2, 8, 4096, 4096, 64, 64, False) == 4 * 2 * 8 * 4096 * 4096 * 64
    # causal square prefill: the triangle L (L + 1) / 2, with Dqk != Dv (MLA-like)
    b, h, lq, lk, dqk, dv = 1, 3, 100, 100, 576, 512
    assert attention_flops(b, h, lq, lk, dqk, dv, True) == \
        2 * b * h * (lq * (lq + 1) // 2) * (dqk + dv)
    # decode: one row sees every key, causal or not
    assert attention_flops(1, 32, 1, 32768, 128, 128, True) == \
        attention_flops(1, 32, 1, 32768, 128, 128, False) == 2 * 32 * 32768 * 256


# ---------------------------------------------------------------------------------------
# oracle, thresholds, timing


@pytest.mark.parametrize("lq, lk", [(37, 37), (5, 60), (60, 20), (1, 100)])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_oracle_equals_dense_attention(lq, lk, causal):
    rng = np.random.default_rng(lq * 1000 + lk)
    q = rng.standard_normal((2, 4, lq, 8))
    k = rng.standard_normal((2, 2, lk, 8))
    v = rng.standard_normal((2, 2, lk, 5))
    got = dense_oracle(q, k, v, causal=causal, block_rows=16)
    want = br.dense_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert rel_l2(got, want) < 1e-12


@pytest.mark.parametrize("text, want", [
    ("0", ThreshSpec(value=0.0)), ("1e-3", ThreshSpec(value=1e-3)),
    ("auto:0.75", ThreshSpec(target=0.75)), ("AUTO:0.5", ThreshSpec(target=0.5)),
    ("auto:0", ThreshSpec(value=0.0)),
])
def test_parse_thresh(text, want):
    assert parse_thresh(text) == want


@pytest.mark.parametrize("text", ["1", "1.5", "-0.1", "nan", "x", "auto:", "auto:1", "auto:-1"])
def test_parse_thresh_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_thresh(text)


def test_measure_interleaves_and_counts():
    calls = []
    variants = [Variant("a", lambda: calls.append("a") or 1),
                Variant("b", lambda: calls.append("b") or 2, max_repeat=1),
                Variant("c", lambda: calls.append("c") or 3, warm_is_timed=True)]
    res = measure(variants, 3, on_warm=lambda v, r: r * 10)
    assert calls[:3] == ["a", "b", "c"]  # warm-ups first
    assert len(calls) == calls_needed(variants, 3) == 3 + 3 + 1 + 2
    assert [len(res[n].samples_ms) for n in "abc"] == [3, 1, 3]
    assert [res[n].result for n in "abc"] == [10, 20, 30]
    assert calls[3:6] == ["a", "b", "c"] and calls[6] == "c"  # second round rotated by one


def test_measure_in_blocks_times_steady_state():
    calls = []
    variants = [Variant("a", lambda: calls.append("a")), Variant("b", lambda: calls.append("b"))]
    res = measure(variants, 4, blocks=2, rewarm=1)
    assert [len(res[n].samples_ms) for n in "ab"] == [4, 4]
    # warm-ups, then block 1 (a: 1 rewarm + 2 timed, b: same), then block 2 reversed
    assert "".join(calls) == "ab" + "aaa" + "bbb" + "bbb" + "aaa"


# ---------------------------------------------------------------------------------------
# the bench CLI, end to end at tiny sizes


def _bench(capsys, *argv) -> str:
    assert bench_main.main(["attention", *argv, "--quiet"]) == 0
    return capsys.readouterr().out


TINY = ["--L", "256", "--Hq", "2", "--Hkv", "1", "--D", "16", "--repeat", "1"]


def test_bench_table(capsys):
    out = _bench(capsys, *TINY, "--thresh", "0", "0.01", "auto:0.5",
                 "--backend", *HOST_BACKENDS, "--knob", "peakedness=2")
    lines = out.splitlines()
    assert lines[0].startswith("machine: ") and "numba" in lines[0] and "numpy" in lines[0]
    header = next(ln for ln in lines if ln.startswith("backend"))
    for col in ("thresh", "sparsity", "ms", "GFLOP/s", "rel.err", "vs dense", "vs torch"):
        assert col in header
    assert "Lq=256 Lk=256" in out and "auto:0.5 -> thresh" in out
    assert "issue" not in out.lower()  # targets are named after what they measure
    for backend in HOST_BACKENDS:
        assert any(ln.startswith(backend + " ") for ln in lines), backend


def test_bench_json_lines(capsys):
    out = _bench(capsys, "--phase", "decode", "--L", "2048", "--Hq", "4", "--Hkv", "2",
                 "--D", "16", "--repeat", "1", "--thresh", "0", "auto:0.5", "--json",
                 "--backend", *HOST_BACKENDS)
    rows = [json.loads(ln) for ln in out.splitlines()]  # every line is one JSON object
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    assert {r["backend"] for r in rows} == set(HOST_BACKENDS)
    assert all(r["phase"] == "decode" and r["Lq"] == 1 and r["Lk"] == 2048 for r in rows)
    assert all(r["flops"] == attention_flops(1, 4, 1, 2048, 16, 16, True) for r in rows)
    dense = [r for r in rows if r["thresh"] == 0]
    assert all(r["rel_err"] < 1e-5 and r["sparsity"] == 0 for r in dense)
    sparse = [r for r in rows if r["thresh"] > 0]
    assert sparse and all(r["thresh_spec"] == "auto:0.5" for r in sparse)
    if HAVE_CPU:
        cpu0 = next(r for r in rows if r["backend"] == "cpu" and r["thresh"] == 0)
        assert cpu0["speedup_vs_dense"] == 1.0 and "overhead_vs_noskip" in cpu0


def test_bench_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedup.png"
    _bench(capsys, *TINY, "--thresh", "0", "0.05", "--backend", "reference", "--no-error",
           "--plot", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [
    ["--thresh", "1.5"], ["--thresh", "auto:x"], ["--Hq", "6", "--Hkv", "4"],
    ["--preset", "cpu", "--L", "128"], ["--phase", "decode", "--Lq", "32"],
    ["--L", "8"], ["--repeat", "0"], ["--backend", "nope"], ["--knob", "nope=1"],
    ["--knob", "peakedness"],
])
def test_bench_bad_input_is_an_argparse_error(argv, capsys):
    if "--backend" not in argv:
        argv = [*argv, "--backend", "reference"]
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["attention", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_module_entry_points_run():
    for mod in ("blasst_ref.bench", "blasst_ref.demo"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout


# ---------------------------------------------------------------------------------------
# the demo


def test_demo_small_table(capsys):
    from blasst_ref import demo

    assert demo.main(["--small", "--repeat", "1"]) == 0
    out, err = capsys.readouterr()
    # it says what it does as it goes: a stamped line per stage on stderr ...
    stages = err.splitlines()
    assert stages and all(re.match(r"\[ *\d+\.\d s\] \S", ln) for ln in stages), err
    for what in ("searching the thresholds", "dense attention in float64", "timing reference",
                 "decode: llm_like inputs", "done"):
        assert any(what in ln for ln in stages), (what, err)
    if HAVE_CPU:  # ... and whether Numba compiles the kernels or loads them from its cache
        assert any("Numba compiles the CPU kernels" in ln or "Numba's on-disk cache" in ln
                   for ln in stages), err
    # the thresholds are related to calibrate's workload (peakedness 1)
    assert "calibrate --peakedness 2" in out and "t ** (1/p)" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("backend"))
    for col in demo.COLUMNS:
        assert col in header
    assert out.startswith("machine: ")
    assert "What this shows" in out and "2/(2-s)" in out
    backends = {"reference"} | ({"cpu"} if HAVE_CPU else set())
    for b in backends:
        assert any(ln.startswith(b + " ") for ln in out.splitlines())


def test_demo_json(capsys, monkeypatch):
    from blasst_ref import demo

    # the same code path as --small, on two even smaller cases (the table test runs --small)
    monkeypatch.setitem(demo.CASES, True, (demo.DemoCase("prefill", 1, 2, 1, 128, 128, 16),
                                           demo.DemoCase("decode", 1, 2, 1, 1, 1024, 16)))
    assert demo.main(["--small", "--json", "--repeat", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # --quiet: no progress lines
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    for r in rows:
        assert {"backend", "phase", "heads", "thresh", "sparsity", "rel_err", "ms",
                "speedup_vs_dense"} <= set(r)
        if r["thresh"] == 0:
            assert r["sparsity"] == 0 and r["rel_err"] < 1e-5 and r["speedup_vs_dense"] == 1.0
        else:
            assert 0 < r["sparsity"] < 1 and 0 < r["rel_err"] < 1


def test_bench_graph_table_and_json(capsys):
    import json

    assert bench_main.main(["graph", "--model", "dlrm-bottom", "bert", "--batch", "2",
                            "--seq", "16", "--repeat", "1", "--no-onnx", "--json", "--blocks", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["dlrm-bottom", "bert"]
    for r in rows:
        assert set(r["ms"]) == {"interpret", "compiled-packed", "compiled-blas", "compiled-nofuse"}
        assert r["rel_err_vs_interpret"] < 1e-4
        assert 0 < r["arena_bytes"] <= r["naive_bytes"]


def test_bench_int8_table_and_json(capsys):
    import json

    assert bench_main.main(["int8", "--size", "64", "--mlp", "dlrm-bottom:4", "--repeat", "1", "--blocks", "1",
                            "--json"]) == 0
    out = capsys.readouterr().out
    assert "int8 backend" in out and "GOP/s" in out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["matmul 64x64x64", "dlrm-bottom b=4"]
    for r in rows:
        assert r["int8_rel_err"] < 5e-2 and r["speedup"] > 0


# ---------------------------------------------------------------------------------------
# The benchmark's timing of the int8 rows (blasst_ref/bench/int8.py)
# ---------------------------------------------------------------------------------------


def test_bench_pause_is_never_timed():
    """``--quiet``: the pause and re-warm before each block run inside the block's first,
    untimed call; no timed sample contains them."""
    from blasst_ref.bench import int8 as B

    calls = {"a": 0, "b": 0}

    def fn(name):
        def f():
            calls[name] += 1
        return f
    variants = [Variant("a", fn("a")), Variant("b", fn("b"))]
    t = B._measure(variants, 6, None, 2, 0.2)
    for name in ("a", "b"):
        assert len(t[name].samples_ms) == 6
        assert max(t[name].samples_ms) < 100, t[name].samples_ms  # a pause is 200 ms
        assert calls[name] > 1 + 6 + 2 * 2  # warm-up, samples, rewarms, plus re-warm calls


def test_bench_ort_columns():
    from blasst_ref.bench import int8 as B

    if not B.ort_available():
        pytest.skip("onnx / onnxruntime not installed")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bench_main.main(["int8", "--mlp", "dlrm-bottom:8", "--repeat", "1", "--blocks",
                                "1", "--quiet", "0", "--json"]) == 0
    rows = [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.startswith("{")]
    assert len(rows) == 1 and {"ort-f32", "ort-int8"} <= set(rows[0]["ms"])
    # ORT's int8 error is ORT's: its int8 kernels differ by CPU and release (ORT 1.32 on an AVX2
    # CPU without VNNI: 7.3e-2 on this batch of 8, ours 1.6e-2 on the same QDQ graph; below
    # 5e-2 on a VNNI CPU). The check is that the column ran a quantized copy of the same
    # graph: a wrong graph errs by O(1).
    assert rows[0]["ort_int8_rel_err"] < 0.2 and rows[0]["speedup_vs_ort_int8"] > 0
    assert rows[0]["int8_rel_err"] < 5e-2                  # ours, on the same graph


def test_demo_knows_numbas_cache(tmp_path):
    from blasst_ref import demo

    assert not demo.cpu_kernels_cached([str(tmp_path)])
    (tmp_path / "prefill.other_function-12.py311.nbc").write_bytes(b"")  # data, no index
    assert not demo.cpu_kernels_cached([str(tmp_path)])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "prefill.prefill_kernel-95.py311.nbi").write_bytes(b"")
    assert demo.cpu_kernels_cached([str(tmp_path)])


@pytest.mark.parametrize("peakedness", [2.0, 3.0])
def test_peakedness_turns_a_threshold_into_a_power(peakedness):
    """The demo's note: a threshold t at peakedness p skips exactly the tiles that
    t ** (1/p) skips at peakedness 1 (llm_like scales every logit by p)."""
    from blasst_ref import demo
    from blasst_ref.workloads import llm_like

    one = llm_like(1, 4, 2, 512, 512, 32, seed=3)
    sharp = llm_like(1, 4, 2, 512, 512, 32, seed=3, peakedness=peakedness)
    for t in (1e-6, 1e-4, 1e-2):
        _, st_sharp = br.attention(*sharp, t, causal=True, backend="reference",
                                   return_stats=True)
        _, st_one = br.attention(*one, demo.peakedness_one_equivalent(t, peakedness),
                                 causal=True, backend="reference", return_stats=True)
        assert st_sharp.skipped_tiles > 0
        np.testing.assert_array_equal(st_sharp.tile_map, st_one.tile_map)


def test_calibrate_can_run_the_demos_workload(capsys):
    """``calibrate --peakedness 2`` calibrates the demo's workload, and says which it ran."""
    from blasst_ref.calibrate import main as calibrate_main

    argv = ["--lengths", "256", "512", "--target", "0.5", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "16", "--eval-lengths", "1024", "--quiet"]
    assert calibrate_main([*argv, "--peakedness", "2"]) == 0
    out = capsys.readouterr().out
    assert "peakedness=2," in out and "python -m blasst_ref.demo" not in out
    assert calibrate_main(argv) == 0
    out = capsys.readouterr().out  # the default workload points at the demo's
    assert "peakedness=1," in out and "--peakedness 2 calibrates that workload" in out
    with pytest.raises(SystemExit) as exc:
        calibrate_main([*argv, "--peakedness", "0"])
    assert exc.value.code == 2 and "--peakedness must be" in capsys.readouterr().err
