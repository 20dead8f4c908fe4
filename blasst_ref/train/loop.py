"""The training loop and the evaluation, for any attention function."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .data import random_windows


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean next-byte cross-entropy, nats per byte.
        perplexity: ``exp(loss)``.
        bytes: predictions it averaged over.
    """

    loss: float
    perplexity: float
    bytes: int


@dataclass
class History:
    """What :func:`train` did: the loss of every step, its learning rate, and wall time."""

    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    seconds: float = 0.0


def _lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))  # cosine decay to 0


def train(model, data: np.ndarray, *, steps: int, batch: int = 16, length: int = 256,
          attn=None, lr: float = 3e-3, warmup: int = 20, weight_decay: float = 0.1,
          seed: int = 0, progress: bool = True) -> History:
    """Train ``model`` in place on random windows of ``data`` (next-byte prediction).

    Args:
        model: a :class:`~blasst_ref.train.TinyLM` (or any module ``model(x, attn=...)``
            returning logits).
        data: uint8 bytes (``Corpus.train``).
        steps, batch, length: optimizer steps, windows per step, bytes per window.
        attn: the attention function of the forward pass (default dense SDPA); its
            gradient is what the backward uses.
        lr, warmup, weight_decay: AdamW with linear warm-up and cosine decay.
        seed: the windows' random generator.
        progress: a tqdm bar on stderr.

    Returns:
        a :class:`History`.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.95))
    hist = History()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="train", unit="step")
    for step in bar:
        x, y = (torch.from_numpy(a) for a in random_windows(data, batch, length, rng))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        logits = model(x, attn=attn)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.loss.append(loss.item())
        hist.lr.append(opt.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{hist.loss[-1]:.3f}")
    hist.seconds = time.perf_counter() - t0
    return hist


@torch.no_grad()
def evaluate(model, data: np.ndarray, *, length: int = 256, windows: int = 32,
             attn=None) -> Evaluation:
    """Mean next-byte loss of ``model`` on ``windows`` evenly spaced windows of ``data``
    (the same windows on every call: comparisons between attentions are paired)."""
    if len(data) <= length + 1:
        raise ValueError(f"the data ({len(data)} bytes) is shorter than a window ({length} + 1)")
    model.eval()
    starts = np.linspace(0, len(data) - length - 1, windows).astype(np.int64)
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    w = torch.from_numpy(data[idx].astype(np.int64))
    logits = model(w[:, :-1], attn=attn)
    loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))
    return Evaluation(loss, math.exp(loss), int(w[:, 1:].numel()))
