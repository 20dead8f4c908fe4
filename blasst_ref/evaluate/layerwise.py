"""Per-layer scale factors to an accuracy budget: :func:`calibrate_model`.

One scale factor for a whole model wastes most of what the late layers could skip: layers
differ wildly in how peaked their heads are, so the same ``thresh = s / L`` skips almost
nothing in some and most tiles in others. :func:`calibrate_model` chooses one scale factor
per layer to maximise the total tile sparsity with the model's perplexity on the calibration
text within ``budget`` of dense.

The search (a Lagrangian relaxation, then bisection on the multiplier):

1. One dense pass over the calibration windows captures every layer's q, k, v.
2. For each layer ``l`` and each scale factor ``g`` of a grid, BLASST runs on the captured
   inputs alone (no model forward): its tile sparsity ``s_l(g)`` and relative squared
   output error ``e_l(g) = ||out - dense||^2 / ||dense||^2``. This costs a few attention
   calls per layer and grid point, far less than a model forward each.
3. For a multiplier ``lam``, every layer takes the grid point that maximises
   ``s_l(g) - lam * e_l(g)``: the layers trade sparsity for error at the same marginal rate,
   which is where a sum of sparsities is largest for a given sum of errors. Large ``lam``
   is dense; small ``lam`` skips as much as the grid allows.
4. The true model perplexity on the calibration windows decides: bisection on ``log lam``
   finds the smallest ``lam`` (the sparsest choice) whose perplexity increase is within the
   budget. Each step is one model pass over the calibration windows.

The per-layer error is only a proxy for what the model's loss feels (layers are not equally
sensitive), so step 4 measures instead of trusting it; ``docs/REAL_MODELS.md`` compares the
result with the one-scale-factor frontier on held-out text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ModelCalibration", "calibrate_model", "default_grid"]

CAPTURE_IMPLEMENTATION = "blasst_capture"


def default_grid(length: int) -> np.ndarray:
    """Scale factors tried per layer: 0, powers of ``sqrt(2)`` from ``length / 512``
    (``thresh`` ~0.002: below it real layers skip next to nothing) up, and
    ``MAX_THRESH * length`` (where ``thresh = scale_factor / length`` reaches the cap)."""
    from ..torch import MAX_THRESH

    top = MAX_THRESH * max(int(length), 1)
    start = math.floor(2 * math.log2(max(length / 512, 0.5))) / 2
    steps = 2.0 ** np.arange(start, math.log2(max(top, 0.5)) + 0.25, 0.5)
    return np.unique(np.concatenate([[0.0], steps[steps < top], [top]]))


@dataclass
class ModelCalibration:
    """The result of :func:`calibrate_model`.

    Attributes:
        scale_factors: one per layer, for :func:`blasst_ref.torch.configure`.
        budget: the allowed relative perplexity increase on the calibration text.
        delta: the measured increase there; sparsity: total tile sparsity there.
        dense_perplexity: of the calibration windows.
        lam: the chosen multiplier.
        grid: ``(n_grid,)`` scale factors tried; layer_sparsity, layer_error:
            ``(num_layers, n_grid)`` per-layer sparsity and relative squared error of the
            attention output on the captured inputs.
        steps: ``(lam, delta, sparsity)`` of every bisection step.
        heldout: ``(dense perplexity, calibrated perplexity, sparsity)`` on held-out
            windows, when given.
    """

    scale_factors: tuple
    budget: float
    delta: float
    sparsity: float
    dense_perplexity: float
    lam: float
    grid: np.ndarray = field(repr=False)
    layer_sparsity: np.ndarray = field(repr=False)
    layer_error: np.ndarray = field(repr=False)
    steps: list = field(repr=False)
    block_q: int | None = None
    block_k: int | None = None
    heldout: tuple | None = None

    def to_dict(self) -> dict:
        return {"scale_factors": list(self.scale_factors), "budget": self.budget,
                "delta": self.delta, "sparsity": self.sparsity, "lam": self.lam,
                "dense_perplexity": self.dense_perplexity, "grid": self.grid.tolist(),
                "layer_sparsity": self.layer_sparsity.tolist(),
                "layer_error": self.layer_error.tolist(), "steps": self.steps,
                "block_q": self.block_q, "block_k": self.block_k, "heldout": self.heldout}

    def plot(self, ax=None):
        """Each layer's sparsity against its attention error over the grid, the chosen
        point marked. Returns the figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        cmap = plt.get_cmap("viridis")
        n = len(self.scale_factors)
        for layer in range(n):
            err = np.maximum(self.layer_error[layer], 1e-12)
            ax.plot(err, self.layer_sparsity[layer], "-", color=cmap(layer / max(n - 1, 1)), lw=0.8)
            i = int(np.argmin(np.abs(self.grid - self.scale_factors[layer])))
            ax.plot(err[i], self.layer_sparsity[layer, i], "o", color=cmap(layer / max(n - 1, 1)), ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("relative squared attention error (captured inputs)")
        ax.set_ylabel("tile sparsity")
        ax.set_title(f"per-layer trade-off (colour: layer 0..{n - 1}); dots: chosen")
        return ax.figure


def _capture_attention(store):
    """An attention function that records (layer, q, k, v, scale, causal) and runs SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("calibrate_model needs unpadded windows (no attention mask)")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        store.append((int(module.layer_idx), query.detach().clone(), key.detach().clone(),
                      value.detach().clone(), scaling, bool(causal)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    return capture


def _capture(model, windows):
    """Dense pass: captured inputs per window, and the dense perplexity."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    store, nll, n_tok = [], 0.0, 0
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention(store))
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        with torch.no_grad():
            for w in windows:
                ids = w.reshape(1, -1).to(next(model.parameters()).device)
                logits = model(ids).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
                n_tok += ids.shape[1] - 1
    finally:
        model.set_attn_implementation(before)
    return store, math.exp(nll / n_tok)


def _layer_tables(store, n_layers, grid, block_q, block_k, backend, progress):
    """``(sparsity, error)``, each ``(n_layers, n_grid)``, on the captured inputs."""
    from .. import torch as bt

    skipped = np.zeros((n_layers, len(grid)))
    visited = np.zeros((n_layers, len(grid)))
    err = np.zeros((n_layers, len(grid)))
    ref = np.zeros(n_layers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(store) * len(grid), desc="per-layer trade-off")
    for layer, q, k, v, scale, causal in store:
        q, k, v = (x.float() for x in (q, k, v))  # on the model's device
        kw = dict(is_causal=causal, scale=scale, block_q=block_q, block_k=block_k, backend=backend)
        dense = bt.attention(q, k, v, 0.0, **kw).double()
        ref[layer] += float((dense ** 2).sum())
        for j, g in enumerate(grid):
            thresh = min(g / k.shape[-2], bt.MAX_THRESH)
            out, st = bt.attention(q, k, v, thresh, return_stats=True, **kw)
            err[layer, j] += float(((out.double() - dense) ** 2).sum())
            skipped[layer, j] += st.skipped_tiles
            visited[layer, j] += st.visited_tiles
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    sparsity = np.divide(skipped, visited, out=np.zeros_like(skipped), where=visited > 0)
    return sparsity, err / np.maximum(ref, 1e-300)[:, None]


def _choose(grid, sparsity, error, lam):
    """Per layer, the grid scale factor maximising ``sparsity - lam * error``."""
    return tuple(float(grid[int(np.argmax(s - lam * e))]) for s, e in zip(sparsity, error))


def calibrate_model(model, texts, budget: float = 0.01, *, tokenizer=None, heldout=(),
                    grid=None, block_q=None, block_k=None, backend: str = "auto",
                    steps: int = 8, lam_range=(1e-1, 1e7), progress: bool = True) -> ModelCalibration:
    """Per-layer scale factors with the most total sparsity within a perplexity budget.

    Args:
        model: a transformers causal LM whose attention uses the ``AttentionInterface``.
        texts: calibration windows: 1-D ``torch.long`` token-id tensors, or strings (then
            ``tokenizer`` is needed; each string is one window). All of one length is best:
            scale factors are per key, and the captured length sets the grid.
        budget: allowed relative perplexity increase over dense on ``texts`` (0.01 = 1%).
        heldout: windows to report the result on (perplexity dense and calibrated).
        grid: scale factors tried per layer (default :func:`default_grid` of the length).
        block_q, block_k, backend: BLASST's tiles and backend (the same ones must be used at
            run time: ``configure(model, result.scale_factors, block_q=..., block_k=...)``).
        steps: bisection steps on the multiplier (each one model pass over ``texts``).
        lam_range: the multiplier's bracket (the module docstring says what it weighs).
        progress: tqdm bars.

    Returns:
        A :class:`ModelCalibration`.
    """
    from .perplexity import perplexity
    from .. import torch as bt

    if not (isinstance(budget, (int, float)) and 0 <= budget < 1):
        raise ValueError(f"budget must be a relative perplexity increase in [0, 1), got {budget!r}")
    windows = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("texts holds strings: pass tokenizer= to tokenize them")
            from .text import token_ids

            t = token_ids(tokenizer, t)
        windows.append(t)
    if not windows:
        raise ValueError("texts is empty: give at least one calibration window")
    n_layers = bt.num_layers(model)
    length = int(windows[0].numel())
    grid = default_grid(length) if grid is None else np.asarray(sorted(grid), dtype=float)

    store, dense_ppl = _capture(model, windows)
    sparsity, error = _layer_tables(store, n_layers, grid, block_q, block_k, backend, progress)
    del store

    kw = dict(block_q=block_q, block_k=block_k, backend=backend, progress=False, warmup=False)
    history = []

    def measure(lam):
        sfs = _choose(grid, sparsity, error, lam)
        r = perplexity(model, windows, sfs, **kw)
        delta = r.perplexity / dense_ppl - 1.0
        history.append((float(lam), float(delta), float(r.sparsity)))
        return sfs, delta, r.sparsity

    lo, hi = math.log(lam_range[0]), math.log(lam_range[1])
    best = (tuple([0.0] * n_layers), 0.0, 0.0, math.inf)  # dense always fits
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps + 1, desc=f"bisection (budget {budget:.1%})")
    sfs, delta, sp = measure(math.exp(lo))
    if bar is not None:
        bar.update(1)
    if delta <= budget:
        best = (sfs, delta, sp, math.exp(lo))
    else:
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            sfs, delta, sp = measure(math.exp(mid))
            if bar is not None:
                bar.update(1)
            if delta <= budget:
                hi = mid
                if sp > best[2]:
                    best = (sfs, delta, sp, math.exp(mid))
            else:
                lo = mid
    if bar is not None:
        bar.close()
    sfs, delta, sp, lam = best
    held = None
    if len(heldout):
        d = perplexity(model, heldout, None, **kw)
        c = perplexity(model, heldout, sfs, **kw)
        held = (d.perplexity, c.perplexity, c.sparsity)
    return ModelCalibration(scale_factors=sfs, budget=float(budget), delta=delta, sparsity=sp,
                            dense_perplexity=dense_ppl, lam=lam, grid=grid,
                            layer_sparsity=sparsity, layer_error=error, steps=history,
                            block_q=block_q, block_k=block_k, heldout=held)
