"""Perplexity of a causal LM with dense attention and with BLASST, and sweeps over thresholds.

Perplexity is ``exp(mean next-token loss)`` over every predicted token of every window (each
window is run on its own, from an empty cache, so a window of ``L`` tokens predicts ``L - 1``
of them). Dense attention is the model's own SDPA; BLASST runs through
:func:`blasst_ref.torch.configure` at one scale factor, or one per layer, with the statistics
of :func:`blasst_ref.torch.collect_stats` (total and per-layer tile sparsity, time spent in
attention).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PerplexityResult", "Sweep", "perplexity", "plot_frontiers", "sweep"]


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement.

    Attributes:
        label: what ran (``"dense"``, ``"scale factor 20"``, ``"per-layer"``).
        scale_factors: ``None`` for dense SDPA, else one scale factor per layer (keys).
        loss: mean next-token cross-entropy, nats per token. perplexity: ``exp(loss)``.
        n_tokens: predicted tokens. sparsity: total tile sparsity (0 for dense).
        per_layer: ``(num_layers,)`` tile sparsity (empty for dense).
        seconds: wall time of the forward passes. attention_seconds: of which in BLASST
            attention (0 for dense, whose attention is not timed separately).
        block_q, block_k: the tiles BLASST ran with (``None``: defaults).
    """

    label: str
    scale_factors: tuple | None
    loss: float
    perplexity: float
    n_tokens: int
    sparsity: float
    per_layer: np.ndarray = field(repr=False)
    seconds: float
    attention_seconds: float
    block_q: int | None = None
    block_k: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "PerplexityResult":
        sfs = d.get("scale_factors")
        return cls(label=d["label"], scale_factors=None if sfs is None else tuple(sfs),
                   loss=d["loss"], perplexity=d["perplexity"], n_tokens=d["n_tokens"],
                   sparsity=d["sparsity"], per_layer=np.asarray(d.get("per_layer", [])),
                   seconds=d["seconds"], attention_seconds=d["attention_seconds"],
                   block_q=d.get("block_q"), block_k=d.get("block_k"))

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("label", "loss", "perplexity", "n_tokens", "sparsity",
                                           "seconds", "attention_seconds", "block_q", "block_k")}
        d["scale_factors"] = None if self.scale_factors is None else list(self.scale_factors)
        d["per_layer"] = [float(x) for x in self.per_layer]
        return d


@contextlib.contextmanager
def _attention_of(model, scale_factor, **configure_kw):
    """Runs the block with dense SDPA (``scale_factor=None``, yields ``None``) or BLASST
    (yields the :class:`blasst_ref.torch.Thresholds`); restores the model."""
    from .. import torch as bt

    before = model.config._attn_implementation
    saved = {m: getattr(m, "blasst_thresholds", None) for m in bt.attention_modules(model)}
    try:
        if scale_factor is None:
            model.set_attn_implementation("sdpa")
            yield None
        else:
            yield bt.configure(model, scale_factor, **configure_kw)
    finally:
        for m, t in saved.items():
            if t is None:
                m.__dict__.pop("blasst_thresholds", None)
            else:
                m.blasst_thresholds = t
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


