"""A tiny byte-level causal language model whose attention is a function you pass in.

Architecture (a small Llama): token embedding (256 bytes), ``n_layers`` pre-norm blocks of
RMSNorm -> attention (RoPE on q and k, ``n_kv_heads`` kv heads shared by groups of query
heads) -> residual, RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm and an output layer
tied to the embedding.

The attention of every block is ``attn(q, k, v, layer)``: ``q`` ``(B, Hq, L, D)``,
``k``/``v`` ``(B, Hkv, L, D)`` (RoPE applied, not repeated per group), returning
``(B, Hq, L, D)``; it must be causal. :func:`sdpa_attention` is PyTorch's dense attention;
a BLASST attention with a gradient plugs in the same way, so one model can be trained dense
and evaluated sparse, or trained sparse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of a :class:`TinyLM`.

    Attributes:
        vocab: token ids are bytes, ``0..255``.
        d_model: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: query heads; ``d_model % n_heads == 0``.
        n_kv_heads: kv heads, dividing ``n_heads`` (GQA; ``n_heads`` is MHA).
        mlp_hidden: width of the SwiGLU hidden layer.
        max_len: longest sequence (RoPE tables are built for it).
        rope_base: RoPE's frequency base.
        bos: a byte the model puts before every input (a beginning-of-sequence token, as
            real LMs have: a fixed first key that heads can learn to park attention on, the
            "attention sink" BLASST's skipping feeds on); its prediction is dropped, so
            ``model(tokens)`` still returns one row of logits per input byte and takes
            ``L <= max_len - 1``. ``None`` (default): no such token.
    """

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp_hidden: int = 384
    max_len: int = 1024
    rope_base: float = 10000.0
    bos: int | None = None

    def __post_init__(self):
        if self.bos is not None and not 0 <= self.bos < self.vocab:
            raise ValueError(f"bos={self.bos} must be a token id in [0, {self.vocab})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def sdpa_attention(q, k, v, layer: int):
    """Dense causal attention (PyTorch SDPA); ``layer`` is unused."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _rope_tables(cfg: TinyLMConfig):
    half = cfg.head_dim // 2
    freqs = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(cfg.max_len, dtype=torch.float64)[:, None] * freqs[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rotate(x, cos, sin):
    """RoPE on the last dim of ``x`` ``(B, H, L, D)``: pairs ``(x[:D/2], x[D/2:])``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.norm1 = nn.RMSNorm(d)
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wkv = nn.Linear(d, 2 * cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.norm2 = nn.RMSNorm(d)
        self.w_gate_up = nn.Linear(d, 2 * cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, d, bias=False)

    def forward(self, x, cos, sin, attn, layer):
        cfg = self.cfg
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(b, n, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k, v = self.wkv(h).view(b, n, 2, cfg.n_kv_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = attn(q.contiguous(), k.contiguous(), v.contiguous(), layer)
        x = x + self.wo(o.transpose(1, 2).reshape(b, n, -1))
        gate, up = self.w_gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class TinyLM(nn.Module):
    """A byte-level causal LM (see the module docstring).

    ``model(tokens, attn=None)``: ``tokens`` int64 ``(B, L)`` with ``L <= max_len`` (``- 1``
    with a ``bos``) -> logits ``(B, L, 256)``; ``attn`` defaults to :func:`sdpa_attention`.
    """

    def __init__(self, cfg: TinyLMConfig, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # seeded, GPT-2-style scales
            if p.dim() == 2:
                std = 0.02
                if name.endswith(("wo.weight", "w_down.weight")):
                    std /= math.sqrt(2 * cfg.n_layers)  # residual branches
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens, attn=None):
        attn = sdpa_attention if attn is None else attn
        bos = self.cfg.bos is not None
        n = tokens.shape[1] + bos
        if n > self.cfg.max_len:
            raise ValueError(f"tokens has length {tokens.shape[1]}; this model takes at most "
                             f"max_len={self.cfg.max_len}" + (" - 1 (bos)" if bos else ""))
        if bos:
            tokens = torch.cat([tokens.new_full((tokens.shape[0], 1), self.cfg.bos), tokens], 1)
        cos, sin = self.rope_cos[:n], self.rope_sin[:n]
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn, i)
        logits = self.norm(x) @ self.embed.weight.T  # tied output layer
        return logits[:, 1:] if bos else logits
