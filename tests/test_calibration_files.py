"""A :class:`blasst_ref.Calibration` is a file users keep: saving never loses the previous
file, the object holds plain Python values (so it can always be saved), and loading checks
every field, naming the file and the field in its errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blasst_ref.calibrate import Calibration, CalibrationPoint, calibrate, default_thresholds
from blasst_ref.workloads import llm_like


def _point(**changes) -> dict:
    p = dict(context_len=256, thresh=0.01, sparsity=0.5, rel_error=1e-3, n_samples=2,
             in_fit=True)
    p.update(changes)
    return p


def _calibration_dict(**changes) -> dict:
    d = dict(alpha=0.02, beta=9.5, phase="prefill", causal=True, block_q=64, block_k=32,
             backend="cpu", table=[_point(), _point(thresh=0.05, sparsity=0.7)], r2=0.97)
    d.update(changes)
    return d


def _calibration(**changes) -> Calibration:
    d = _calibration_dict(**changes)
    d["table"] = tuple(CalibrationPoint(**p) for p in d["table"])
    return Calibration(**d)


# ---------------------------------------------------------------------------------------
# saving


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    good = _calibration()
    good.save(path)
    before = path.read_bytes()

    to_dict = Calibration.to_dict

    def unencodable(self):  # json.dump writes part of the file before it meets the object
        d = to_dict(self)
        d["r2"] = object()
        return d

    monkeypatch.setattr(Calibration, "to_dict", unencodable)
    with pytest.raises(TypeError, match="not JSON serializable"):
        good.save(path)
    assert path.read_bytes() == before
    assert Calibration.load(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json"]  # no temporary left


def test_saving_into_a_missing_folder_is_the_plain_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        _calibration().save(tmp_path / "no" / "cal.json")


def test_a_saved_file_has_the_permissions_of_a_plain_open(tmp_path):
    _calibration().save(tmp_path / "cal.json")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "cal.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode


def test_calibrate_with_numpy_block_sizes_saves_and_loads(tmp_path):
    samples = [llm_like(1, 2, 1, n, n, 32, seed=n) for n in (128, 256)]
    cal = calibrate(samples, phase="prefill", backend="reference", block_q=np.int64(16),
                    block_k=np.uint16(16), thresholds=default_thresholds([256], per_decade=2),
                    progress=False)
    assert type(cal.block_q) is int and type(cal.block_k) is int
    cal.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json") == cal


_NUMPY_INTS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


@given(int_type=st.sampled_from(_NUMPY_INTS), float_type=st.sampled_from(_NUMPY_FLOATS),
       block=st.integers(1, 127), alpha=st.floats(1e-4, 10), beta=st.floats(-20, 20),
       in_fit=st.booleans())
def test_numpy_scalars_become_python_values_when_built(int_type, float_type, block, alpha,
                                                       beta, in_fit):
    point = CalibrationPoint(context_len=int_type(100), thresh=float_type(0.25),
                             sparsity=float_type(0.5), rel_error=float_type(0.001),
                             n_samples=int_type(3), in_fit=np.bool_(in_fit))
    cal = Calibration(alpha=float_type(alpha), beta=float_type(beta), phase="decode",
                      causal=np.bool_(True), block_q=int_type(block), block_k=int_type(block),
                      backend="reference", table=[point], r2=float_type(0.5))
    for obj, fields in ((point, dict(context_len=int, thresh=float, sparsity=float,
                                     rel_error=float, n_samples=int, in_fit=bool)),
                        (cal, dict(alpha=float, beta=float, causal=bool, block_q=int,
                                   block_k=int, r2=float))):
        for name, kind in fields.items():
            assert type(getattr(obj, name)) is kind, name
    assert cal.table == (point,)  # a list becomes a tuple (the dataclass is frozen)
    assert point.context_len == 100 and cal.block_k == block
    assert cal.alpha == float(float_type(alpha))
    json.dumps(cal.to_dict())  # encodable


def test_bad_values_are_rejected_when_built():
    with pytest.raises(ValueError, match=r"block_q must be a positive integer or None, got -5"):
        _calibration(block_q=-5)
    with pytest.raises(ValueError, match=r"phase must be 'prefill' or 'decode', got 'bogus'"):
        _calibration(phase="bogus")
    with pytest.raises(TypeError, match=r"alpha must be a finite number > 0, got 'abc'"):
        _calibration(alpha="abc")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        CalibrationPoint(**_point(sparsity=1.5))


# ---------------------------------------------------------------------------------------
# loading


def _write(tmp_path, text: str):
    path = tmp_path / "cal.json"
    path.write_text(text, encoding="utf-8")
    return path


def _dumped(d: dict) -> str:
    return json.dumps(dict(d, format="blasst_ref.calibration/1"))


def test_load_round_trips_a_valid_file(tmp_path):
    cal = _calibration(r2=math.nan, block_q=None)
    cal.save(tmp_path / "cal.json")
    back = Calibration.load(tmp_path / "cal.json")
    assert back.table == cal.table and back.block_q is None and math.isnan(back.r2)


_FIELDS = ("alpha", "beta", "phase", "causal", "block_q", "block_k", "backend", "table", "r2")


@pytest.mark.parametrize("field", _FIELDS)
def test_load_names_a_missing_field(tmp_path, field):
    d = _calibration_dict()
    del d[field]
    path = _write(tmp_path, _dumped(d))
    with pytest.raises(ValueError, match=rf"{path}: missing field '{field}'"):
        Calibration.load(path)


#: (field, bad value, what the message says about it)
_BAD_FIELDS = [
    ("alpha", "abc", r"alpha must be a finite number > 0, got 'abc'"),
    ("alpha", -1.0, r"alpha must be a finite number > 0, got -1.0"),
    ("alpha", None, r"alpha must be a finite number > 0, got None"),
    ("beta", "x", r"beta must be a finite number, got 'x'"),
    ("beta", [1], r"beta must be a finite number, got \[1\]"),
    ("phase", "bogus", r"phase must be 'prefill' or 'decode', got 'bogus'"),
    ("causal", "yes", r"causal must be a bool, got 'yes'"),
    ("causal", 1, r"causal must be a bool, got 1"),
    ("block_q", -5, r"block_q must be a positive integer or None, got -5"),
    ("block_k", 2.5, r"block_k must be a positive integer or None, got 2.5"),
    ("block_k", True, r"block_k must be a positive integer or None, got True"),
    ("backend", "gpu", r"backend must be one of .*got 'gpu'"),
    ("table", "rows", r"table must be a list of points, got 'rows'"),
    ("table", [[1, 2]], r"table\[0\] must be an object"),
    ("table", [_point(thresh=2.0)], r"table\[0\]\.thresh must be in \[0, 1\), got 2.0"),
    ("table", [_point(), _point(context_len=0)],
     r"table\[1\]\.context_len must be a positive integer, got 0"),
    ("table", [_point(in_fit="no")], r"table\[0\]\.in_fit must be a bool, got 'no'"),
    ("table", [dict(_point(), extra=1)], r"table\[0\]: unknown field 'extra'"),
    ("table", [{k: v for k, v in _point().items() if k != "n_samples"}],
     r"table\[0\]: missing field 'n_samples'"),
    ("r2", "high", r"r2 must be a number, got 'high'"),
]


@pytest.mark.parametrize("field,value,message", _BAD_FIELDS,
                         ids=[f"{i}-{f}" for i, (f, _, _) in enumerate(_BAD_FIELDS)])
def test_load_names_the_file_and_the_bad_field(tmp_path, field, value, message):
    path = _write(tmp_path, _dumped(_calibration_dict(**{field: value})))
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        Calibration.load(path)


@pytest.mark.parametrize("text,message", [
    ("", r"is not a JSON file"),
    ("{\"alpha\": ", r"is not a JSON file"),
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    ("[1, 2]", r"is not a blasst_ref calibration file"),
    ("{\"format\": \"blasst_ref.calibration/1\", \"alpha\": 1, \"colour\": 3}",
     r"unknown field 'colour'"),
], ids=["empty", "truncated", "deep", "list", "unknown-field"])
def test_load_names_the_file_when_it_is_not_a_calibration(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=rf"^{path}: .*{message}|^{path} {message}"):
        Calibration.load(path)


def test_load_names_the_file_for_bytes_that_are_not_text(tmp_path):
    path = tmp_path / "cal.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=rf"^{path} is not a JSON file"):
        Calibration.load(path)
