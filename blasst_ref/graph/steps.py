"""How the compiled graph runs each op: one *step builder* per op, named by its ``OpDef``.

A step builder ``build(node, graph, options)`` returns the *step* of one node: a closure
``step(env)`` over the kernel that runs the op and the names it reads and writes, called by
:class:`~.compiler.CompiledGraph` on every run with ``env``, the dict of this run's arrays
(graph inputs, constants, and views into the arena at the planner's offsets). A step writes
its result into ``env[output]`` (its planned buffer; a view op rebinds the name instead).
:attr:`~.ops.OpDef.kernel` names an op's builder; a builder may return None for attributes
it does not handle, and an op without one runs its numpy meaning (:func:`evaluate_step`).

The kernels, op by op:

* ``PackedMatMul`` -> :func:`.f32_gemm.gemm` (the FMA micro-kernel, float32 on AVX2/AVX-512)
  or :func:`.kernels.matmul_packed` (blocks of BLAS calls), on weights packed at compile
  time, post-ops before the store;
* ``FusedMatMul`` on two activations -> numpy's matmul and :func:`.kernels.matmul_epilogue`;
* ``QMatMul`` -> :class:`.int8_kernels.QMatMulPlan` (u8 x s8 -> s32, built once here);
* a per-tensor float32 ``Quantize`` to u8/s8 -> :func:`.int8_kernels.quantize_unchecked`;
* ``LayerNorm`` and last-axis ``Softmax`` -> their Numba kernels; exact ``Gelu`` ->
  :func:`.kernels.gelu`;
* ``Attention`` -> :func:`blasst_ref.attention` (its skip statistics go to
  ``env[STATS_KEY]``);
* ``MatMul`` and the element-wise ops -> numpy (BLAS, ufuncs) writing straight into their
  planned buffer; ``Reshape`` -> a view; ``Transpose`` -> one copy;
* anything else (e.g. ``Dequantize``) -> the op's numpy meaning, copied into its buffer.

The Numba kernels take float32 and float64: a node of another dtype (a float16 graph) runs
its numpy meaning instead, at its own dtype, as the interpreter does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import kernels as K

__all__ = ["STATS_KEY", "StepOptions", "attention", "evaluate_step", "fused_matmul", "gelu",
           "layernorm", "matmul", "packed_matmul", "qmatmul", "quantize", "relu", "reshape",
           "softmax", "transpose", "ufunc"]

#: ``env`` key of ``{Attention node name: AttentionStats}`` of the current run.
STATS_KEY = "__attention_stats__"

#: activation names of the fused ops -> the codes of :mod:`.kernels`
ACT_CODES = {"none": K.ACT_NONE, "relu": K.ACT_RELU, "gelu": K.ACT_GELU,
             "gelu_tanh": K.ACT_GELU_TANH, "tanh": K.ACT_TANH, "exp": K.ACT_EXP}


@dataclass(frozen=True)
class StepOptions:
    """What :func:`~.compiler.compile` tells the step builders.

    Attributes:
        attention_backend: the :func:`blasst_ref.attention` backend of ``Attention`` nodes.
    """

    attention_backend: str = "cpu"


Step = Callable[[dict], None]

#: the dtypes of the Numba kernels (:mod:`.kernels`)
KERNEL_DTYPES = ("float32", "float64")


def _kernel_takes(node, g) -> bool:
    """Whether every tensor ``node`` reads and writes has a dtype of the Numba kernels."""
    return all(g.tensors[t].dtype in KERNEL_DTYPES for t in (*node.inputs, *node.outputs))


def _rows(a: np.ndarray) -> np.ndarray:
    """``(..., N)`` as a C-contiguous ``(M, N)`` view (a copy only if not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1]) if a.ndim != 2 else \
        np.ascontiguousarray(a)


