"""The sparsity-aware training experiment (docs/DESIGN.md §11): does training with BLASST in
the forward pass move the accuracy-sparsity frontier outward?

1. Pre-train a :class:`~blasst_ref.train.TinyLM` densely (shared by both arms), so that its
   attention has structure worth skipping.
2. Fine-tune two copies of it for the same steps on the same batches: **A** with dense
   attention, **B** with BLASST in the forward pass at a threshold (its backward is the
   gradient of what BLASST computed: skipped tiles contribute zero).
3. Evaluate the base model, A and B with BLASST at a sweep of thresholds: validation
   perplexity against the measured tile sparsity, the **frontier** of each.
   :func:`perplexity_at` reads a frontier at a sparsity (linear between measured points), so
   the two models compare at equal sparsity rather than at equal threshold.

:func:`kept_mass` explains the result: the share of each layer's dense attention
probability that falls on the keys BLASST keeps at a threshold. A model that has learned to
live with skipping puts (almost) all its mass in the tiles it keeps.

``python -m blasst_ref.train`` runs :func:`run_experiment` from the command line.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .data import stdlib_corpus
from .loop import evaluate, train
from .model import TinyLM, TinyLMConfig

#: The thresholds of the default sweep (0 is dense).
DEFAULT_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


class TileCounter:
    """Skipped and visited tiles per layer, summed over the BLASST calls it is given."""

    def __init__(self):
        self.skipped: dict[int, int] = {}
        self.visited: dict[int, int] = {}

    def add(self, layer: int, stats) -> None:
        """Adds one call's :class:`blasst_ref.AttentionStats`."""
        self.skipped[layer] = self.skipped.get(layer, 0) + stats.skipped_tiles
        self.visited[layer] = self.visited.get(layer, 0) + stats.visited_tiles

    @property
    def sparsity(self) -> float:
        """Skipped / visited tiles over all layers (0 before any call)."""
        v = sum(self.visited.values())
        return sum(self.skipped.values()) / v if v else 0.0

    def per_layer(self) -> tuple:
        """Tile sparsity of each layer, in layer order."""
        return tuple(self.skipped[i] / self.visited[i] if self.visited[i] else 0.0
                     for i in sorted(self.visited))


def blasst_attention(thresh: float, *, block_q: int = 32, block_k: int = 32,
                     backend: str = "cpu", counter: TileCounter | None = None):
    """An attention function for :class:`~blasst_ref.train.TinyLM`: causal BLASST at
    ``thresh`` through :func:`blasst_ref.torch.attention` (differentiable), counting tiles
    into ``counter`` if given. ``q (B, Hq, L, D)``, ``k``/``v`` ``(B, Hkv, L, D)``."""
    import blasst_ref.torch as bt

    def attn(q, k, v, layer):
        if counter is None:
            return bt.attention(q, k, v, thresh, is_causal=True, backend=backend,
                                block_q=block_q, block_k=block_k)
        out, st = bt.attention(q, k, v, thresh, is_causal=True, backend=backend,
                               block_q=block_q, block_k=block_k, return_stats=True)
        counter.add(layer, st)
        return out

    return attn


@dataclass(frozen=True)
class FrontierPoint:
    """One model evaluated with BLASST at one threshold.

    Attributes:
        thresh: the threshold. sparsity: skipped / visited tiles over all layers and windows.
        loss: mean next-byte loss, nats. perplexity: ``exp(loss)``.
        per_layer: tile sparsity of each layer.
    """

    thresh: float
    sparsity: float
    loss: float
    perplexity: float
    per_layer: tuple


def frontier(model, data: np.ndarray, thresholds=DEFAULT_THRESHOLDS, *, length: int = 256,
             windows: int = 64, block_q: int = 32, block_k: int = 32, backend: str = "cpu",
             progress: bool = False, desc: str = "frontier") -> list[FrontierPoint]:
    """``model``'s validation perplexity and tile sparsity with BLASST at each threshold
    (the same ``windows`` windows of ``data`` for every threshold and every model)."""
    from tqdm.auto import tqdm

    points = []
    for t in tqdm(thresholds, disable=not progress, desc=desc, unit="thresh"):
        counter = TileCounter()
        ev = evaluate(model, data, length=length, windows=windows,
                      attn=blasst_attention(float(t), block_q=block_q, block_k=block_k,
                                            backend=backend, counter=counter))
        points.append(FrontierPoint(float(t), counter.sparsity, ev.loss, ev.perplexity,
                                    counter.per_layer()))
    return points


def perplexity_at(points, sparsity: float) -> float:
    """A frontier's perplexity at ``sparsity``: linear between the two measured points around
    it (the upper envelope is not taken: points as measured); NaN outside the measured range.
    """
    s = np.array([p.sparsity for p in points])
    ppl = np.array([p.perplexity for p in points])
    order = np.argsort(s, kind="stable")
    s, ppl = s[order], ppl[order]
    if not s[0] <= sparsity <= s[-1]:
        return float("nan")
    return float(np.interp(sparsity, s, ppl))


