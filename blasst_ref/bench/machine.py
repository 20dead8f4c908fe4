"""Which machine a number was measured on (docs/DESIGN.md §4.4: name the machine next to
every figure).

Benchmark numbers are ratios within one run on one machine; a table without the machine is
meaningless. :func:`machine_info` collects what matters for attention kernels — the CPU model,
physical cores, the threads that Numba, BLAS and PyTorch will use, the library versions, and
the GPU when a CUDA backend runs — and :meth:`MachineInfo.line` prints it on one line.

Nothing here imports torch or numba.cuda unless asked: both are optional.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MachineInfo:
    """What a benchmark row needs to say about the machine.

    Attributes:
        cpu_model: e.g. ``"Intel(R) Xeon(R) Platinum 8480+"`` (``/proc/cpuinfo`` or ``lscpu``).
        physical_cores: physical cores of the machine (hyper-threads not counted).
        logical_cpus: CPUs this process may run on (its affinity mask).
        numba_threads: threads Numba's ``parallel=True`` kernels use.
        blas: the BLAS behind numpy and its thread count, e.g. ``"openblas 0.3.31 x2"``.
        python, numpy, numba, torch: versions (``torch`` is ``None`` when not installed).
        torch_threads: ``torch.get_num_threads()`` (``None`` without torch).
        gpu: the CUDA device's name when a CUDA backend was asked for, else ``None``.
        platform: OS and architecture, e.g. ``"Linux-6.1 x86_64"``.
    """

    cpu_model: str
    physical_cores: int
    logical_cpus: int
    numba_threads: int
    blas: str
    python: str
    numpy: str
    numba: str
    torch: str | None
    torch_threads: int | None
    gpu: str | None
    platform: str

    def line(self) -> str:
        """One line for the top of a table, e.g.
        ``machine: AMD EPYC, 2 physical cores / 2 CPUs (numba 2 threads, torch 2) | ...``."""
        threads = f"numba {self.numba_threads} threads"
        if self.torch_threads is not None:
            threads += f", torch {self.torch_threads}"
        parts = [
            f"machine: {self.cpu_model}, {self.physical_cores} physical cores / "
            f"{self.logical_cpus} CPUs ({threads})",
        ]
        if self.gpu:
            parts.append(f"GPU: {self.gpu}")
        versions = f"python {self.python}, numpy {self.numpy}, numba {self.numba}"
        versions += f", torch {self.torch}" if self.torch else ", torch not installed"
        parts += [versions, f"BLAS {self.blas}", self.platform]
        return " | ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _lscpu() -> str:
    try:
        return subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's marketing name: ``/proc/cpuinfo`` (Linux), else ``lscpu``, else platform."""
    m = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo_text(), re.MULTILINE)
    if m:
        return m.group(1).strip()
    m = re.search(r"^Model name:\s*(.+)$", _lscpu(), re.MULTILINE)
    if m:
        return m.group(1).strip()
    if sys.platform == "darwin":  # pragma: no cover - not the CI platform
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                timeout=5, check=False,
            ).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def physical_cores() -> int:
    """Physical cores: distinct ``(physical id, core id)`` pairs of ``/proc/cpuinfo``.

    Hyper-threads share a core's FPUs, so for FLOP-bound kernels the physical count is what
    matters. Falls back to ``lscpu`` (cores per socket x sockets), then to ``os.cpu_count()``.
    """
    pairs, phys = set(), "0"
    for line in _cpuinfo_text().splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = val.strip()
        elif key == "core id":
            pairs.add((phys, val.strip()))
    if pairs:
        return len(pairs)
    text = _lscpu()
    cps = re.search(r"^Core\(s\) per socket:\s*(\d+)", text, re.MULTILINE)
    sockets = re.search(r"^Socket\(s\):\s*(\d+)", text, re.MULTILINE)
    if cps:
        return int(cps.group(1)) * (int(sockets.group(1)) if sockets else 1)
    return os.cpu_count() or 1


def _logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _blas() -> str:
    try:
        import numpy as np  # noqa: F401  (loads numpy's BLAS so that threadpoolctl sees it)
        from threadpoolctl import threadpool_info

        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception:  # pragma: no cover - threadpoolctl is a dependency, but be robust
        return "unknown"
    if not infos:
        return "unknown"
    i = infos[0]
    version = (i.get("version") or "").split(".")
    return f"{i.get('internal_api', '?')} {'.'.join(version[:3])} x{i.get('num_threads', '?')}"


def torch_version() -> tuple[str | None, int | None]:
    """``(torch.__version__, torch.get_num_threads())``, or ``(None, None)`` without torch."""
    try:
        import torch
    except Exception:  # torch is an optional peer, never a dependency
        return None, None
    return torch.__version__, torch.get_num_threads()


def gpu_name() -> str | None:
    """The current CUDA device's name via numba.cuda, or ``None`` when there is none."""
    try:
        from numba import cuda

        if not cuda.is_available():
            return None
        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def machine_info(*, gpu: bool = False) -> MachineInfo:
    """Collect :class:`MachineInfo`. ``gpu=True`` also asks numba.cuda for the device name."""
    import numba
    import numpy as np

    tv, tt = torch_version()
    return MachineInfo(
        cpu_model=cpu_model(),
        physical_cores=physical_cores(),
        logical_cpus=_logical_cpus(),
        numba_threads=numba.get_num_threads(),
        blas=_blas(),
        python=platform.python_version(),
        numpy=np.__version__,
        numba=numba.__version__,
        torch=tv,
        torch_threads=tt,
        gpu=gpu_name() if gpu else None,
        platform=f"{platform.system()}-{platform.release().split('-')[0]} {platform.machine()}",
    )
