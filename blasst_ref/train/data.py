"""Training text that is always there: the Python standard library's own source files.

A byte-level model needs no tokenizer, and every Python installation ships ~5 MB of its own
sources (``Lib/*.py``), which are real, varied, structured text: indentation and brackets
reward a local window, names defined far above reward long-range attention. The corpus is
the sorted top-level modules of the running interpreter's standard library; it differs a
little between Python versions (say which one ran next to any number).
"""

from __future__ import annotations

import pathlib
import platform
import sysconfig
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Corpus:
    """A byte corpus split into a training and a validation part (uint8 arrays).

    Attributes:
        train: the first ``1 - val_fraction`` of the bytes.
        val: the rest (a contiguous tail, as enwik8's split: the files there are not trained
            on, except the one the split falls in).
        files: the source files, in order.
        python: the interpreter version the files came from.
    """

    train: np.ndarray
    val: np.ndarray
    files: tuple
    python: str


def stdlib_corpus(*, val_fraction: float = 0.1, max_bytes: int | None = None) -> Corpus:
    """The top-level ``*.py`` files of the standard library, sorted by name, as bytes.

    Args:
        val_fraction: share of the bytes (from the end) kept for validation.
        max_bytes: keep only the first files up to about this many bytes (fast tests).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    chunks, total = [], 0
    for f in files:
        chunks.append(f.read_bytes())
        total += len(chunks[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    cut = int(round((1 - val_fraction) * len(data)))
    return Corpus(data[:cut], data[cut:], tuple(files[:len(chunks)]),
                  platform.python_version())


def random_windows(data: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    """``(inputs, targets)``: int64 arrays ``(batch, length)`` of random windows of ``data``
    and the same windows shifted by one byte (next-byte prediction)."""
    if len(data) <= length + 1:
        raise ValueError(f"the data ({len(data)} bytes) is shorter than a window ({length} + 1)")
    starts = rng.integers(0, len(data) - length - 1, size=batch)
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    windows = data[idx].astype(np.int64)
    return windows[:, :-1], windows[:, 1:]