@torch.no_grad()
def kept_mass(model, data: np.ndarray, thresh: float, *, length: int = 256, windows: int = 16,
              block_q: int = 32, block_k: int = 32) -> tuple:
    """Per layer: the share of the dense attention probability (causal softmax, float32,
    averaged over rows, heads and windows) on the keys BLASST keeps at ``thresh``.

    ``1`` means skipping drops nothing; ``1 - kept_mass`` is what the skipped tiles held. The
    model runs dense (SDPA); BLASST runs beside it on the same q, k, v only for its tile map.
    Returns ``(kept mass per layer, tile sparsity per layer)``."""
    import blasst_ref.torch as bt
    from blasst_ref.reference_backward import kept_keys

    from .model import sdpa_attention

    mass: dict[int, list] = {}
    counter = TileCounter()

    def attn(q, k, v, layer):
        _, st = bt.attention(q, k, v, thresh, is_causal=True, backend="cpu", block_q=block_q,
                             block_k=block_k, return_stats=True)
        counter.add(layer, st)
        g = q.shape[1] // k.shape[1]
        kr = k.repeat_interleave(g, dim=1)
        s = (q @ kr.transpose(-1, -2)) / q.shape[-1] ** 0.5
        n = q.shape[2]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        p = torch.softmax(s.float(), dim=-1)
        keep = torch.from_numpy(kept_keys(st.tile_map, n, n, q.shape[1], causal=True,
                                          block_q=block_q, block_k=block_k))
        mass.setdefault(layer, []).append(float((p * keep).sum(-1).mean()))
        return sdpa_attention(q, k, v, layer)

    evaluate(model, data, length=length, windows=windows, attn=attn)
    return tuple(float(np.mean(mass[i])) for i in sorted(mass)), counter.per_layer()


def threshold_for_sparsity(model, data: np.ndarray, target: float, *, length: int = 256,
                           windows: int = 16, block_q: int = 32, block_k: int = 32,
                           iterations: int = 10) -> tuple:
    """The threshold at which ``model`` skips about ``target`` of its tiles (bisection on
    ``log(thresh)`` in ``[1e-5, 0.95]``, sparsity measured on ``windows`` validation windows).
    Returns ``(thresh, measured sparsity)``; the largest sparsity reachable if ``target`` is
    beyond it."""

    def measure(t):
        return frontier(model, data, (t,), length=length, windows=windows, block_q=block_q,
                        block_k=block_k)[0].sparsity

    lo, hi = np.log(1e-5), np.log(0.95)
    s_hi = measure(float(np.exp(hi)))
    if s_hi <= target:
        return float(np.exp(hi)), s_hi
    best = (float(np.exp(hi)), s_hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        s = measure(float(np.exp(mid)))
        if s >= target:
            hi, best = mid, (float(np.exp(mid)), s)
        else:
            lo = mid
    return best


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` measured (``to_dict()`` is its JSON).

    Attributes:
        settings: the arguments of the run (sizes, steps, thresholds, tiles, seed; of
            ``train_sparsity`` and ``train_thresh``, the one that chose B's threshold).
        train_thresh, train_sparsity: the threshold model B was fine-tuned at, and the base
            model's sparsity there (what it was chosen for).
        frontiers: ``{"base": [...], "dense": [...], "blasst": [...]}``, a
            :class:`FrontierPoint` list each: the pre-trained model, A (fine-tuned dense) and
            B (fine-tuned with BLASST).
        kept_mass: ``{model: (mass per layer)}`` at ``train_thresh`` (:func:`kept_mass`).
        train_loss: ``{"base", "dense", "blasst"}`` loss of every step.
        seconds: wall time of each phase (``pretrain``, ``dense``, ``blasst``, ``evaluate``)
            and ``total``.
        gains: per sparsity (``"0.5"``, ``"0.7"``): perplexity of A and B read on their
            frontiers there, and B's relative gain ``1 - ppl_B / ppl_A``.
        python, torch_threads: the interpreter (the corpus is its standard library) and
            torch's CPU threads.
    """

    settings: dict
    train_thresh: float
    train_sparsity: float
    frontiers: dict
    kept_mass: dict
    train_loss: dict
    seconds: dict
    gains: dict
    python: str = ""
    torch_threads: int = 0
    models: dict = field(default_factory=dict, repr=False)  # not in to_dict()

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "models"}
        d["frontiers"] = {k: [asdict(p) for p in v] for k, v in self.frontiers.items()}
        return d

    def format_table(self) -> str:
        """The frontiers side by side and the gains, as plain text."""
        lines = [f"{'thresh':>8}  " + "  ".join(f"{m + ' sparsity':>15} {'ppl':>7}"
                                                 for m in self.frontiers)]
        n = len(next(iter(self.frontiers.values())))
        for i in range(n):
            row = [f"{self.frontiers[m][i].sparsity:>15.1%} {self.frontiers[m][i].perplexity:>7.3f}"
                   for m in self.frontiers]
            lines.append(f"{self.frontiers['dense'][i].thresh:>8.3g}  " + "  ".join(row))
        for s, g in self.gains.items():
            lines.append(f"at {float(s):.0%} sparsity: dense-trained ppl {g['dense']:.3f}, "
                         f"sparsity-aware ppl {g['blasst']:.3f}, gain {g['gain']:+.1%}")
        return "\n".join(lines)


def run_experiment(*, config: TinyLMConfig | None = None, pretrain_steps: int = 300,
                   steps: int = 200, batch: int = 16, length: int = 256,
                   train_sparsity: float = 0.6, train_thresh: float | None = None,
                   thresholds=DEFAULT_THRESHOLDS, block_q: int = 32, block_k: int = 32,
                   lr: float = 3e-3, finetune_lr: float = 1e-3, seed: int = 0,
                   eval_windows: int = 64, corpus_bytes: int | None = None,
                   gains_at=(0.5, 0.7), progress: bool = True) -> ExperimentResult:
    """Pre-train, fine-tune dense (A) and with BLASST (B), measure the three frontiers.

    Args:
        config: the model (default :class:`TinyLMConfig` with ``max_len = length`` and a
            bos byte ``0``, which Python source never contains).
        pretrain_steps: dense steps of the shared base model (0: A and B start from the
            random initialisation, i.e. train from scratch).
        steps: fine-tuning steps of each arm (same seed: the same batches in the same order).
        batch, length: windows per step and the attention's length (the bos and
            ``length - 1`` bytes of text; ``length`` bytes without a bos), in training and
            evaluation.
        train_sparsity: B's threshold is the one at which the base model skips this share of
            tiles (:func:`threshold_for_sparsity`), unless ``train_thresh`` is given.
        thresholds: the evaluation sweep.
        block_q, block_k: BLASST's tiles, in training and evaluation.
        lr, finetune_lr: peak learning rates of pre-training and fine-tuning (AdamW, warm-up,
            cosine decay).
        seed: the model's initialisation and the batches.
        eval_windows: validation windows per frontier point.
        corpus_bytes: use only about this many bytes of :func:`stdlib_corpus` (fast runs).
        gains_at: sparsities at which to read the two frontiers.
        progress: tqdm bars on stderr.
    """
    t_start = time.perf_counter()
    config = config or TinyLMConfig(max_len=length, bos=0)
    if config.max_len < length:
        raise ValueError(f"length={length} is longer than the model's max_len={config.max_len}")
    window = length - (config.bos is not None)  # bytes per window; the bos makes it `length`
    data = stdlib_corpus(max_bytes=corpus_bytes)
    ev = dict(length=window, windows=eval_windows, block_q=block_q, block_k=block_k)
    seconds, losses = {}, {}

    torch.manual_seed(seed)
    base = TinyLM(config, seed=seed)
    t0 = time.perf_counter()
    if pretrain_steps:
        h = train(base, data.train, steps=pretrain_steps, batch=batch, length=window, lr=lr,
                  seed=seed, progress=progress)
        losses["base"] = h.loss
    seconds["pretrain"] = time.perf_counter() - t0

    thresh_given = train_thresh is not None
    if not thresh_given:
        train_thresh, measured = threshold_for_sparsity(base, data.val, train_sparsity,
                                                        length=window, block_q=block_q,
                                                        block_k=block_k)
    else:
        measured = frontier(base, data.val, (train_thresh,), length=window, windows=16,
                            block_q=block_q, block_k=block_k)[0].sparsity

    models = {"base": base}
    arms = {"dense": None,
            "blasst": blasst_attention(train_thresh, block_q=block_q, block_k=block_k)}
    warmup = min(20, max(1, steps // 10))
    for name, attn in arms.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        h = train(model, data.train, steps=steps, batch=batch, length=window, attn=attn,
                  lr=finetune_lr if pretrain_steps else lr, warmup=warmup,
                  seed=seed + 1, progress=progress)
        seconds[name] = time.perf_counter() - t0
        losses[name] = h.loss
        models[name] = model

    t0 = time.perf_counter()
    frontiers = {name: frontier(m, data.val, thresholds, progress=progress, desc=name, **ev)
                 for name, m in models.items()}
    masses = {name: kept_mass(m, data.val, train_thresh, length=window, windows=16,
                              block_q=block_q, block_k=block_k)[0]
              for name, m in models.items()}
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    gains = {}
    for s in gains_at:
        a = perplexity_at(frontiers["dense"], s)
        b = perplexity_at(frontiers["blasst"], s)
        gains[f"{s:g}"] = {"dense": a, "blasst": b, "gain": 1 - b / a}

    settings = dict(config=asdict(config), pretrain_steps=pretrain_steps, steps=steps,
                    batch=batch, length=length,
                    train_sparsity=None if thresh_given else train_sparsity,
                    train_thresh=train_thresh if thresh_given else None,
                    thresholds=[float(t) for t in thresholds], block_q=block_q,
                    block_k=block_k, lr=lr, finetune_lr=finetune_lr, seed=seed,
                    eval_windows=eval_windows, corpus_bytes=corpus_bytes,
                    corpus_train_bytes=int(len(data.train)), corpus_val_bytes=int(len(data.val)))
    return ExperimentResult(settings, float(train_thresh), float(measured), frontiers, masses,
                            losses, seconds, gains, python=data.python,
                            torch_threads=torch.get_num_threads(), models=models)