def packed_matmul(node, g, options: StepOptions) -> Step:
    # Panels of the FMA micro-kernel's width (float32, AVX2/AVX-512): f32_gemm, no BLAS;
    # any other panels: kernels.matmul_packed, one BLAS call per block. (pack_weights packs
    # float32/float64 weights only.)
    from . import f32_gemm as F

    ins, out, attrs = node.inputs, node.outputs[0], node.attrs
    panels = g.constants[ins[1]]
    act = ACT_CODES[attrs["act"]]
    nb, nr = attrs["has_bias"], attrs["has_residual"]
    if F.available() and panels.dtype == np.float32 and panels.shape[2] == F.NR:
        fw = F.PackedF32Weight(panels, panels.shape[1], attrs["n"])

        def fma_step(env):
            bias = env[ins[2]].reshape(-1) if nb else None
            res = _rows(env[ins[-1]]) if nr else None
            F.gemm(_rows(env[ins[0]]), fw, bias, act, res, env[out].reshape(-1, fw.n))
        return fma_step
    pw = K.PackedWeight(panels, panels.shape[1], attrs["n"], panels.shape[2])

    def step(env):
        a = env[ins[0]]
        bias = env[ins[2]].reshape(-1) if nb else None
        res = _rows(env[ins[-1]]) if nr else None
        K.matmul_packed(_rows(a), pw, bias, act, res, env[out].reshape(-1, pw.n))
    return step


def fused_matmul(node, g, options: StepOptions) -> Step | None:
    if not _kernel_takes(node, g):
        return None
    # The product through BLAS (multi-threaded, straight into the planned buffer), then
    # bias, activation and residual in one serial Numba pass over it (see
    # kernels.matmul_epilogue's `parallel`) -- instead of numpy's one pass and one new
    # array per post-op.
    ins, out, attrs = node.inputs, node.outputs[0], node.attrs
    act = ACT_CODES[attrs["act"]]
    nb, nr = attrs["has_bias"], attrs["has_residual"]
    b_is_weight = ins[1] in g.constants and len(g.tensors[ins[1]].shape) == 2
    n = g.tensors[out].shape[-1]

    def step(env):
        o = env[out]
        res = env[ins[-1]] if nr else None
        a, b = env[ins[0]], env[ins[1]]
        if b_is_weight:  # (..., K) @ (K, N) is one 2-D product over the rows
            a = _rows(a)
        # the product must not land on the residual before the epilogue has read it
        y = np.matmul(a, b) if nr and np.shares_memory(o, res) else \
            np.matmul(a, b, out=o.reshape(a.shape[:-1] + (n,)))
        bias = env[ins[2]].reshape(-1) if nb else None
        K.matmul_epilogue(y.reshape(-1, n), bias, act, _rows(res) if nr else None,
                          o.reshape(-1, n), parallel=False)
    return step


def qmatmul(node, g, options: StepOptions) -> Step:
    # u8 x s8 -> s32 (VNNI where the CPU has it), compensation, rescale, post-ops and
    # requantization in one kernel; the weight is packed for vpdpbusd here, once.
    from . import int8_kernels as Q8

    ins, out, attrs = node.inputs, node.outputs[0], node.attrs
    pw = Q8.pack_int8_weight(g.constants[ins[1]], attrs["w_scale"])
    nb, nr = attrs["has_bias"], attrs["has_residual"]
    plan = Q8.QMatMulPlan(pw, attrs["a_scale"], attrs["a_zero_point"],
                          g.constants[ins[2]].reshape(-1) if nb else None,
                          ACT_CODES[attrs["act"]], attrs["out_scale"],
                          attrs["out_zero_point"])
    n = g.tensors[out].shape[-1]
    if nr:
        def step(env):
            plan(_rows(env[ins[0]]), residual=_rows(env[ins[-1]]),
                 out=env[out].reshape(-1, n))
        return step

    def step(env):  # the common case, kept to one call
        plan(_rows(env[ins[0]]), None, env[out].reshape(-1, n))
    return step


def quantize(node, g, options: StepOptions) -> Step | None:
    # per-tensor float32 -> u8/s8 (an int8 graph's entry): one compiled pass, bit for bit
    # ops.quantize_array, instead of numpy's five passes and temporaries
    ins, out, attrs = node.inputs, node.outputs[0], node.attrs
    if attrs["axis"] is not None or attrs["dtype"] not in ("uint8", "int8") or \
            g.tensors[ins[0]].dtype != "float32":
        return None
    from . import int8_kernels as Q8

    info = np.iinfo(attrs["dtype"])
    lo, hi = int(info.min), int(info.max)
    scale, zp = np.float32(attrs["scale"]), int(attrs["zero_point"])

    def step(env):
        Q8.quantize_unchecked(np.ascontiguousarray(env[ins[0]]).reshape(-1),
                              env[out].reshape(-1), scale, zp, lo, hi)
    return step


