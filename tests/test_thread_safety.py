"""What the README's "Thread safety" promises: ``attention`` (cpu) and one shared
``CompiledGraph`` may be called from several threads at once; every call returns exactly
what the same call returns alone, and the process's BLAS thread limits are what they were
once the calls are done.

The calls of each thread start together (a barrier), so that they overlap as much as two
cores let them; the problems are small, so a property runs in seconds."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from helpers import random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_graphs
from threadpoolctl import threadpool_info

from blasst_ref import attention
from blasst_ref import graph as bg
from blasst_ref.numba_utils import blas_single_threaded

def _blas_threads() -> list[int]:
    """The thread limit of every BLAS library loaded (scipy's, which Numba's ``np.dot``
    calls, is loaded first: a library loaded between two looks would change the list)."""
    import scipy.linalg.cython_blas  # noqa: F401

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def run_in_threads(jobs_per_thread: list[list], run) -> list[list]:
    """Run ``run(job)`` for every job, one thread per list, all threads released together;
    returns the results in the same nesting. Re-raises the first exception of a thread.

    The interpreter switches threads every few microseconds meanwhile (instead of every
    5 ms): the Numba kernels hold the GIL, so without this the Python parts of two calls
    (where the state that a race could break lives) would seldom interleave."""
    start = threading.Barrier(len(jobs_per_thread))
    results: list[list] = [[None] * len(jobs) for jobs in jobs_per_thread]
    errors: list[BaseException] = []

    def worker(t):
        try:
            start.wait()
            for j, job in enumerate(jobs_per_thread[t]):
                results[t][j] = run(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(jobs_per_thread))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------------
# the BLAS thread limit


def test_the_blas_limit_holds_for_every_thread_and_is_restored():
    """Thread A enters; thread B enters while A is inside (or waits for its turn); A
    leaves; B must still run with BLAS at one thread, and once B leaves the limit from
    before is back. (Each thread limiting and restoring on its own left BLAS at one thread
    for the whole process, or let B run under the limit A restored.)"""
    before = _blas_threads()
    a_in, b_trying, a_out = (threading.Event() for _ in range(3))
    seen = {}

    def a():
        with blas_single_threaded():
            seen["a"] = _blas_threads()
            a_in.set()
            b_trying.wait(timeout=60)
            time.sleep(0.05)  # B is inside now, or blocked on its turn
        a_out.set()

    def b():
        a_in.wait(timeout=60)
        b_trying.set()
        with blas_single_threaded():
            a_out.wait(timeout=60)  # while B is inside, A leaves (if it has not yet)
            seen["b"] = _blas_threads()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert set(seen["a"]) == {1} and set(seen["b"]) == {1}, seen
    assert _blas_threads() == before


def test_the_blas_limit_nests_in_one_thread():
    before = _blas_threads()
    with blas_single_threaded():
        with blas_single_threaded():
            assert set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == before


# ---------------------------------------------------------------------------------------
# attention (cpu)

#: (b, hq, hkv, lq, lk, d, causal): prefill and decode, MHA and GQA
_PROBLEMS = [(1, 2, 2, 40, 56, 16, True), (2, 4, 2, 24, 24, 8, False),
             (1, 4, 1, 3, 130, 16, True), (1, 2, 2, 1, 70, 8, False)]


@settings(max_examples=20)
@given(n_threads=st.integers(2, 5), calls=st.integers(1, 3),
       picks=st.lists(st.integers(0, len(_PROBLEMS) - 1), min_size=15, max_size=15),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_concurrent_cpu_attention_equals_serial(n_threads, calls, picks, dtype, seed):
    problems = []
    for i, p in enumerate(_PROBLEMS):
        b, hq, hkv, lq, lk, d, causal = p
        q, k, v = random_qkv(seed + i, b, hq, hkv, lq, lk, d, dtype=dtype, sink=10.0)
        problems.append((q, k, v, causal))

    def run(i):
        q, k, v, causal = problems[i]
        out, st_ = attention(q, k, v, 0.02, causal=causal, backend="cpu", block_q=16,
                             block_k=8, return_stats=True)
        return out, st_.tile_map

    jobs = [[picks[(t * calls + c) % len(picks)] for c in range(calls)]
            for t in range(n_threads)]
    before = _blas_threads()
    serial = {i: run(i) for i in set(sum(jobs, []))}
    got = run_in_threads(jobs, run)
    assert _blas_threads() == before
    for t, thread_jobs in enumerate(jobs):
        for j, i in enumerate(thread_jobs):
            np.testing.assert_array_equal(got[t][j][0], serial[i][0])
            np.testing.assert_array_equal(got[t][j][1], serial[i][1])




# ---------------------------------------------------------------------------------------
# one CompiledGraph shared by threads

#: compile switches: the BLAS-matmul and unfused forms run no call-long BLAS limit, so
#: their calls really overlap; the default form takes turns with its packed matmuls
GRAPH_SWITCHES = [dict(matmul_kernel="blas"), dict(fuse=False), dict(), dict(inplace=False)]


def _feed_variants(g, feeds, n, seed):
    """``n`` feeds of the graph: the drawn ones and fresh Gaussian ones of the same shapes."""
    rng = np.random.default_rng(seed)
    out = [feeds]
    for _ in range(n - 1):
        out.append({name: rng.standard_normal(x.shape).astype(x.dtype)
                    for name, x in feeds.items()})
    return out


@settings(max_examples=15)
@given(data=random_graphs(), switches=st.sampled_from(GRAPH_SWITCHES),
       n_threads=st.integers(2, 5), calls=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_one_compiled_graph_called_from_threads_equals_serial(data, switches, n_threads,
                                                              calls, seed):
    g, feeds = data
    cg = bg.compile(g, **switches)
    variants = _feed_variants(g, feeds, 4, seed)
    serial = [cg(**f) for f in variants]
    before = _blas_threads()
    jobs = [[(t + c) % len(variants) for c in range(calls)] for t in range(n_threads)]
    got = run_in_threads(jobs, lambda i: cg(**variants[i]))
    assert _blas_threads() == before
    for t, thread_jobs in enumerate(jobs):
        for j, i in enumerate(thread_jobs):
            assert list(got[t][j]) == list(serial[i])
            for name in serial[i]:
                np.testing.assert_array_equal(got[t][j][name], serial[i][name])


@pytest.mark.parametrize("model", ["llm-gqa", "bert-int8"])
def test_a_compiled_model_called_from_threads_equals_serial(model):
    """Attention (BLASST, with its skip statistics) and int8 kernels in one shared graph."""
    if model == "llm-gqa":
        g = bg.models.llm_block(1, 48, 64, 4, 2, seed=1)
        cg = bg.compile(g, attention_thresh=0.01, attention_block=(16, 16))
    else:
        g = bg.models.bert_layer(2, 16, 64, 4, seed=2)
        samples = [bg.models.example_inputs(g, seed=s) for s in range(2)]
        cg = bg.compile(bg.quantize_graph(g, samples))
    variants = [bg.models.example_inputs(g, seed=10 + s) for s in range(3)]
    serial = [cg(**f) for f in variants]
    jobs = [[(t + c) % 3 for c in range(3)] for t in range(4)]
    got = run_in_threads(jobs, lambda i: cg(**variants[i]))
    for t, thread_jobs in enumerate(jobs):
        for j, i in enumerate(thread_jobs):
            for name in serial[i]:
                np.testing.assert_array_equal(got[t][j][name], serial[i][name])
    assert cg.calls == 3 + 12 and cg.attention_stats is not None