def perplexity(model, windows, scale_factor=None, *, block_q=None, block_k=None,
               backend: str = "auto", label: str | None = None, progress=True,
               warmup: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on token ``windows``, dense or with BLASST.

    Args:
        model: a transformers causal LM (in eval mode).
        windows: 1-D ``torch.long`` tensors of token ids (each run on its own).
        scale_factor: ``None`` for dense attention (SDPA), else BLASST's
            ``thresh = scale_factor / L``: one number or one per layer.
        block_q, block_k, backend: BLASST's tiles and backend.
        label: the result's label (default from ``scale_factor``).
        progress: a tqdm bar over the windows (``True``), none (``False``), or a bar to advance.
        warmup: first run the model once, untimed, on the first 256 tokens, so that the
            timings leave out one-off costs (JIT compilation, first allocations).
    """
    import torch

    from .. import torch as bt

    if label is None:
        label = ("dense" if scale_factor is None else
                 f"scale factor {scale_factor:g}" if np.ndim(scale_factor) == 0 else "per-layer")
    own_bar = progress is True
    if own_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(windows), desc=label, leave=False)
    device = next(model.parameters()).device
    nll, n_tok, seconds = 0.0, 0, 0.0
    kw = {"block_q": block_q, "block_k": block_k, "backend": backend}
    try:
        with _attention_of(model, scale_factor, **kw) as thresholds, torch.no_grad():
            if warmup and len(windows):
                model(windows[0][:256].reshape(1, -1).to(device))
            with bt.collect_stats() as st:
                for w in windows:
                    ids = w.reshape(1, -1).to(device)
                    t0 = time.perf_counter()
                    logits = model(ids).logits[0, :-1]
                    if ids.is_cuda:
                        torch.cuda.synchronize(ids.device)
                    seconds += time.perf_counter() - t0
                    nll += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:],
                                                                   reduction="sum"))
                    n_tok += ids.shape[1] - 1
                    if progress:
                        progress.update(1)
    finally:
        if own_bar:
            progress.close()
    loss = nll / max(n_tok, 1)
    sfs = None if thresholds is None else thresholds.prefill
    return PerplexityResult(
        label=label, scale_factors=sfs, loss=loss, perplexity=math.exp(loss), n_tokens=n_tok,
        sparsity=st.sparsity(), per_layer=st.per_layer(), seconds=seconds,
        attention_seconds=st.attention_seconds, block_q=block_q, block_k=block_k)


@dataclass
class Sweep:
    """Dense against BLASST runs on the same windows (:func:`sweep`)."""

    dense: PerplexityResult
    runs: list
    length: int
    n_windows: int
    text: str = ""
    model: str = ""

    def delta(self, run: PerplexityResult) -> float:
        """Relative perplexity increase over dense: ``ppl / ppl_dense - 1``."""
        return run.perplexity / self.dense.perplexity - 1.0

    def format_table(self) -> str:
        lines = [f"{self.model}  text: {self.text}  {self.n_windows} windows x {self.length} "
                 f"tokens", f"{'run':<22} {'ppl':>9} {'d ppl':>8} {'sparsity':>9} {'s/window':>9} "
                 f"{'attn s':>7}"]
        for r in [self.dense, *self.runs]:
            d = "" if r is self.dense else f"{self.delta(r):+8.2%}"
            lines.append(f"{r.label:<22} {r.perplexity:>9.4f} {d:>8} {r.sparsity:>9.1%} "
                         f"{r.seconds / self.n_windows:>9.2f} {r.attention_seconds / self.n_windows:>7.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "text": self.text, "length": self.length,
                "n_windows": self.n_windows, "dense": self.dense.to_dict(),
                "runs": [dict(r.to_dict(), delta_ppl=self.delta(r)) for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        """The inverse of :meth:`to_dict` (e.g. of ``python -m blasst_ref.evaluate --json``)."""
        return cls(dense=PerplexityResult.from_dict(d["dense"]),
                   runs=[PerplexityResult.from_dict(r) for r in d["runs"]], length=d["length"],
                   n_windows=d["n_windows"], text=d.get("text", ""), model=d.get("model", ""))

    def plot(self, axes=None):
        """Two panels: perplexity increase against total sparsity (a line through the
        one-scale-factor runs, a star per per-layer run), and each run's sparsity per layer.
        Returns the figure."""
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        fig = axes[0].figure
        single = [r for r in self.runs if len(set(r.scale_factors)) == 1]
        other = [r for r in self.runs if r not in single]
        ax = axes[0]
        ax.plot([r.sparsity for r in single], [100 * self.delta(r) for r in single], "o-",
                label="one scale factor")
        for r in single:
            ax.annotate(f"{r.scale_factors[0]:g}", (r.sparsity, 100 * self.delta(r)),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        for r in other:
            ax.plot(r.sparsity, 100 * self.delta(r), "*", ms=12, label=r.label)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("total tile sparsity")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.set_title(f"{self.n_windows} x {self.length} tokens")
        ax.legend(fontsize=8)
        ax = axes[1]
        for r in self.runs:
            ax.plot(np.arange(len(r.per_layer)), r.per_layer, ".-", label=r.label)
        ax.set_xlabel("layer")
        ax.set_ylabel("tile sparsity")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return fig


def sweep(model, windows, scale_factors, *, per_layer=(), block_q=None, block_k=None,
          backend: str = "auto", progress: bool = True, text: str = "", model_name: str = "") -> Sweep:
    """Dense perplexity and BLASST perplexity at each scale factor, on the same windows.

    Args:
        scale_factors: the one-for-all-layers scale factors to run.
        per_layer: extra runs, ``(label, scale_factors_per_layer)`` pairs (e.g. from
            :func:`blasst_ref.evaluate.calibrate_model`).
        Others: as :func:`perplexity`; ``text`` and ``model_name`` label the table.
    """
    runs = [(None, None)] + [(f"scale factor {s:g}", float(s)) for s in scale_factors]
    runs += [(label, tuple(sfs)) for label, sfs in per_layer]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs) * len(windows), desc="perplexity")
    try:
        results = [perplexity(model, windows, sf, block_q=block_q, block_k=block_k,
                              backend=backend, label=label, progress=bar or False)
                   for label, sf in runs]
    finally:
        if bar is not None:
            bar.close()
    return Sweep(dense=results[0], runs=results[1:], length=int(windows[0].numel()),
                 n_windows=len(windows), text=text, model=model_name)


def plot_frontiers(sweeps, labels, ax=None):
    """Several sweeps' perplexity-against-sparsity frontiers on one axis (e.g. tile sizes or
    lengths): a line through each sweep's one-scale-factor runs, a star per per-layer run.
    Returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for i, (sw, label) in enumerate(zip(sweeps, labels)):
        color = f"C{i}"
        single = [r for r in sw.runs if len(set(r.scale_factors)) == 1]
        if single:
            ax.plot([r.sparsity for r in single], [100 * sw.delta(r) for r in single], "o-",
                    color=color, label=f"{label}: one scale factor")
        for r in (r for r in sw.runs if r not in single):
            ax.plot(r.sparsity, 100 * sw.delta(r), "*", ms=13, color=color, mec="k", mew=0.5,
                    label=f"{label}: {r.label}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("total tile sparsity")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure
