"""PyTorch's ``scaled_dot_product_attention`` as the peer of our attention, on the same arrays.

What a user would otherwise call, expressed to compute what :func:`blasst_ref.attention`
computes (our layout is SDPA's; the differences are GQA and the causal alignment):

* :func:`torch_sdpa_call`: SDPA on the CPU, on numpy arrays (no copy);
* :func:`torch_gpu_sdpa_call`: SDPA on CUDA tensors, pinned to one of its GPU backends
  (:data:`TORCH_GPU`: FlashAttention or cuDNN), so that a row names the kernel it timed;
* :func:`torch_available`, :func:`torch_cuda_available`, :func:`torch_supports_gqa`: what
  this machine's torch can do.

torch is optional: nothing here imports it before a function is called.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import tiling

__all__ = ["TORCH_GPU", "torch_available", "torch_cuda_available", "torch_gpu_sdpa_call",
           "torch_sdpa_call", "torch_supports_gqa"]

#: GPU peers of the cuda backend: PyTorch SDPA pinned to one of its GPU backends
TORCH_GPU = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION"}


def torch_available() -> tuple[bool, str]:
    """Whether ``import torch`` works here, and why not."""
    try:
        import torch  # noqa: F401
    except Exception as exc:
        return False, f"torch is not installed ({type(exc).__name__}: {exc})"
    return True, ""


def torch_cuda_available() -> tuple[bool, str]:
    """Whether torch imports and sees a CUDA GPU, and why not."""
    ok, why = torch_available()
    if not ok:
        return ok, why
    import torch

    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (CPU-only torch, or no GPU)"
    return True, ""


def torch_supports_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa=True`` (torch >= 2.5)."""
    import torch

    x = torch.zeros(1, 2, 1, 4)
    y = torch.zeros(1, 1, 1, 4)
    try:
        torch.nn.functional.scaled_dot_product_attention(x, y, y, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def torch_sdpa_call(q, k, v, *, causal: bool, scale: float):
    """A zero-argument callable running PyTorch SDPA on ``q, k, v`` (numpy, no copy), and a
    note on how GQA and the causal mask were expressed.

    * GQA (``Hq > Hkv``): ``enable_gqa=True`` where this torch has it; else the kv heads are
      repeated with ``repeat_interleave`` once, before timing (torch then reads Hq/Hkv times
      more K/V bytes than we do).
    * causal: torch's ``is_causal`` is aligned top-left, ours bottom-right; they agree for
      ``Lq == Lk``. For ``Lq == 1`` the bottom-right mask hides nothing (no mask is passed);
      otherwise an explicit boolean mask is passed.
    """
    import torch

    F = torch.nn.functional
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v))
    hq, hkv, lq, lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kwargs: dict[str, Any] = {"scale": scale}
    notes = []
    if hq != hkv:
        if torch_supports_gqa():
            kwargs["enable_gqa"] = True
            notes.append("GQA via enable_gqa=True")
        else:
            tk = tk.repeat_interleave(hq // hkv, dim=1).contiguous()
            tv = tv.repeat_interleave(hq // hkv, dim=1).contiguous()
            notes.append("GQA via repeat_interleave of the kv heads before timing")
    if causal:
        offset = tiling.causal_offset(lq, lk)
        if lq == lk:
            kwargs["is_causal"] = True
            notes.append("is_causal=True")
        elif offset >= lk - 1:
            notes.append("causal mask hides nothing at this Lq: no mask")
        else:
            mask = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset
            kwargs["attn_mask"] = torch.from_numpy(mask)
            notes.append("bottom-right causal as an explicit boolean attn_mask")

    def call():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, **kwargs)

    return call, "; ".join(notes)


def torch_gpu_sdpa_call(q, k, v, *, causal: bool, scale: float, backend: str):
    """``(call, note)`` running SDPA on CUDA tensors ``q, k, v`` pinned to ``backend``
    (a :data:`TORCH_GPU` key), or ``(None, reason)`` when that backend refuses the input.

    GQA: ``enable_gqa=True`` first; if the backend refuses it, the kv heads are repeated once
    before timing (and the note says so: torch then reads more K/V bytes than we do).
    Causal as :func:`torch_sdpa_call` (``is_causal`` for ``Lq == Lk``, nothing for a
    one-row decode, else an explicit bottom-right boolean mask)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    kind = getattr(SDPBackend, TORCH_GPU[backend])
    hq, hkv, lq, lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kwargs: dict[str, Any] = {"scale": scale}
    notes = []
    if causal:
        offset = tiling.causal_offset(lq, lk)
        if lq == lk:
            kwargs["is_causal"] = True
        elif offset < lk - 1:
            mask = torch.arange(lk, device=q.device)[None, :] <= \
                torch.arange(lq, device=q.device)[:, None] + offset
            kwargs["attn_mask"] = mask
            notes.append("explicit bottom-right mask")
    tries = [("enable_gqa", q, k, v, {"enable_gqa": True})] if hq != hkv else \
        [("", q, k, v, {})]
    if hq != hkv:
        rk = k.repeat_interleave(hq // hkv, dim=1).contiguous()
        rv = v.repeat_interleave(hq // hkv, dim=1).contiguous()
        tries.append(("GQA via repeat_interleave before timing", q, rk, rv, {}))
    errors = []
    for label, tq, tk, tv, extra in tries:
        kw = dict(kwargs, **extra)

        def call(tq=tq, tk=tk, tv=tv, kw=kw):
            with torch.inference_mode(), sdpa_kernel(kind):
                return F.scaled_dot_product_attention(tq, tk, tv, **kw)

        try:
            call()
            torch.cuda.synchronize()
        except Exception as exc:  # this backend does not take this input
            errors.append(f"{label or 'plain'}: {str(exc).splitlines()[0][:120]}")
            continue
        return call, "; ".join(notes + ([label] if label and label != "enable_gqa" else []))
    return None, f"{backend} refuses this input ({' | '.join(errors)})"
