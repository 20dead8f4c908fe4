"""PyTorch and Hugging Face transformers integration (docs/DESIGN.md §10).

Three layers, each usable on its own:

* :func:`attention` -- :func:`blasst_ref.attention` with PyTorch SDPA's argument names:
  torch tensors in, a torch tensor out on the same device and dtype. CPU tensors go to the
  Numba CPU kernels as numpy views (no copy; ``bfloat16``, which numpy lacks, is computed in
  float32 and converted back), CUDA tensors to the CUDA kernels in place.
* :func:`register` / :func:`configure` -- ``"blasst"`` in transformers' ``AttentionInterface``,
  so any model that dispatches through that interface (Llama, Qwen2, Mistral, SmolLM, ...)
  runs BLASST in every attention layer, prefill and KV-cache decode, with thresholds from a
  scale factor, a :class:`blasst_ref.Calibration`, or one of either per layer::

      blasst_ref.torch.register()
      model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="blasst")
      blasst_ref.torch.configure(model, scale_factor=20.0)       # thresh = 20 / L per call
      with blasst_ref.torch.collect_stats() as st, torch.no_grad():
          model(input_ids)
      print(st.format_table())                                   # sparsity per layer

* :func:`collect_stats` -- skip statistics per layer and per head of every BLASST call made
  inside the ``with`` block (and the wall time spent in attention).

Masks: BLASST computes causal attention aligned bottom-right (every KV-cache decoder's mask)
or full attention, and no other mask. The ``"blasst"`` registration asks transformers for
SDPA's mask, which is ``None`` for a plain causal batch; a materialised mask that is exactly
causal (chunked prefill after a cache) is recognised and accepted. Any other mask (padding
in a batch, a sliding window, a custom 4-D mask) raises a ``ValueError`` by default; with
``configure(..., on_unsupported_mask="sdpa")`` such calls run PyTorch SDPA instead (dense) and
are counted as fallbacks in the statistics.

Gradients: :func:`attention` and the ``"blasst"`` registration are differentiable. When
autograd needs a gradient (grad mode on and an input requiring grad), the call runs
:func:`blasst_ref.attention_forward`, which keeps the tile decisions and each row's
log-sum-exp, and its backward runs :func:`blasst_ref.attention_backward` with those same
decisions: the gradient of the function BLASST computed, skipped tiles contributing exactly
zero (docs/DESIGN.md §11). Gradients come in the inputs' dtype (computed in float32, float64
for float64). Without a gradient to compute, the call runs the plain forward (no ``lse``).
:func:`_forward` is the one place that computes.

Thread safety: :func:`attention` is as thread-safe as :func:`blasst_ref.attention`.
:func:`configure` mutates the model (do it before running it); statistics collectors live in
a ``contextvars`` variable, so a ``collect_stats`` block sees the calls of its own thread
(or task) only.
"""

from __future__ import annotations

# This file is ``blasst_ref/torch.py``. Run as a script from inside ``blasst_ref/`` (that
# folder first on sys.path), it would be found by ``import torch`` in place of PyTorch; stop
# that with a clear message instead of failing later in an unrelated place.
if __name__ == "torch":  # pragma: no cover - only with blasst_ref/ itself on sys.path
    raise ImportError(
        "blasst_ref/torch.py was imported as the top-level module 'torch': the folder "
        "blasst_ref/ is on sys.path (was a script run from inside it?). Run package modules "
        "with 'python -m blasst_ref.<module>' from outside the folder."
    )


import contextlib  # noqa: E402
import contextvars  # noqa: E402
import math  # noqa: E402
import numbers  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402  (absolute import: PyTorch, never this module)

from blasst_ref import tiling  # noqa: E402
from blasst_ref.api import AttentionStats, stats_of_tile_map  # noqa: E402
from blasst_ref.api import attention as _blasst_attention  # noqa: E402
from blasst_ref.calibrate import Calibration  # noqa: E402

