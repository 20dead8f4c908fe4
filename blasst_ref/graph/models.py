"""Reference model graphs: DLRM's MLPs, a BERT encoder layer and a causal GQA decoder block.

Each builder returns a :class:`~blasst_ref.graph.Graph` with one input ``"x"``, one output
``"y"`` and random constant weights drawn from ``np.random.default_rng(seed)``, so the same
arguments always give the same graph. The graphs are written with the plain ops of the IR
only (no fused ops): they are what a user would build, what :func:`blasst_ref.graph.compile`
starts from, and what :mod:`.onnx_export` hands to ONNX Runtime.

Weights are float32 with a fan-in scaled init, ``N(0, 1/fan_in)`` (std 0.036 for a 768-wide
layer), so activations stay O(1) through every layer; biases are ``N(0, 0.02)``; LayerNorm
``gamma`` is ``1 + N(0, 0.02)`` and ``beta`` ``N(0, 0.02)``. The weights are random, so the
attention maps are close to uniform (no sparsity to speak of): for peaked attention feed
:mod:`blasst_ref.workloads` inputs to the attention kernel directly.

Constants have stable names, so a test can rebuild the model in numpy from
``graph.constants``:

=================  ==================================================================
``mlp``            ``l{i}.w`` ``(layers[i], layers[i+1])``, ``l{i}.b`` ``(layers[i+1],)``
``bert_layer``     ``attn.wq/bq``, ``attn.wk/bk``, ``attn.wv/bv``, ``attn.wo/bo``,
                   ``ln1.gamma/beta``, ``ffn.w1/b1``, ``ffn.w2/b2``, ``ln2.gamma/beta``
``llm_block``      ``ln1.gamma/beta``, ``attn.wq``, ``attn.wk``, ``attn.wv``, ``attn.wo``,
                   ``causal_mask``, ``ln2.gamma/beta``, ``ffn.w1``, ``ffn.w2``
=================  ==================================================================

(plus the scalar ``1/sqrt(D)`` of each attention, an auto-named ``scalar_*`` constant).

The attention in ``bert_layer`` and ``llm_block`` is written in one fixed op form, which the
fusion pass of :mod:`.passes` pattern-matches into one BLASST attention call; the
docstrings give it op by op. :func:`example_inputs` makes random feeds for any graph.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from .ir import Graph

__all__ = ["ACTIVATIONS", "CAUSAL_MASK_VALUE", "bert_layer", "causal_mask", "dlrm_bottom_mlp",
           "dlrm_top_mlp", "example_inputs", "llm_block", "mlp"]

#: ``final_activation`` values accepted by :func:`mlp`.
ACTIVATIONS = ("none", "relu", "tanh")

#: The value of the masked entries of ``llm_block``'s ``causal_mask``: large and finite, so
#: that ``exp(s - max)`` underflows to exactly 0 without ``-inf`` arithmetic (``0 * inf``,
#: ``inf - inf``) anywhere a kernel might meet it. Every causal row sees its diagonal, so a
#: softmax row never has all its entries masked.
CAUSAL_MASK_VALUE = -1e9

#: std of the random biases and of LayerNorm's beta and gamma - 1
_BIAS_STD = 0.02


# ---------------------------------------------------------------------------- helpers
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _weight(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """``(fan_in, fan_out)`` float32 weight, ``N(0, 1/fan_in)``: keeps activations O(1)."""
    return (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(np.float32)


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    return (_BIAS_STD * rng.standard_normal(n)).astype(np.float32)


def _layernorm_params(g: Graph, rng: np.random.Generator, prefix: str, n: int):
    gamma = (1.0 + _BIAS_STD * rng.standard_normal(n)).astype(np.float32)
    beta = _bias(rng, n)
    return g.constant(f"{prefix}.gamma", gamma), g.constant(f"{prefix}.beta", beta)


def causal_mask(length: int, value: float = CAUSAL_MASK_VALUE) -> np.ndarray:
    """The additive causal mask ``(L, L)`` float32: 0 where key ``j <= i`` (query ``i`` sees
    it), ``value`` elsewhere. With as many queries as keys this is both the top-left and the
    bottom-right alignment (docs/DESIGN.md §3.2)."""
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    return np.where(j <= i, 0.0, value).astype(np.float32)


# ---------------------------------------------------------------------------- MLP
def mlp(layers: Sequence[int], batch: int, *, seed: int = 0, final_activation: str = "none",
        name: str | None = None) -> Graph:
    """A multilayer perceptron: ``len(layers) - 1`` dense layers.

    Ops, for layer ``i = 0 .. n-1`` (``n = len(layers) - 1``), starting from ``h = x``::

        x                                      input (batch, layers[0])    float32
        h = add(matmul(h, l{i}.w), l{i}.b)     (batch, layers[i+1])        l{i}.w (layers[i], layers[i+1])
        h = relu(h)                            every layer but the last
        y = final_activation(h)                the last layer: none | relu | tanh

    Every layer is exactly ``Add(MatMul(h, W), b)`` followed by its activation: the
    MatMul + bias + activation chain that fusion turns into one kernel.

    DLRM (Naumov et al. 2019, the MLPerf configuration) uses:

    * bottom MLP ``mlp([13, 512, 256, 128], batch, final_activation="relu")``: ReLU after
      every layer, including the last (see :func:`dlrm_bottom_mlp`);
    * top MLP ``mlp([479, 1024, 1024, 512, 256, 1], batch)``: ReLU between layers; DLRM ends
      it with a sigmoid, which the IR has no op for, so the graph stops at the logit
      (``final_activation="none"``, see :func:`dlrm_top_mlp`).

    Args:
        layers: widths, input first; at least two entries, all positive.
        batch: rows of ``x``.
        seed: seed of the weights (``np.random.default_rng(seed)``).
        final_activation: ``"none"`` (default), ``"relu"`` or ``"tanh"`` after the last layer.
        name: graph name; default ``"mlp_13x512x256x128"`` style.

    Raises:
        ValueError: ``layers`` shorter than 2 or with a non-positive width, ``batch`` not a
            positive int, or an unknown ``final_activation``.
    """
    try:
        layers = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a sequence of positive ints, got {layers!r}") from None
    if len(layers) < 2:
        raise ValueError(f"layers must have at least 2 widths (input and output), got {layers}")
    layers = [_positive_int(w, f"layers[{i}]") for i, w in enumerate(layers)]
    batch = _positive_int(batch, "batch")
    if final_activation not in ACTIVATIONS:
        raise ValueError(f"final_activation must be one of {ACTIVATIONS}, got "
                         f"{final_activation!r}")
    rng = np.random.default_rng(seed)
    g = Graph(name or "mlp_" + "x".join(str(w) for w in layers))
    h = g.input("x", (batch, layers[0]), "float32")
    n = len(layers) - 1
    for i, (k, m) in enumerate(itertools.pairwise(layers)):
        w = g.constant(f"l{i}.w", _weight(rng, k, m))
        b = g.constant(f"l{i}.b", _bias(rng, m))
        h = g.add(g.matmul(h, w), b)
        act = "relu" if i < n - 1 else final_activation
        if act == "relu":
            h = g.relu(h)
        elif act == "tanh":
            h = g.tanh(h)
    g.output("y", h)
    return g


def dlrm_bottom_mlp(batch: int = 32, *, seed: int = 0) -> Graph:
    """DLRM's bottom MLP (dense features): ``mlp([13, 512, 256, 128], batch,
    final_activation="relu")``, ReLU after all three layers."""
    return mlp([13, 512, 256, 128], batch, seed=seed, final_activation="relu",
               name="dlrm_bottom_mlp")


def dlrm_top_mlp(batch: int = 128, *, seed: int = 0) -> Graph:
    """DLRM's top MLP: ``mlp([479, 1024, 1024, 512, 256, 1], batch)``, ReLU between the
    layers, no activation at the end (DLRM's final sigmoid is left out: no Sigmoid op).
    In the MLPerf configuration its input is 479 = 351 pairwise dot products of the 27
    feature vectors (26 embeddings + the bottom MLP's output) + the bottom MLP's 128
    features."""
    return mlp([479, 1024, 1024, 512, 256, 1], batch, seed=seed, final_activation="none",
               name="dlrm_top_mlp")


# ---------------------------------------------------------------------------- BERT
def bert_layer(batch: int, seq: int, hidden: int = 768, heads: int = 12, *, seed: int = 0,
               ffn: int | None = None, name: str | None = None) -> Graph:
    """A post-norm BERT encoder layer (BERT-base sizes by default), no attention mask.

    With ``B = batch``, ``L = seq``, ``E = hidden``, ``H = heads``, ``D = E / H``,
    ``F = ffn`` (default ``4 E``), every tensor float32::

        x                                       input (B, L, E)
        # --- self-attention: this exact op form is what the fusion pass matches
        q  = add(matmul(x, attn.wq), attn.bq)   (B, L, E)      wq (E, E), bq (E,)
        q  = reshape(q, (B, L, H, D))           (B, L, H, D)
        q  = transpose(q, (0, 2, 1, 3))         (B, H, L, D)
        k  = add(matmul(x, attn.wk), attn.bk)   (B, L, E)
        k  = reshape(k, (B, L, H, D))           (B, L, H, D)
        kt = transpose(k, (0, 2, 3, 1))         (B, H, D, L)   K already transposed
        v  = add(matmul(x, attn.wv), attn.bv)   (B, L, E)
        v  = reshape(v, (B, L, H, D))           (B, L, H, D)
        v  = transpose(v, (0, 2, 1, 3))         (B, H, L, D)
        s  = matmul(q, kt)                      (B, H, L, L)
        s  = mul(s, 1/sqrt(D))                  (B, H, L, L)   scalar constant ()
        p  = softmax(s, axis=-1)                (B, H, L, L)
        c  = matmul(p, v)                       (B, H, L, D)
        c  = transpose(c, (0, 2, 1, 3))         (B, L, H, D)
        c  = reshape(c, (B, L, E))              (B, L, E)
        a  = add(matmul(c, attn.wo), attn.bo)   (B, L, E)
        # --- residual + LayerNorm (post-norm), feed-forward, residual + LayerNorm
        h  = layernorm(add(a, x), ln1.gamma, ln1.beta, eps=1e-12)          (B, L, E)
        f  = gelu(add(matmul(h, ffn.w1), ffn.b1))                          (B, L, F)
        f  = add(matmul(f, ffn.w2), ffn.b2)                                (B, L, E)
        y  = layernorm(add(f, h), ln2.gamma, ln2.beta, eps=1e-12)          output (B, L, E)

    GELU is the exact (erf) form, as in BERT.

    Raises:
        ValueError: a size that is not a positive int, or ``hidden % heads != 0``.
    """
    b = _positive_int(batch, "batch")
    length = _positive_int(seq, "seq")
    e = _positive_int(hidden, "hidden")
    nh = _positive_int(heads, "heads")
    if e % nh:
        raise ValueError(f"hidden ({e}) must be divisible by heads ({nh})")
    f = 4 * e if ffn is None else _positive_int(ffn, "ffn")
    d = e // nh
    rng = np.random.default_rng(seed)
    g = Graph(name or f"bert_layer_b{b}_l{length}_e{e}_h{nh}")
    x = g.input("x", (b, length, e), "float32")

    def proj(src, key):
        w = g.constant(f"attn.w{key}", _weight(rng, e, e))
        bias = g.constant(f"attn.b{key}", _bias(rng, e))
        return g.reshape(g.add(g.matmul(src, w), bias), (b, length, nh, d))

    q = g.transpose(proj(x, "q"), (0, 2, 1, 3))
    kt = g.transpose(proj(x, "k"), (0, 2, 3, 1))
    v = g.transpose(proj(x, "v"), (0, 2, 1, 3))
    scores = g.mul(g.matmul(q, kt), 1.0 / math.sqrt(d))
    probs = g.softmax(scores, axis=-1)
    ctx = g.reshape(g.transpose(g.matmul(probs, v), (0, 2, 1, 3)), (b, length, e))
    wo = g.constant("attn.wo", _weight(rng, e, e))
    bo = g.constant("attn.bo", _bias(rng, e))
    attn = g.add(g.matmul(ctx, wo), bo)
    g1, b1 = _layernorm_params(g, rng, "ln1", e)
    h = g.layernorm(g.add(attn, x), g1, b1, eps=1e-12)
    w1 = g.constant("ffn.w1", _weight(rng, e, f))
    b1f = g.constant("ffn.b1", _bias(rng, f))
    w2 = g.constant("ffn.w2", _weight(rng, f, e))
    b2f = g.constant("ffn.b2", _bias(rng, e))
    out = g.add(g.matmul(g.gelu(g.add(g.matmul(h, w1), b1f)), w2), b2f)
    g2, b2 = _layernorm_params(g, rng, "ln2", e)
    g.output("y", g.layernorm(g.add(out, h), g2, b2, eps=1e-12))
    return g


# ---------------------------------------------------------------------------- LLM block
def llm_block(batch: int, seq: int, hidden: int, heads: int, kv_heads: int, *, seed: int = 0,
              ffn: int | None = None, name: str | None = None) -> Graph:
    """A pre-norm decoder block with causal grouped-query attention (prefill of ``seq``
    tokens), no biases.

    With ``B = batch``, ``L = seq``, ``E = hidden``, ``H = heads``, ``Hkv = kv_heads``,
    ``G = H / Hkv`` (query heads per kv head), ``D = E / H``, ``F = ffn`` (default ``4 E``),
    every tensor float32::

        x                                         input (B, L, E)
        a  = layernorm(x, ln1.gamma, ln1.beta, eps=1e-5)       (B, L, E)
        # --- causal GQA: this exact op form is what the fusion pass matches
        q  = matmul(a, attn.wq)                   (B, L, E)           wq (E, E)
        q  = reshape(q, (B, L, Hkv, G, D))        (B, L, Hkv, G, D)
        q  = transpose(q, (0, 2, 3, 1, 4))        (B, Hkv, G, L, D)
        k  = matmul(a, attn.wk)                   (B, L, Hkv*D)       wk (E, Hkv*D)
        k  = reshape(k, (B, L, Hkv, D))           (B, L, Hkv, D)
        kt = transpose(k, (0, 2, 3, 1))           (B, Hkv, D, L)
        kt = reshape(kt, (B, Hkv, 1, D, L))       (B, Hkv, 1, D, L)   broadcast over G
        v  = matmul(a, attn.wv)                   (B, L, Hkv*D)       wv (E, Hkv*D)
        v  = reshape(v, (B, L, Hkv, D))           (B, L, Hkv, D)
        v  = transpose(v, (0, 2, 1, 3))           (B, Hkv, L, D)
        v  = reshape(v, (B, Hkv, 1, L, D))        (B, Hkv, 1, L, D)
        s  = matmul(q, kt)                        (B, Hkv, G, L, L)
        s  = mul(s, 1/sqrt(D))                    (B, Hkv, G, L, L)   scalar constant ()
        s  = add(s, causal_mask)                  (B, Hkv, G, L, L)   causal_mask (L, L)
        p  = softmax(s, axis=-1)                  (B, Hkv, G, L, L)
        c  = matmul(p, v)                         (B, Hkv, G, L, D)
        c  = transpose(c, (0, 3, 1, 2, 4))        (B, L, Hkv, G, D)
        c  = reshape(c, (B, L, E))                (B, L, E)
        h  = add(x, matmul(c, attn.wo))           (B, L, E)           wo (E, E)
        # --- pre-norm feed-forward with residual
        f  = gelu(matmul(layernorm(h, ln2.gamma, ln2.beta, eps=1e-5), ffn.w1))  (B, L, F)
        y  = add(h, matmul(f, ffn.w2))            output (B, L, E)

    Head mapping: column ``(kvh * G + g) * D + d`` of ``q`` is query head ``h = kvh * G + g``,
    which reads kv head ``kvh = h // G``: the mapping of :func:`blasst_ref.attention`, so the
    attention equals ``blasst_ref.dense_attention(q, k, v, causal=True)`` on ``q`` as
    ``(B, H, L, D)`` and ``k``, ``v`` as ``(B, Hkv, L, D)``.

    ``causal_mask[i, j]`` is 0 where key ``j <= i`` (query ``i`` sees it) and
    :data:`CAUSAL_MASK_VALUE` (-1e9, finite) elsewhere; with ``Lq == Lk`` top-left and
    bottom-right alignment agree. GELU is the exact (erf) form.

    Raises:
        ValueError: a size that is not a positive int, ``heads % kv_heads != 0`` or
            ``hidden % heads != 0``.
    """
    b = _positive_int(batch, "batch")
    length = _positive_int(seq, "seq")
    e = _positive_int(hidden, "hidden")
    nh = _positive_int(heads, "heads")
    nkv = _positive_int(kv_heads, "kv_heads")
    if nh % nkv:
        raise ValueError(f"heads ({nh}) must be divisible by kv_heads ({nkv})")
    if e % nh:
        raise ValueError(f"hidden ({e}) must be divisible by heads ({nh})")
    f = 4 * e if ffn is None else _positive_int(ffn, "ffn")
    d = e // nh
    grp = nh // nkv
    rng = np.random.default_rng(seed)
    g = Graph(name or f"llm_block_b{b}_l{length}_e{e}_h{nh}_kv{nkv}")
    x = g.input("x", (b, length, e), "float32")
    ln1_g, ln1_b = _layernorm_params(g, rng, "ln1", e)
    a = g.layernorm(x, ln1_g, ln1_b, eps=1e-5)
    wq = g.constant("attn.wq", _weight(rng, e, e))
    wk = g.constant("attn.wk", _weight(rng, e, nkv * d))
    wv = g.constant("attn.wv", _weight(rng, e, nkv * d))
    q = g.transpose(g.reshape(g.matmul(a, wq), (b, length, nkv, grp, d)), (0, 2, 3, 1, 4))
    kt = g.transpose(g.reshape(g.matmul(a, wk), (b, length, nkv, d)), (0, 2, 3, 1))
    kt = g.reshape(kt, (b, nkv, 1, d, length))
    v = g.transpose(g.reshape(g.matmul(a, wv), (b, length, nkv, d)), (0, 2, 1, 3))
    v = g.reshape(v, (b, nkv, 1, length, d))
    scores = g.mul(g.matmul(q, kt), 1.0 / math.sqrt(d))
    scores = g.add(scores, g.constant("causal_mask", causal_mask(length)))
    probs = g.softmax(scores, axis=-1)
    ctx = g.reshape(g.transpose(g.matmul(probs, v), (0, 3, 1, 2, 4)), (b, length, e))
    wo = g.constant("attn.wo", _weight(rng, e, e))
    h = g.add(x, g.matmul(ctx, wo))
    ln2_g, ln2_b = _layernorm_params(g, rng, "ln2", e)
    w1 = g.constant("ffn.w1", _weight(rng, e, f))
    w2 = g.constant("ffn.w2", _weight(rng, f, e))
    ff = g.matmul(g.gelu(g.matmul(g.layernorm(h, ln2_g, ln2_b, eps=1e-5), w1)), w2)
    g.output("y", g.add(h, ff))
    return g


# ---------------------------------------------------------------------------- feeds
def example_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every input of ``graph``, of its declared shape and dtype.

    Float inputs are standard normal; ``uint8``/``int8``/``int32`` inputs are uniform over
    ``[0, 255]``, ``[-128, 127]`` and ``[-1000, 1000]``. Seeded: the same ``seed`` gives
    the same arrays.
    """
    rng = np.random.default_rng(seed)
    int_ranges = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-1000, 1000)}
    feeds = {}
    for name in graph.inputs:
        info = graph.tensors[name]
        if info.dtype in int_ranges:
            lo, hi = int_ranges[info.dtype]
            feeds[name] = rng.integers(lo, hi, size=info.shape, endpoint=True).astype(
                info.dtype)
        else:
            feeds[name] = rng.standard_normal(info.shape).astype(info.dtype)
    return feeds
