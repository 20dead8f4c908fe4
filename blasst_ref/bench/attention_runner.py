"""How one case of ``python -m blasst_ref.bench attention`` runs, and how it is shown.

:func:`run_case` resolves the case's thresholds (``auto:S`` through
:func:`blasst_ref.calibrate.find_threshold`), computes the exact result once, times every
(backend, threshold) variant in one interleaved measurement (:mod:`.timing`) and returns
one row per variant; :func:`target_notes` sets the rows against docs/DESIGN.md §4's CPU targets;
:func:`format_table` and :func:`write_plot` show them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from .. import tiling
from ..calibrate import find_threshold
from .attention_cases import Case, make_inputs
from .backends import cpu_available, to_device
from .flops import attention_flops, dense_kv_bytes, ideal_prefill_speedup
from .oracle import dense_oracle, rel_l2
from .timing import Variant, back_to_back, calls_needed, measure
from .torch_peers import TORCH_GPU, torch_gpu_sdpa_call, torch_sdpa_call

__all__ = ["CaseResult", "format_table", "resolve_thresholds", "run_case", "target_notes",
           "write_plot"]


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
                       progress_factory=None, decode_seed: str = "sink",
                       ) -> tuple[list[tuple[float, str]], list[str]]:
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
                             progress=None if bar is None else bar.update,
                             decode_seed=decode_seed)
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
             quiet: bool = False, decode_seed: str = "sink") -> CaseResult:
    """Benchmark one case on ``backends``; returns its rows (the columns are described in
    :mod:`blasst_ref.bench.attention`'s docstring). ``decode_seed``: decode's split-KV skip
    test for every BLASST row and ``auto:`` search (``"sink"`` or ``"none"``)."""
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
        dev = to_device((q, k, v), case.dtype)
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
            progress_factory=lambda d: bar(f"{case.title}: {d}"), decode_seed=decode_seed,
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
                                          block_q=block_q, block_k=block_k, return_stats=True,
                                          decode_seed=decode_seed),
                    max_repeat=1)  # slow: one timed run after the warm-up
        elif backend == "cpu":
            for t, label in threshes:
                kw = dict(causal=case.causal, backend="cpu", block_q=block_q, block_k=block_k,
                          decode_seed=decode_seed)
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
                kw = dict(causal=case.causal, backend="cuda", block_q=block_q, block_k=block_k,
                          decode_seed=decode_seed)
                timed, n = back_to_back(lambda t=t, kw=kw: attention(dq, dk, dvv, t, **kw), sync)
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
            timed, n = back_to_back(call, sync)
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
    kv_bytes = dense_kv_bytes(case.b, case.hkv, case.lk, case.dqk, case.dv, case.dtype)
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
            decode_seed=decode_seed if case.phase == "decode" else None,
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
    """One line per CPU target of docs/DESIGN.md §4 that this case's rows speak to (measured, not
    asserted: on a busy machine they are noisy)."""
    rows = {(r["backend"], r["thresh"]): r for r in result.rows}
    notes = []
    cpu0 = rows.get(("cpu", 0.0))
    if cpu0 and cpu0.get("overhead_vs_noskip") is not None:
        notes.append(f"thresh=0 overhead of the skip test (cpu vs cpu-noskip): "
                     f"{100 * cpu0['overhead_vs_noskip']:+.1f}% (target: <= 3%)")
    if cpu0 and cpu0["speedup_vs_torch"] and result.case.phase == "prefill":
        notes.append(f"cpu dense vs torch SDPA: {cpu0['speedup_vs_torch']:.2f}x "
                     f"(target: >= 1.0x)")
    goal = 1.4 if result.case.phase == "decode" else 1.5
    for r in result.rows:
        if r["backend"] in ("cpu", "cuda") and r["thresh"] > 0 and r["speedup_vs_dense"]:
            notes.append(
                f"{r['backend']} at sparsity {r['sparsity']:.2f}: {r['speedup_vs_dense']:.2f}x "
                f"over its dense (ideal 2/(2-s) = {r['ideal_speedup']:.2f}x; target at ~0.75: "
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
