"""Which backends of the attention benchmark run on this machine, and GPU copies of inputs.

Backend names (``--backend`` of ``python -m blasst_ref.bench attention``), in :data:`BACKENDS`:
``reference``, ``cpu`` and ``cpu-noskip`` (ours, on the host), ``torch`` (PyTorch SDPA on the
CPU), ``cuda`` (ours, on a GPU) and the GPU peers of :data:`.torch_peers.TORCH_GPU`.
:func:`backend_available` says whether one runs here and, if not, why.
"""

from __future__ import annotations

import numpy as np

from .torch_peers import TORCH_GPU, torch_available, torch_cuda_available

__all__ = ["BACKENDS", "backend_available", "cpu_available", "cuda_available", "to_device"]

BACKENDS = ("reference", "cpu", "cpu-noskip", "torch", "cuda", *TORCH_GPU)


def cpu_available() -> tuple[bool, str]:
    """Whether ``blasst_ref.cpu`` imports (the Numba kernels), and why not."""
    try:
        from ..cpu import blasst_attention  # noqa: F401
    except Exception as exc:  # ImportError, or a numba error while defining the kernels
        return False, f"blasst_ref.cpu does not import: {type(exc).__name__}: {exc}"
    return True, ""


def cuda_available() -> tuple[bool, str]:
    """Whether a real CUDA GPU is there to time (the simulator is not), and why not."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        # The simulator runs every GPU thread as a Python thread: right for tests, useless
        # (minutes per call) for timings and the demo.
        return False, "NUMBA_ENABLE_CUDASIM=1: Numba's CUDA simulator is not a GPU to time"
    try:
        from numba import cuda

        if cuda.is_available():
            return True, ""
        return False, "numba.cuda.is_available() is False (no CUDA GPU or driver)"
    except Exception as exc:
        return False, f"numba.cuda does not import: {exc}"


def backend_available(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for a ``--backend`` name."""
    if name in ("cpu", "cpu-noskip"):
        return cpu_available()
    if name == "torch":
        return torch_available()
    if name == "cuda":
        return cuda_available()
    if name in TORCH_GPU:
        return torch_cuda_available()
    return True, ""


def to_device(arrays, dtype=None):
    """Device copies of numpy ``arrays`` for the cuda backend: torch CUDA tensors if torch
    has CUDA, else CuPy arrays, else numba device arrays.

    Returns:
        ``(arrays, sync, to_host)``: the device arrays, a zero-argument callable that waits
        for the device (for timing), and one that copies a device result back to numpy.
        ``dtype="bfloat16"``: torch bfloat16 tensors (torch only; numpy has no bfloat16).
    """
    try:
        import torch

        if torch.cuda.is_available():
            dev = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays]
            if dtype == "bfloat16":
                dev = [t.to(torch.bfloat16) for t in dev]
            return dev, torch.cuda.synchronize, lambda x: x.float().cpu().numpy()
    except Exception:
        pass
    try:
        import cupy

        dev = [cupy.asarray(a) for a in arrays]
        return dev, cupy.cuda.Device().synchronize, cupy.asnumpy
    except Exception:
        pass
    from numba import cuda

    # numba's host-side device-array API is being deprecated upstream (docs/DESIGN.md §3.6):
    # only a fallback here, for machines with neither torch-CUDA nor CuPy.
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
    return dev, cuda.synchronize, lambda x: x.copy_to_host()