__all__ = [
    "ATTN_IMPLEMENTATION",
    "LayerCall",
    "Stats",
    "Thresholds",
    "attention",
    "collect_stats",
    "attention_modules",
    "configure",
    "hf_attention",
    "num_layers",
    "register",
]

#: The name under which :func:`register` adds BLASST to transformers' attention interface.
ATTN_IMPLEMENTATION = "blasst"
#: Thresholds are capped at this: ``scale_factor / L`` reaches 1 on contexts shorter than
#: the scale factor, where the law no longer says anything (such short contexts are a few
#: tiles, and the first tile of a row is never skipped). Peaked layers of real models take
#: thresholds up to here at an acceptable cost (``docs/REAL_MODELS.md``).
MAX_THRESH = 0.9


# ---------------------------------------------------------------------------------------
# attention() with SDPA's names


def _check_tensors(query, key, value):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; "
                            f"blasst_ref.attention takes numpy arrays")
    devices = {x.device for x in (query, key, value)}
    if len(devices) > 1:
        raise ValueError(f"query, key and value must be on one device, got "
                         f"{query.device}, {key.device}, {value.device}")


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _to_arrays(*xs):
    """torch tensors -> what :mod:`blasst_ref.backward` takes: numpy views of CPU tensors
    (bfloat16, which numpy lacks, as a float32 copy), contiguous CUDA tensors as they are."""
    if xs[0].is_cuda:
        return tuple(x.detach().contiguous() for x in xs)
    return tuple((x.detach().float() if x.dtype == torch.bfloat16 else x.detach()).numpy()
                 for x in xs)


