"""Synthetic LLM-like attention inputs (docs/DESIGN.md §6).

Random Gaussian ``q``/``k`` give nearly uniform attention, so BLASST skips nothing on them.
Real heads are *peaked*: a few first tokens soak up much of the attention (attention sinks),
recent tokens get more attention than distant ones (a local window that decays with
distance), a few "heavy-hitter" tokens are attended from everywhere, and heads differ in
how sharp all of this is. :func:`llm_like` builds seeded ``(q, k, v)`` with exactly that
structure, so that benchmarks, tests and tutorials see BLASST sparsity of the kind the paper
reports, and the threshold-vs-length law of calibration (docs/DESIGN.md §5).

The logit model
---------------
For query head ``h`` at position ``i`` and key ``j`` the scaled score ``q·k / sqrt(Dqk)``
(natural-log units, "nats") is, by construction,

    s[h, i, j] = T_h * ( sink_strength                          if j is a sink,
                         heavy_hitter_strength - U_j             if j is a heavy hitter,
                         -decay * ln(1 + |i - j| / window) + r(i - j)   otherwise
                         + noise * N(0, 1) )

* The sinks are the first ``sink_tokens`` keys; the heavy hitters are scattered at random
  positions with jitter ``U_j ~ Uniform(0, 1)``. Neither depends on distance: they are
  "content" keys, seen from everywhere.
* The distance term is built from RoPE-like features: query row ``i`` carries
  ``(cos w_f i, sin w_f i)`` and key ``j`` carries ``(cos w_f j, sin w_f j)``, so their dot
  product is ``sum_f a_f cos(w_f (i - j))``, a function of the distance only, with geometric
  frequencies ``w_f`` and weights ``a_f`` fitted by least squares to the log-decay. ``r`` is
  the residual of that fit: ripples of a fraction of a nat near the diagonal, up to about
  1.5 nats at the far end of 64k contexts, much as real RoPE heads show stripes.
* A log-decay means attention probability falls as a power of distance,
  ``p ~ (1 + d / window) ** -(decay * T_h)``. With ``decay * T_h = 1`` the mass per key at
  distance ``~L`` relative to the sink is ``~ window / L``; that is why the threshold that
  keeps the tile sparsity fixed falls roughly as ``1 / L`` (docs/DESIGN.md §5).
* ``T_h`` (inverse temperature, "peakedness") multiplies every logit of head ``h``, noise
  included: large ``T_h`` makes the head sharper, small ``T_h`` flatter.

Query heads of one kv group share that kv head's keys, sinks and heavy hitters, and the
structure is coherent over whole tiles (it is a function of position), so tile-level skipping
works for prefill tiles and for the GQA groups of decode alike. Every head's features are
finally rotated by a random orthogonal matrix (the same for ``q`` and ``k``; dot products
are unchanged), so the arrays look dense, as real projections do.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import tiling

__all__ = ["llm_like", "head_temperatures", "attention_map", "skip_map"]

#: The largest score matrix (``Lq * Lk`` entries) :func:`attention_map` will build.
MAX_MAP_ENTRIES = 1 << 26

_MAX_ROPE_PAIRS = 32  # enough to fit the log-decay to ~0.5 nats up to 64k keys


# ---------------------------------------------------------------------------------------
# knob validation


def _check_int(name, x, lo):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {lo}, got {x!r}")
    if x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return int(x)


def _check_real(name, x, *, lo=None, strict=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if lo is not None and (x <= lo if strict else x < lo):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {lo}, got {x!r}")
    return x


# ---------------------------------------------------------------------------------------
# building blocks


def head_temperatures(q_heads: int, *, peakedness: float = 1.0, head_spread: float = 0.5,
                      seed: int = 0) -> np.ndarray:
    """Per-head inverse temperatures ``T_h`` of :func:`llm_like`, float64 ``(q_heads,)``.

    ``T_h = peakedness * exp(head_spread * u_h)`` with ``u_h`` evenly spaced on ``[-1, 1]``
    and shuffled by ``seed``, so the heads always span the same range whatever the seed."""
    q_heads = _check_int("q_heads", q_heads, 1)
    peakedness = _check_real("peakedness", peakedness, lo=0.0, strict=True)
    head_spread = _check_real("head_spread", head_spread, lo=0.0)
    u = np.linspace(-1.0, 1.0, q_heads) if q_heads > 1 else np.zeros(1)
    u = np.random.default_rng([seed, 1]).permutation(u)
    return peakedness * np.exp(head_spread * u)


def _rope_fit(n_pairs: int, max_dist: int, window: float, decay: float):
    """Frequencies ``w`` and weights ``a`` with ``sum_f a_f cos(w_f d) ~ -decay ln(1+d/window)``
    for ``d`` in ``[0, max_dist)``. ``w_0 = 0`` is the constant term."""
    max_dist = max(int(max_dist), 2)
    omega = np.concatenate([[0.0], np.geomspace(np.pi / 2, 1.0 / max_dist, n_pairs - 1)])
    # Fit on every distance up to 4096 (where the window's shape is) and a log-spaced grid
    # beyond: cheap at 64k and as good as fitting every integer.
    d = np.arange(min(max_dist, 4096), dtype=np.float64)
    if max_dist > 4096:
        d = np.concatenate([d, np.geomspace(4096, max_dist - 1, 4096)])
    target = -decay * np.log1p(d / window)
    basis = np.cos(np.outer(d, omega))
    # A little ridge keeps the weights moderate (no cancelling giants that float16 would
    # round badly) at almost no cost in fit.
    gram = basis.T @ basis
    a = np.linalg.solve(gram + 1e-4 * np.trace(gram) / n_pairs * np.eye(n_pairs),
                        basis.T @ target)
    return omega, a


def _random_rotation(rng, n: int) -> np.ndarray:
    g = rng.standard_normal((n, n))
    qm, r = np.linalg.qr(g)
    return qm * np.sign(np.diag(r))  # Haar-distributed


def llm_like(
    batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, *,
    v_dim: int | None = None, seed: int = 0, dtype="float32",
    peakedness: float = 1.0, head_spread: float = 0.5,
    sink_tokens: int = 4, sink_strength: float = 8.0,
    window: float = 64.0, decay: float = 1.0,
    heavy_hitters: float = 2.0, heavy_hitter_strength: float = 5.0,
    noise: float = 0.5,
):
    """Seeded ``(q, k, v)`` whose attention looks like an LLM's (see the module docstring).

    Shapes follow :func:`blasst_ref.attention`: ``q`` ``(B, Hq, Lq, Dqk)``, ``k``
    ``(B, Hkv, Lk, Dqk)``, ``v`` ``(B, Hkv, Lk, Dv)``. MHA is ``kv_heads == q_heads``, GQA
    ``q_heads % kv_heads == 0``, MQA ``kv_heads == 1``; MLA (absorbed) is
    ``kv_heads=1, head_dim=576, v_dim=512``. Prefill is ``q_len == kv_len``; decode is a
    short ``q_len`` (``1``, or up to 16 for speculative decoding) against a long ``kv_len``.
    Query row ``i`` sits at position ``i + kv_len - q_len`` (bottom-right, as the causal mask
    of :func:`blasst_ref.attention`), so a decode query is the newest token.

    The scores are designed for the default ``scale = 1 / sqrt(head_dim)``; all knob values
    below are in nats of that scaled score (natural-log units of probability ratios).

    Args:
        batch, q_heads, kv_heads, q_len, kv_len, head_dim: the shape; ``head_dim >= 8``.
        v_dim: value head dim ``Dv`` (default ``head_dim``).
        seed: everything is a deterministic function of the arguments and ``seed``.
        dtype: ``"float32"``, ``"float16"`` or ``"float64"`` (also numpy dtypes); the arrays
            are generated in float64 and cast.
        peakedness: mean inverse temperature (> 0). Every logit of a head is multiplied by
            its ``T_h``: larger makes sinks, window and heavy hitters sharper and the map
            sparser; ``-> 0`` approaches uniform attention.
        head_spread: spread of ``T_h`` across heads (>= 0):
            ``T_h = peakedness * exp(head_spread * u_h)``, ``u_h`` evenly on ``[-1, 1]``; 0
            makes all heads alike, 0.5 spans a factor ``e`` between flattest and sharpest.
        sink_tokens: number of leading keys that are attention sinks (>= 0): bright columns at
            the left of the map, seen by every query.
        sink_strength: logit of a sink, relative to the logit of the query's own position
            (any real). The default 8 gives the sinks 50% (flattest head) to >99% (sharpest)
            of the mass at a few thousand keys, as in the middle layers of real LLMs; lower
            it for flatter maps, whose skipped tiles carry more mass (larger output error).
        window: distance scale of the local window, in keys (> 0): attention to a key at
            distance ``d`` falls as ``(1 + d / window) ** -(decay * T_h)``; a bright band
            along the diagonal of about this width.
        decay: exponent of that fall (>= 0): the logit drops by ``decay * ln(1 + d/window)``.
            0 removes the window (a flat background); 1 gives the ``1/L`` threshold law.
        heavy_hitters: expected number of heavy-hitter keys per 1024 keys (>= 0), at random
            positions (per batch element and kv head): thin bright columns seen from every
            query, like the delimiter tokens that act as secondary sinks in real models.
        heavy_hitter_strength: logit of a heavy hitter (minus a ``Uniform(0, 1)`` jitter),
            relative to the query's own position, like ``sink_strength``. In split-KV decode
            a chunk far from the sinks can only skip tiles after its running max has met a
            heavy hitter, so this sets how much of a long context decode can skip.
        noise: standard deviation of an i.i.d. Gaussian logit term (>= 0): speckle over the
            whole map; it raises tile maxima, making skipping harder.

    Returns:
        ``(q, k, v)``: numpy arrays of ``dtype``.

    Raises:
        TypeError / ValueError: naming the argument, for bad shapes or knob values.
    """
    batch = _check_int("batch", batch, 1)
    q_heads = _check_int("q_heads", q_heads, 1)
    kv_heads = _check_int("kv_heads", kv_heads, 1)
    q_len = _check_int("q_len", q_len, 1)
    kv_len = _check_int("kv_len", kv_len, 1)
    head_dim = _check_int("head_dim", head_dim, 8)
    v_dim = head_dim if v_dim is None else _check_int("v_dim", v_dim, 1)
    if q_heads % kv_heads:
        raise ValueError(
            f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads} (MHA, GQA, MQA)"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        out_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype!r}") from exc
    if out_dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype!r}")
    temps = head_temperatures(q_heads, peakedness=peakedness, head_spread=head_spread, seed=seed)
    sink_tokens = _check_int("sink_tokens", sink_tokens, 0)
    sink_strength = _check_real("sink_strength", sink_strength)
    window = _check_real("window", window, lo=0.0, strict=True)
    decay = _check_real("decay", decay, lo=0.0)
    heavy_hitters = _check_real("heavy_hitters", heavy_hitters, lo=0.0)
    if heavy_hitters > 1024:
        raise ValueError(f"heavy_hitters is a count per 1024 keys, at most 1024; got {heavy_hitters}")
    heavy_hitter_strength = _check_real("heavy_hitter_strength", heavy_hitter_strength)
    noise = _check_real("noise", noise, lo=0.0)

    rng = np.random.default_rng([seed, 0])
    group = q_heads // kv_heads
    n_sink = min(sink_tokens, kv_len)

    # Feature layout of one head (before rotation): [sink | heavy hitter | rope | noise].
    rest = head_dim - 2
    n_pairs = max(1, min(_MAX_ROPE_PAIRS, (rest - rest // 4) // 2))
    n_noise = rest - 2 * n_pairs  # >= 1 for head_dim >= 8
    offset = tiling.causal_offset(q_len, kv_len)
    q_pos = np.arange(q_len, dtype=np.float64) + offset
    k_pos = np.arange(kv_len, dtype=np.float64)
    max_dist = int(max(kv_len, q_len + abs(offset)))
    omega, a = _rope_fit(n_pairs, max_dist, window, decay)
    # Split each weight a_f between q and k: sqrt(|a_f|) each, the sign on the query side.
    root = np.sqrt(np.abs(a))
    qa, ka = np.sign(a) * root, root

    def rope(pos, w):  # (L, 2 * n_pairs): [cos w_f p, sin w_f p] * w_f-weight
        ang = np.outer(pos, omega)
        return np.concatenate([np.cos(ang) * w, np.sin(ang) * w], axis=1)

    q_rope = rope(q_pos, qa)  # shared by every head and batch element
    k_rope = rope(k_pos, ka)
    # A per-coordinate noise amplitude c gives q.k noise of std c^2 sqrt(n_noise) = noise.
    c_noise = math.sqrt(noise / math.sqrt(n_noise))
    s_sink = math.sqrt(abs(sink_strength)) or 1.0
    s_hh = math.sqrt(abs(heavy_hitter_strength)) or 1.0
    # q.k / sqrt(D) must equal the logit: put D^(1/4) on each side.
    amp = head_dim ** 0.25
    hh_count = int(round(heavy_hitters * kv_len / 1024.0))
    candidates = kv_len - n_sink

    q = np.empty((batch, q_heads, q_len, head_dim))
    k = np.empty((batch, kv_heads, kv_len, head_dim))
    rotations = [_random_rotation(rng, head_dim) for _ in range(kv_heads)]
    for b in range(batch):
        for g in range(kv_heads):
            kf = np.zeros((kv_len, head_dim))
            kf[:, 2:2 + 2 * n_pairs] = k_rope
            kf[:n_sink, 2:2 + 2 * n_pairs] = 0.0  # sinks and heavy hitters ignore distance
            kf[:n_sink, 0] = s_sink
            n_hh = min(hh_count, candidates)
            if n_hh:
                pos = n_sink + rng.choice(candidates, size=n_hh, replace=False)
                level = heavy_hitter_strength - rng.uniform(0.0, 1.0, n_hh)
                kf[pos, 2:2 + 2 * n_pairs] = 0.0
                kf[pos, 1] = level / s_hh
            kf[:, 2 + 2 * n_pairs:] = c_noise * rng.standard_normal((kv_len, n_noise))
            k[b, g] = (kf * amp) @ rotations[g]
            for h in range(g * group, (g + 1) * group):
                qf = np.empty((q_len, head_dim))
                qf[:, 0] = math.copysign(s_sink, sink_strength)
                qf[:, 1] = s_hh if heavy_hitter_strength >= 0 else -s_hh
                qf[:, 2:2 + 2 * n_pairs] = q_rope
                qf[:, 2 + 2 * n_pairs:] = c_noise * rng.standard_normal((q_len, n_noise))
                q[b, h] = (qf * (amp * temps[h])) @ rotations[g]
    v = rng.standard_normal((batch, kv_heads, kv_len, v_dim))
    return q.astype(out_dtype), k.astype(out_dtype), v.astype(out_dtype)


# ---------------------------------------------------------------------------------------
# looking at it


def _as_4d(x, name):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (B, H, L, D) or 3-D (H, L, D), got shape {x.shape}")
    return x


def attention_map(q, k, *, head: int = 0, batch: int = 0, causal: bool = True,
                  scale: float | None = None) -> np.ndarray:
    """Softmax attention probabilities of one query head, for plots (small sizes only).

    Args:
        q: ``(B, Hq, Lq, Dqk)`` (or 3-D ``(Hq, Lq, Dqk)``); k: ``(B, Hkv, Lk, Dqk)``.
        head: query head ``h``; it reads kv head ``h // (Hq // Hkv)``.
        batch: batch element.
        causal: bottom-right causal mask, as :func:`blasst_ref.attention`.
        scale: default ``1 / sqrt(Dqk)``.

    Returns:
        float64 ``(Lq, Lk)``: row ``i`` is the attention distribution of query ``i`` (sums to
        1; masked keys are 0). Plot ``log10`` of it to see sinks, window and heavy hitters.

    Raises:
        ValueError: bad shapes or indices, or ``Lq * Lk > MAX_MAP_ENTRIES``.
    """
    q4, k4 = _as_4d(q, "q"), _as_4d(k, "k")
    b_, hq, lq, dqk = q4.shape
    if k4.shape[0] != b_ or k4.shape[3] != dqk:
        raise ValueError(f"q {q4.shape} and k {k4.shape} must share batch and head dim")
    hkv, lk = k4.shape[1], k4.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads {hq} must be a multiple of k heads {hkv}")
    head = _check_int("head", head, 0)
    batch = _check_int("batch", batch, 0)
    if head >= hq:
        raise ValueError(f"head must be < Hq={hq}, got {head}")
    if batch >= b_:
        raise ValueError(f"batch must be < B={b_}, got {batch}")
    if lq * lk > MAX_MAP_ENTRIES:
        raise ValueError(
            f"attention_map builds the full {lq} x {lk} matrix; at most {MAX_MAP_ENTRIES} "
            f"entries, pass a smaller workload"
        )
    scale = 1.0 / math.sqrt(dqk) if scale is None else _check_real("scale", scale, lo=0.0, strict=True)
    qh = q4[batch, head].astype(np.float64)
    kh = k4[batch, head // (hq // hkv)].astype(np.float64)
    s = (qh @ kh.T) * scale
    if causal:
        visible = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + tiling.causal_offset(lq, lk)
        s = np.where(visible, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a row that sees nothing: all zeros below
    p = np.exp(s - m)
    tot = p.sum(axis=1, keepdims=True)
    return np.divide(p, tot, out=np.zeros_like(p), where=tot > 0)


def skip_map(q, k, v, thresh: float, *, head: int = 0, batch: int = 0, causal: bool = True,
             block_q: int | None = None, block_k: int | None = None,
             backend: str = "auto") -> np.ndarray:
    """The tile decisions of one head, for plots: int8 ``(n_q_tiles, n_k_tiles)``.

    Codes as :attr:`blasst_ref.AttentionStats.tile_map`: 0 not visited (masked by
    causality), 1 computed, 2 skipped. In decode (``Lq <= 16``) the map is ``(1, n_k_tiles)``
    and belongs to the kv group of ``head`` (the group decides together). Runs
    :func:`blasst_ref.attention` on all heads with ``return_stats=True``; arguments as there.
    """
    from .api import attention  # the api imports nothing from here; keep it lazy anyway

    _, stats = attention(q, k, v, thresh, causal=causal, block_q=block_q, block_k=block_k,
                         backend=backend, return_stats=True)
    tm = stats.tile_map
    head = _check_int("head", head, 0)
    batch = _check_int("batch", batch, 0)
    hq = np.shape(q)[-3]
    hkv = np.shape(k)[-3]
    if head >= hq:
        raise ValueError(f"head must be < Hq={hq}, got {head}")
    if batch >= tm.shape[0]:
        raise ValueError(f"batch must be < B={tm.shape[0]}, got {batch}")
    if stats.phase == "decode":
        return tm[batch, head // (hq // hkv)]
    return tm[batch, head]
