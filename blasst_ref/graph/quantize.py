"""Post-training static quantization: a float graph -> a QDQ int8 graph (docs/DESIGN.md §7.4).

:func:`quantize_graph` runs the float graph on sample inputs (the interpreter's
:func:`~.interpreter.trace`), observes the min/max of every tensor that feeds a MatMul with a
constant weight, and rewrites each such MatMul as ::

    a ─ Quantize(u8, s_a, z_a) ─ Dequantize ─┐
                                              MatMul ─ (post-ops as before)
    W_s8 (constant) ─ Dequantize(s_w[n]) ────┘

-- the "QDQ" form of ONNX. The result is still a float graph that the interpreter runs (its
numerics are those of the int8 model: the oracle of the int8 kernels), and
:func:`blasst_ref.graph.compile` lowers each QDQ MatMul to one ``QMatMul`` kernel
(:func:`~.passes.lower_int8`): u8 x s8 -> s32, the zero-point compensation precomputed from
the constant weights, rescale, post-ops and -- when the next op is another quantized
MatMul -- requantization before the store.

Formulas (round half to even, saturating, as ONNX QuantizeLinear):

* activations, per tensor, asymmetric u8: with ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``
  (0 must be exact), ``s_a = (hi - lo) / 255`` and ``z_a = round(-lo / s_a)``;
  ``q = clip(round(x / s_a) + z_a, 0, 255)``, ``x ~ (q - z_a) s_a``;
* weights, per output channel ``n`` (``weights="per_channel"``) or per tensor, symmetric
  s8: ``s_w = max|W[:, n]| / 127``, ``q = clip(round(W / s_w), -127, 127)``.

Bias correction (``bias_correction=True``, the default; Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019): rounding the weights
changes a layer's output by ``a @ dW`` with ``dW = W_q s_w - W``. Its mean over the inputs,
``mean(a) @ dW``, is a per-channel shift that does not average out -- after a ReLU or GELU
``mean(a)`` is far from 0 -- and it is subtracted from the bias (an ``Add`` of a constant
``(N,)`` bias after the MatMul; one is inserted where there is none), with ``mean(a)``
observed on the samples. It removes the systematic part of the weight error; the random part
and the activations' rounding stay.

Dynamic activations (``activations="dynamic"``, docs/DESIGN.md §7.4): instead of one calibrated
scale per tensor, each row (token) of an activation gets its own u8 scale and zero point,
computed at run time (:mod:`.ops_dynamic`: ONNX's ``DynamicQuantizeLinear`` applied per
row). The QDQ form is then ::

    a ─ DynamicQuantizeRows ─(q, scale, zp)─ DequantizeRows ─┐
                                                              MatMul ─ (post-ops)
    W_s8 (constant) ─ Dequantize(s_w[n]) ────────────────────┘

which the compiler lowers to one ``QMatMulDynamic`` kernel (the rows quantized in one pass,
u8 x s8 -> s32, per-row rescale and compensation in the epilogue). The samples then serve
bias correction only.

Attention itself stays in float (BLASST); its Q/K/V/output projections are MatMuls with
constant weights, so they become int8.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from . import ops_dynamic as _ops_dynamic  # noqa: F401  (registers DynamicQuantizeRows, ...)
from .interpreter import trace
from .ir import Graph, GraphError, Node
from .ops import quantize_array
from .passes import rewrite, single_consumer

__all__ = ["activation_params", "quantize_graph", "weight_params"]


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of an asymmetric u8 quantization of the range ``[lo, hi]``,
    widened to hold 0 exactly."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise GraphError(f"cannot quantize a tensor whose observed range [{lo}, {hi}] is "
                         "not finite")
    if hi == lo:
        return 1.0, 0
    scale = (hi - lo) / 255.0
    return scale, int(np.clip(np.rint(-lo / scale), 0, 255))


def weight_params(w: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(w_s8, scale)`` of the symmetric s8 quantization of ``w`` ``(K, N)``: ``scale`` is
    ``(N,)`` per output channel, or one value repeated, per tensor."""
    amax = np.abs(w).max(axis=0) if per_channel else np.full(w.shape[1], np.abs(w).max())
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_graph(g: Graph, samples, weights: str = "per_channel",
                   bias_correction: bool = True, activations: str = "static") -> Graph:
    """Insert Quantize/Dequantize around every MatMul with a constant float ``(K, N)`` weight.

    Args:
        g: a float graph (e.g. from :mod:`blasst_ref.graph.models`).
        samples: calibration inputs: one feed dict, or an iterable of feed dicts; activation
            ranges are the min/max observed over all of them. A sample whose inputs or
            observed activations hold NaN or inf is a GraphError naming the tensor.
        weights: ``"per_channel"`` (one scale per output column) or ``"per_tensor"``.
        bias_correction: subtract the mean output shift that weight rounding causes from the
            bias (module docstring); ``False`` gives plain min/max quantization.
        activations: ``"static"`` (default): one u8 scale per activation tensor, from the
            samples' min/max; ``"dynamic"``: one u8 scale per row (token), computed at run
            time (module docstring).

    Returns:
        A new graph (``g`` is not changed) with the same inputs and outputs.
    """
    if weights not in ("per_channel", "per_tensor"):
        raise ValueError(f"weights must be 'per_channel' or 'per_tensor', got {weights!r}")
    if activations not in ("static", "dynamic"):
        raise ValueError(f"activations must be 'static' or 'dynamic', got {activations!r}")
    if isinstance(samples, Mapping):
        samples = [samples]
    samples = list(samples) if isinstance(samples, Iterable) else None
    if not samples:
        raise ValueError("samples must be a feed dict or a non-empty list of feed dicts")
    targets = [n for n in g.nodes if n.op == "MatMul" and n.inputs[1] in g.constants
               and len(g.tensors[n.inputs[1]].shape) == 2
               and g.tensors[n.inputs[0]].dtype == "float32"
               and g.tensors[n.inputs[1]].dtype == "float32"]
    observed = {n.inputs[0] for n in targets}
    lo = {t: np.inf for t in observed}
    hi = {t: -np.inf for t in observed}
    row_sum = {t: np.zeros(g.tensors[t].shape[-1]) for t in observed}
    rows = {t: 0 for t in observed}
    producers = g.producers()
    for i, feeds in enumerate(samples):
        env = trace(g, feeds)
        _check_finite(g, env, observed, producers, i)
        for t in observed:
            lo[t] = min(lo[t], float(np.min(env[t])))
            hi[t] = max(hi[t], float(np.max(env[t])))
            flat = env[t].reshape(-1, env[t].shape[-1])
            row_sum[t] += flat.sum(axis=0, dtype=np.float64)
            rows[t] += flat.shape[0]
    users = g.consumers()

    fresh = g.name_generator()
    new_constants: dict[str, np.ndarray] = {}
    quantized: dict[str, str] = {}   # activation -> its dequantized (fake-quant) tensor
    wq_of: dict[str, str] = {}       # float weight -> its dequantized tensor
    replace: dict[str, list[Node]] = {}
    for node in targets:
        a, w = node.inputs
        before: list[Node] = []
        if a not in quantized and activations == "dynamic":
            q, s, z, dq = (fresh(f"{a}.{t}") for t in ("q", "scale", "zp", "dq"))
            before += [Node("DynamicQuantizeRows", (a,), (q, s, z), {}, q),
                       Node("DequantizeRows", (q, s, z), (dq,), {}, dq)]
            quantized[a] = dq
        elif a not in quantized:
            scale, zp = activation_params(lo[a], hi[a])
            q, dq = fresh(f"{a}.q"), fresh(f"{a}.dq")
            attrs = {"scale": scale, "zero_point": zp, "axis": None}
            before += [Node("Quantize", (a,), (q,), {**attrs, "dtype": "uint8"}, q),
                       Node("Dequantize", (q,), (dq,), {**attrs, "dtype": "float32"}, dq)]
            quantized[a] = dq
        if w not in wq_of:
            w_s8, w_scale = weight_params(g.constants[w], weights == "per_channel")
            w_name, dq = fresh(f"{w}.s8"), fresh(f"{w}.dq")
            new_constants[w_name] = w_s8
            before.append(Node("Dequantize", (w_name,), (dq,),
                               {"scale": w_scale, "zero_point": 0, "axis": 1,
                                "dtype": "float32"}, dq))
            wq_of[w] = (dq, w_s8, w_scale)
        dq_w, w_s8, w_scale = wq_of[w]
        matmul = Node("MatMul", (quantized[a], dq_w), node.outputs, {}, node.name)
        if not bias_correction:
            replace[node.name] = before + [matmul]
            continue
        d_w = w_s8.astype(np.float64) * w_scale - g.constants[w]
        shift = (row_sum[a] / rows[a]) @ d_w                       # (N,): mean of a @ dW
        y = node.outputs[0]
        add = single_consumer(g, users, y)
        bias = None if add is None or add.op != "Add" else next(
            (t for t in add.inputs if t != y and t in g.constants
             and g.constants[t].shape == shift.shape), None)
        if bias is not None:     # y + b  ->  y + (b - shift)
            b_name = fresh(f"{bias}.bc")
            new_constants[b_name] = (g.constants[bias] - shift).astype(g.constants[bias].dtype)
            replace[add.name] = [Node("Add", tuple(b_name if t == bias else t
                                                   for t in add.inputs),
                                      add.outputs, dict(add.attrs), add.name)]
            replace[node.name] = before + [matmul]
        else:                    # no bias to fold it into: y = MatMul(...) + (-shift)
            raw, b_name = fresh(f"{y}.raw"), fresh(f"{node.name}.bias_correction")
            new_constants[b_name] = (-shift).astype(np.float32)
            replace[node.name] = before + [
                Node("MatMul", matmul.inputs, (raw,), {}, node.name),
                Node("Add", (raw, b_name), (y,), {}, fresh(f"{node.name}.bc"))]
    out = rewrite(g, replace, new_constants)
    out.name = f"{g.name}-int8" + ("-dynamic" if activations == "dynamic" else "")
    return out


def _check_finite(g: Graph, env: dict, observed, producers, i: int) -> None:
    """A GraphError naming the first input, then the first observed activation, of sample
    ``i`` that holds a NaN or an inf: a range observed over it means nothing (a NaN even
    slips through min/max, and with bias correction makes every later output NaN)."""
    for what, names in (("input", g.inputs), ("tensor", sorted(observed))):
        for t in names:
            x = env[t]
            if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
                kind = "NaN" if np.isnan(x).any() else "inf"
                node = producers.get(t)
                made = f" ({node.op} {node.name})" if node is not None else ""
                raise GraphError(
                    f"quantize_graph: samples[{i}]: {what} {t!r}{made} holds {kind}; "
                    "calibration samples must give finite activations (the quantization "
                    "ranges are their min/max)")


def quantization_error(x: np.ndarray, scale: float, zero_point: int) -> float:
    """``max |dequantize(quantize(x)) - x|`` over ``x`` inside the quantized range: at most
    ``scale / 2`` (round half to even, no saturation inside the range)."""
    q = quantize_array(x, scale, zero_point, "uint8")
    return float(np.max(np.abs((q.astype(np.float64) - zero_point) * scale - x)))