def matmul(node, g, options: StepOptions) -> Step:
    ins, out = node.inputs, node.outputs[0]
    if ins[1] in g.constants and len(g.tensors[ins[1]].shape) == 2:
        n = g.tensors[out].shape[-1]
        # (..., K) @ (K, N): one 2-D BLAS call over all rows, not one per batch index
        return lambda env: np.matmul(_rows(env[ins[0]]), env[ins[1]],
                                     out=env[out].reshape(-1, n))
    return lambda env: np.matmul(env[ins[0]], env[ins[1]], out=env[out])


def layernorm(node, g, options: StepOptions) -> Step | None:
    if not _kernel_takes(node, g):
        return None
    ins, out, eps = node.inputs, node.outputs[0], node.attrs["eps"]

    def step(env):
        o = env[out]
        K.layernorm(_rows(env[ins[0]]), env[ins[1]], env[ins[2]], eps,
                    o.reshape(-1, o.shape[-1]))
    return step


def softmax(node, g, options: StepOptions) -> Step | None:
    ins, out = node.inputs, node.outputs[0]
    if node.attrs["axis"] != len(g.tensors[out].shape) - 1 or not _kernel_takes(node, g):
        return None

    def step(env):
        o = env[out]
        K.softmax_lastaxis(_rows(env[ins[0]]), o.reshape(-1, o.shape[-1]))
    return step


def relu(node, g, options: StepOptions) -> Step:
    x, out = node.inputs[0], node.outputs[0]
    return lambda env: np.maximum(env[x], env[x].dtype.type(0), out=env[out])


def gelu(node, g, options: StepOptions) -> Step | None:
    if node.attrs["approximate"] != "none" or not _kernel_takes(node, g):
        return None
    x, out = node.inputs[0], node.outputs[0]

    def step(env):
        K.gelu(env[x].reshape(-1), env[out].reshape(-1))
    return step


def ufunc(fn: np.ufunc) -> Callable:
    """The step builder of an element-wise op that is one numpy ufunc (``np.add``, ...)."""
    def build(node, g, options: StepOptions) -> Step:
        ins, out = node.inputs, node.outputs[0]
        return lambda env: fn(*(env[i] for i in ins), out=env[out])
    return build


def reshape(node, g, options: StepOptions) -> Step:
    x, out, shape = node.inputs[0], node.outputs[0], node.attrs["shape"]

    def step(env):
        env[out] = env[x].reshape(shape)
    return step


def transpose(node, g, options: StepOptions) -> Step:
    x, out, perm = node.inputs[0], node.outputs[0], node.attrs["perm"]
    return lambda env: np.copyto(env[out], np.transpose(env[x], perm))


def attention(node, g, options: StepOptions) -> Step:
    from ..api import attention as blasst_attention

    ins, out, attrs = node.inputs, node.outputs[0], node.attrs
    backend = options.attention_backend

    def step(env):
        q, k, v = (np.ascontiguousarray(env[i]) for i in ins)
        o, stats = blasst_attention(q, k, v, attrs["thresh"], causal=attrs["causal"],
                                    scale=attrs["scale"], block_q=attrs["block_q"],
                                    block_k=attrs["block_k"], backend=backend,
                                    return_stats=True)
        np.copyto(env[out], o)
        env[STATS_KEY][node.name] = stats
    return step


def evaluate_step(node, g, evaluate: Callable) -> Step:
    """Any op: its numpy meaning ``evaluate(arrays, attrs)``, copied into the planned
    buffers of its outputs."""
    ins, attrs = node.inputs, node.attrs

    def step(env):
        for name, value in zip(node.outputs, evaluate([env[i] for i in ins], attrs)):
            np.copyto(env[name], np.asarray(value).reshape(g.tensors[name].shape),
                      casting="unsafe")
    return step