def _as_tensor(x, like):
    """An array of the backward module (numpy, or the CUDA library's) -> a tensor of
    ``like``'s dtype on its device."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x, device=like.device)
    return t.to(like.dtype)


class _BlasstFunction(torch.autograd.Function):
    """BLASST attention with a gradient: forward :func:`blasst_ref.attention_forward`,
    backward :func:`blasst_ref.attention_backward` with the forward's tile decisions.

    ``apply(q, k, v, thresh, causal, scale, backend, block_q, block_k, box)``: the
    :class:`blasst_ref.SavedForBackward` of the call is appended to the list ``box`` (the
    statistics come from its tile map)."""

    @staticmethod
    def forward(ctx, q, k, v, thresh, causal, scale, backend, block_q, block_k, box):
        from blasst_ref.backward import attention_forward

        out, saved = attention_forward(*_to_arrays(q, k, v), thresh, causal=causal,
                                       scale=scale, backend=backend, block_q=block_q,
                                       block_k=block_k)
        out = _as_tensor(out, q)
        ctx.blasst_saved = saved
        ctx.save_for_backward(q, k, v, out)
        box.append(saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        from blasst_ref.backward import attention_backward

        q, k, v, out = ctx.saved_tensors
        grads = attention_backward(*_to_arrays(dout, q, k, v, out), ctx.blasst_saved)
        dq, dk, dv = (_as_tensor(g, x) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None, None, None, None, None


def _stats_of(saved, q, k):
    """The :class:`blasst_ref.AttentionStats` of a differentiable call, from its saved tile
    map, as :func:`blasst_ref.attention` reports it."""
    tm = saved.tile_map
    tm = tm.copy_to_host() if hasattr(tm, "copy_to_host") else np.asarray(tm)
    tm = tm[None] if tm.ndim == 3 else tm
    return stats_of_tile_map(tm, saved.backend, saved.phase == "decode",
                             q.shape[-3] // k.shape[-3], q.shape[-2], saved.block_q,
                             saved.block_k, saved.backend)


def _forward(q, k, v, thresh, causal, scale, backend, block_q, block_k, return_stats):
    """The computation: torch tensors in ``(B, H, L, D)``; returns ``(out, stats or None)``.

    CPU tensors cross to numpy as views inside :func:`blasst_ref.attention`; CUDA tensors
    are read in place by the CUDA backend (made contiguous first, a copy only if they are
    not). When autograd needs a gradient, the differentiable :class:`_BlasstFunction` runs
    instead."""
    if _needs_grad(q, k, v):
        box = []
        out = _BlasstFunction.apply(q, k, v, thresh, causal, scale, backend, block_q, block_k,
                                    box)
        return out, (_stats_of(box[0], q, k) if return_stats else None)
    if q.is_cuda:
        q, k, v = (x.detach().contiguous() for x in (q, k, v))
    res = _blasst_attention(q, k, v, thresh, causal=causal, scale=scale, backend=backend,
                            block_q=block_q, block_k=block_k, return_stats=return_stats)
    return res if return_stats else (res, None)


def attention(query, key, value, thresh: float = 0.0, *, attn_mask=None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = True,
              backend: str = "auto", block_q: int | None = None, block_k: int | None = None,
              return_stats: bool = False):
    """BLASST attention on torch tensors, with ``torch.nn.functional.scaled_dot_product_attention``'s names.

    Args:
        query: ``(B, Hq, Lq, Dqk)`` (or ``(Hq, Lq, Dqk)``), float16/float32/bfloat16 (float64
            on CPU).
        key: ``(B, Hkv, Lk, Dqk)``; value: ``(B, Hkv, Lk, Dv)``; on the query's device.
        thresh: BLASST's threshold in ``[0, 1)``; ``0`` is exact dense attention
            (:func:`blasst_ref.threshold_for` gives the calibrated ``scale_factor / L``).
        attn_mask, dropout_p: accepted for SDPA compatibility; only ``None`` and ``0.0``
            (BLASST supports no arbitrary mask and no dropout).
        is_causal: causal mask aligned **bottom-right** (row ``i`` sees keys
            ``j <= i + Lk - Lq``, as in FlashAttention and KV-cache decoding). Equal to SDPA's
            ``is_causal=True`` when ``Lq == Lk``; SDPA aligns top-left otherwise.
        scale: score scale, default ``1 / sqrt(Dqk)``.
        enable_gqa: as SDPA's; ``Hkv < Hq`` is refused when ``False``.
        backend, block_q, block_k, return_stats: as :func:`blasst_ref.attention`.

    Returns:
        ``(B, Hq, Lq, Dv)`` on the input's device, in its dtype; or ``(out, stats)`` with an
        :class:`blasst_ref.AttentionStats`.

    Differentiable: with grad mode on and an input requiring grad, ``out.backward()`` gives
    ``query``, ``key``, ``value`` the gradient of what this call computed (the tile decisions
    held fixed, skipped tiles contributing zero; ``key``/``value`` summed over each kv
    group's query heads), in their dtypes.

    Raises:
        TypeError / ValueError: as :func:`blasst_ref.attention`, plus non-tensor inputs,
            mixed devices, a mask, dropout, GQA shapes with ``enable_gqa=False``.
    """
    _check_tensors(query, key, value)
    if attn_mask is not None:
        raise ValueError("attn_mask must be None: BLASST supports only is_causal (bottom-right) "
                         "or no mask")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (BLASST has no dropout), got {dropout_p!r}")
    if not enable_gqa and query.ndim >= 3 and key.ndim == query.ndim \
            and query.shape[-3] != key.shape[-3]:
        raise ValueError(f"query has {query.shape[-3]} heads and key {key.shape[-3]}: grouped "
                         f"heads need enable_gqa=True")
    out, stats = _forward(query, key, value, thresh, is_causal, scale, backend, block_q,
                          block_k, return_stats)
    return (out, stats) if return_stats else out


# ---------------------------------------------------------------------------------------
# thresholds of a model


def _as_tuple(name, x, n_layers):
    """A scale factor or one per layer -> a tuple of ``n_layers`` floats >= 0."""
    xs = tuple(x) if isinstance(x, Sequence | np.ndarray) else (x,)
    for s in xs:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s < 0:
            raise ValueError(f"{name} must be a finite number >= 0 or one per layer, got {x!r}")
    if len(xs) == 1:
        return xs * n_layers
    if len(xs) != n_layers:
        raise ValueError(f"{name} has {len(xs)} values; the model has {n_layers} layers "
                         f"(give one value, or one per layer)")
    return tuple(float(s) for s in xs)


def _from_calibration(name, cal, target, n_layers):
    cals = tuple(cal) if isinstance(cal, Sequence) else (cal,) * n_layers
    targets = _as_tuple("target_sparsity", target, n_layers)
    if len(cals) != n_layers:
        raise ValueError(f"{name} has {len(cals)} calibrations; the model has {n_layers} layers")
    for c in cals:
        if not isinstance(c, Calibration):
            raise TypeError(f"{name} must be a blasst_ref.Calibration (or one per layer), "
                            f"got {type(c).__name__}")
    return tuple(c.scale_factor(t) for c, t in zip(cals, targets))


@dataclass(frozen=True)
class Thresholds:
    """The thresholds BLASST uses in each layer of a model (set by :func:`configure`).

    The threshold of one call is ``scale_factor / Lk`` (``Lk`` = keys in the cache, the
    calibrated law of docs/DESIGN.md §5), capped at :data:`MAX_THRESH`.

    Attributes:
        prefill, decode: one scale factor per layer (in keys), for calls with more than 16
            query rows (prefill) and for the split-KV decode path.
        block_q, block_k: prefill tile sizes (``None``: the defaults of
            :mod:`blasst_ref.tiling`). decode_block_k: keys per decode tile (``None``:
            ``block_k``, else the decode default); a decode tile's rows are the kv group's.
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"cuda"``.
        on_unsupported_mask: ``"raise"`` or ``"sdpa"`` (module docstring).
    """

    prefill: tuple
    decode: tuple
    block_q: int | None = None
    block_k: int | None = None
    backend: str = "auto"
    on_unsupported_mask: str = "raise"
    decode_block_k: int | None = None

    def scale_factor(self, layer: int, phase: str) -> float:
        """The scale factor of ``layer`` in ``phase`` (one value stands for every layer)."""
        xs = self.decode if phase == "decode" else self.prefill
        return xs[layer] if len(xs) > 1 else xs[0]

    def threshold(self, layer: int, context_len: int, phase: str) -> float:
        """``min(scale_factor / context_len, MAX_THRESH)`` for a call of ``layer``."""
        return min(self.scale_factor(layer, phase) / max(int(context_len), 1), MAX_THRESH)

    def blocks(self, phase: str) -> tuple:
        """``(block_q, block_k)`` of a call in ``phase``."""
        if phase == "decode" and self.decode_block_k is not None:
            return self.block_q, self.decode_block_k
        return self.block_q, self.block_k


def num_layers(model) -> int:
    """The number of attention layers of a transformers model (``max(layer_idx) + 1``)."""
    layers = {m.layer_idx for m in attention_modules(model)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention module with a layer_idx: "
                         f"not a model that dispatches through transformers' AttentionInterface")
    return max(layers) + 1


def attention_modules(model):
    """The submodules transformers hands to an attention function (they carry
    ``layer_idx``); :func:`configure` attaches the thresholds to them."""
    # The modules transformers passes to an attention function: they carry layer_idx and the
    # model's config. (A decoder layer that also carries layer_idx gets the same settings,
    # harmlessly.)
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), numbers.Integral) and hasattr(m, "config")]


def configure(model, scale_factor=0.0, *, calibration=None, target_sparsity=None,
              decode_scale_factor=None, decode_calibration=None, block_q=None, block_k=None,
              decode_block_k=None, backend: str = "auto",
              on_unsupported_mask: str = "raise") -> Thresholds:
    """Run ``model`` with BLASST attention, at the given thresholds, in every layer.

    Registers ``"blasst"`` (:func:`register`) and switches the model to it
    (``model.set_attn_implementation``); switch back with
    ``model.set_attn_implementation("sdpa")``.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention layers use the
            ``AttentionInterface``.
        scale_factor: ``thresh = scale_factor / L``: one number, or one per layer. ``0`` (the
            default) is exact dense attention through the BLASST kernels.
        calibration, target_sparsity: instead of ``scale_factor``: a
            :class:`blasst_ref.Calibration` (or one per layer) and the target sparsity (or
            one per layer); the scale factor is ``calibration.scale_factor(target)``.
        decode_scale_factor, decode_calibration: the same for the decode phase; default: the
            prefill values (fit decode separately for best results, docs/DESIGN.md §5).
        block_q, block_k: tile sizes; default the calibration's, else
            :mod:`blasst_ref.tiling`'s. Smaller tiles skip more precisely (less error at the
            same sparsity) and run slower.
        decode_block_k: keys per tile in decode (default: ``block_k``; tile size is an
            accuracy knob per phase).
        backend: as :func:`blasst_ref.attention`.
        on_unsupported_mask: ``"raise"`` (default) or ``"sdpa"`` (run SDPA, dense, for calls
            with a mask BLASST cannot apply, e.g. padding).

    Returns:
        The :class:`Thresholds` now attached to the model's attention layers.
    """
    n_layers = num_layers(model)
    if on_unsupported_mask not in ("raise", "sdpa"):
        raise ValueError(f"on_unsupported_mask must be 'raise' or 'sdpa', got {on_unsupported_mask!r}")
    if calibration is not None:
        if target_sparsity is None:
            raise ValueError("calibration needs target_sparsity (a sparsity in [0, 1), or one per layer)")
        prefill = _from_calibration("calibration", calibration, target_sparsity, n_layers)
        first = calibration[0] if isinstance(calibration, Sequence) else calibration
        block_q = block_q if block_q is not None else first.block_q
        block_k = block_k if block_k is not None else first.block_k
    else:
        prefill = _as_tuple("scale_factor", scale_factor, n_layers)
    if decode_calibration is not None:
        if target_sparsity is None:
            raise ValueError("decode_calibration needs target_sparsity")
        decode = _from_calibration("decode_calibration", decode_calibration, target_sparsity, n_layers)
    elif decode_scale_factor is not None:
        decode = _as_tuple("decode_scale_factor", decode_scale_factor, n_layers)
    else:
        decode = prefill
    if decode_calibration is not None and decode_block_k is None:
        first = decode_calibration[0] if isinstance(decode_calibration, Sequence) else decode_calibration
        decode_block_k = first.block_k
    settings = Thresholds(prefill=prefill, decode=decode, block_q=block_q, block_k=block_k,
                          backend=backend, on_unsupported_mask=on_unsupported_mask,
                          decode_block_k=decode_block_k)
    register()
    for m in attention_modules(model):
        m.blasst_thresholds = settings
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return settings


# ---------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class LayerCall:
    """One attention call inside a :func:`collect_stats` block.

    Attributes:
        layer: the layer's index. phase: ``"prefill"`` or ``"decode"``.
        q_len, kv_len: query rows and keys of the call. thresh: the threshold used.
        skipped, visited: tiles (all heads and batch rows; per kv group in decode).
        head_skipped, head_visited: ``(Hq,)`` tile counts per query head, summed over the
            batch (in decode, the group's counts for each of its query heads).
        seconds: wall time of the call (attention only, inputs' conversion included).
        fallback: ``True`` when the call ran SDPA (an unsupported mask, see the module).
    """

    layer: int
    phase: str
    q_len: int
    kv_len: int
    thresh: float
    skipped: int
    visited: int
    head_skipped: np.ndarray = field(repr=False)
    head_visited: np.ndarray = field(repr=False)
    seconds: float
    fallback: bool = False


def _head_counts(stats: AttentionStats, hq: int):
    tm = stats.tile_map
    skipped = (tm == 2).sum(axis=(0, 2, 3))
    visited = (tm != 0).sum(axis=(0, 2, 3))
    if stats.phase == "decode":  # (Hkv,) groups -> (Hq,) heads
        skipped, visited = (np.repeat(x, hq // x.shape[0]) for x in (skipped, visited))
    return skipped.astype(np.int64), visited.astype(np.int64)


class Stats:
    """Statistics of the BLASST calls made inside a :func:`collect_stats` block.

    ``calls`` holds one :class:`LayerCall` per attention call, in order; the methods pool
    them. Sparsities are skipped / visited tiles (0 where nothing was visited)."""

    def __init__(self):
        self.calls: list[LayerCall] = []

    def _select(self, phase):
        if phase not in (None, "prefill", "decode"):
            raise ValueError(f"phase must be None, 'prefill' or 'decode', got {phase!r}")
        return [c for c in self.calls if phase is None or c.phase == phase]

    @property
    def num_layers(self) -> int:
        return max((c.layer for c in self.calls), default=-1) + 1

    def sparsity(self, phase: str | None = None) -> float:
        """Total tile sparsity over all layers and calls (of one phase if given)."""
        cs = self._select(phase)
        visited = sum(c.visited for c in cs)
        return sum(c.skipped for c in cs) / visited if visited else 0.0

    def per_layer(self, phase: str | None = None) -> np.ndarray:
        """``(num_layers,)`` tile sparsity of each layer."""
        skipped, visited = np.zeros(self.num_layers), np.zeros(self.num_layers)
        for c in self._select(phase):
            skipped[c.layer] += c.skipped
            visited[c.layer] += c.visited
        return np.divide(skipped, visited, out=np.zeros_like(skipped), where=visited > 0)

    def per_head(self, phase: str | None = None) -> np.ndarray:
        """``(num_layers, Hq)`` tile sparsity of each query head of each layer."""
        cs = [c for c in self._select(phase) if not c.fallback]
        hq = max((c.head_visited.shape[0] for c in cs), default=0)
        skipped, visited = np.zeros((self.num_layers, hq)), np.zeros((self.num_layers, hq))
        for c in cs:
            skipped[c.layer] += c.head_skipped
            visited[c.layer] += c.head_visited
        return np.divide(skipped, visited, out=np.zeros_like(skipped), where=visited > 0)

    @property
    def attention_seconds(self) -> float:
        """Wall time spent in the attention calls, in seconds."""
        return sum(c.seconds for c in self.calls)

    @property
    def fallbacks(self) -> int:
        """Calls that ran SDPA instead of BLASST (unsupported mask)."""
        return sum(c.fallback for c in self.calls)

    def format_table(self, phase: str | None = None) -> str:
        """A plain-text table: sparsity and calls per layer, and the total."""
        per = self.per_layer(phase)
        cs = self._select(phase)
        lines = [f"{'layer':>5} {'calls':>6} {'sparsity':>9}"]
        for layer, s in enumerate(per):
            n = sum(c.layer == layer for c in cs)
            lines.append(f"{layer:>5} {n:>6} {s:>9.1%}")
        lines.append(f"{'all':>5} {len(cs):>6} {self.sparsity(phase):>9.1%}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Stats(calls={len(self.calls)}, layers={self.num_layers}, "
                f"sparsity={self.sparsity():.3f}, attention_seconds={self.attention_seconds:.3f})")


_COLLECTORS: contextvars.ContextVar[tuple] = contextvars.ContextVar("blasst_collectors", default=())


@contextlib.contextmanager
def collect_stats():
    """``with collect_stats() as st:`` records every BLASST call in the block into a
    :class:`Stats` (per layer, per head, wall time). Blocks nest; each sees its own calls."""
    st = Stats()
    token = _COLLECTORS.set(_COLLECTORS.get() + (st,))
    try:
        yield st
    finally:
        _COLLECTORS.reset(token)


# ---------------------------------------------------------------------------------------
# transformers' AttentionInterface


def _causal_mask(lq, lk, device):
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def _mask_kind(mask, lq, lk) -> str | None:
    """``"causal"`` or ``"full"`` if a transformers mask is one BLASST applies, else None.

    transformers masks are boolean (``True`` = attend) or additive floats (``0`` = attend,
    the dtype's minimum = masked), ``(B, 1 or H, Lq, Lk)``."""
    if mask.ndim != 4 or tuple(mask.shape[-2:]) != (lq, lk):
        return None
    if mask.dtype == torch.bool:
        visible, hidden = mask, ~mask
    else:
        visible, hidden = mask == 0, mask <= torch.finfo(mask.dtype).min / 2
    if not bool((visible | hidden).all()):
        return None  # an additive bias, not a mask
    if bool(visible.all()):
        return "full"
    causal = _causal_mask(lq, lk, mask.device)
    return "causal" if bool((visible == causal).all()) else None


def _unsupported(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                 settings, why, **kwargs):
    if settings.on_unsupported_mask == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs), True
    raise ValueError(
        f"BLASST attention (layer {getattr(module, 'layer_idx', '?')}) cannot apply {why}: it "
        f"computes causal (bottom-right) or full attention only. Run unpadded batches (one "
        f"sequence, or sequences of one length), or configure(model, ..., "
        f"on_unsupported_mask='sdpa') to run such calls with SDPA (dense)")


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, **kwargs):
    """The function :func:`register` adds to transformers' ``AttentionInterface``.

    transformers' attention-function signature: ``query (B, Hq, Lq, D)``, ``key``/``value``
    ``(B, Hkv, Lk, D)`` (the whole cache in decode), the mask and the score scale; returns
    ``((B, Lq, Hq, Dv), None)``. Thresholds from the module's :class:`Thresholds` (set by
    :func:`configure`; ``thresh = 0`` without). Public so that it can be wrapped, e.g. to
    record a layer's inputs and then run BLASST."""
    settings = getattr(module, "blasst_thresholds", None) or _DENSE
    layer = int(getattr(module, "layer_idx", 0))
    lq, lk = query.shape[-2], key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    why = None
    if kwargs.get("softcap") is not None:
        why = "logit soft-capping"
    elif kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        why = "learned attention sinks"
    elif dropout:
        why = f"dropout ({dropout})"
    elif kwargs.get("sliding_window") is not None and lk > kwargs["sliding_window"]:
        why = f"a sliding window of {kwargs['sliding_window']} keys"
    elif attention_mask is not None:
        kind = _mask_kind(attention_mask, lq, lk)
        if kind is None:
            why = f"this attention mask (shape {tuple(attention_mask.shape)}, e.g. padding)"
        else:
            causal = kind == "causal"
    collectors = _COLLECTORS.get()
    t0 = time.perf_counter()
    if why is not None:
        (out, _), fallback = _unsupported(module, query, key, value, attention_mask, dropout,
                                          scaling, is_causal, settings, why, **kwargs)
        stats = None
    else:
        phase = "decode" if tiling.is_decode(lq) else "prefill"
        thresh = settings.threshold(layer, lk, phase)
        block_q, block_k = settings.blocks(phase)
        out, stats = _forward(query, key, value, thresh, bool(causal), scaling, settings.backend,
                              block_q, block_k, bool(collectors))
        out, fallback = out.transpose(1, 2).contiguous(), False
    if collectors:
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        seconds = time.perf_counter() - t0
        hq = query.shape[1]
        if stats is None:
            zeros = np.zeros(hq, dtype=np.int64)
            call = LayerCall(layer, "decode" if tiling.is_decode(lq) else "prefill", lq, lk, 0.0,
                             0, 0, zeros, zeros, seconds, fallback=True)
        else:
            hs, hv = _head_counts(stats, hq)
            call = LayerCall(layer, stats.phase, lq, lk, thresh, stats.skipped_tiles,
                             stats.visited_tiles, hs, hv, seconds, fallback)
        for st in collectors:
            st.calls.append(call)
    return out, None


_DENSE = Thresholds(prefill=(0.0,), decode=(0.0,))  # a model register()ed, never configure()d


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Add BLASST to transformers' ``AttentionInterface`` (and its mask interface) as ``name``.

    After it, ``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` runs BLASST in every attention layer, at the
    thresholds :func:`configure` set (exact dense, ``thresh = 0``, until then). Idempotent.
    Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, hf_attention)
    # SDPA's mask: None for a plain causal batch, a boolean 4-D mask otherwise (checked above)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
