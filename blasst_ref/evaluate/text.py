"""The evaluation text and its token windows.

The default text is the Python Language Reference and library topics that CPython ships for
``help()`` (``pydoc_data.topics``, ~460k characters of English prose with code examples,
under the PSF license): present wherever Python is, so no download. Its topics are joined in
sorted order, so the text is fixed for a given Python version (the numbers in the docs name
it). Any other text file can be given instead.

Perplexity is measured on windows of ``length`` tokens cut one after another from the text;
:func:`split_windows` keeps the first windows for calibration and the ones after them for
evaluation, so that a calibrated threshold is judged on text it has not seen.
"""

from __future__ import annotations

import sys

__all__ = ["default_text", "default_text_name", "read_text", "token_ids", "split_windows"]


def default_text() -> str:
    """The Python documentation topics CPython ships for ``help()``, joined in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - a Python without pydoc_data
        raise RuntimeError("this Python has no pydoc_data (the help() topics); give a text "
                           "file instead") from exc
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def default_text_name() -> str:
    """How the default text is named in tables: ``pydoc_data.topics (Python 3.11)``."""
    return f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor})"


def read_text(path: str | None) -> str:
    """The text of a UTF-8 file, or :func:`default_text` for ``None``."""
    if path is None:
        return default_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


def token_ids(tokenizer, text: str):
    """The text as a 1-D ``torch.long`` tensor of token ids (no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_windows(ids, length: int, n_eval: int, n_calib: int = 0):
    """``(calibration, evaluation)`` lists of ``(length,)`` windows, cut one after another.

    The first ``n_calib`` windows calibrate; the next ``n_eval`` evaluate. Raises
    ``ValueError`` if the text is too short."""
    if length < 2:
        raise ValueError(f"length must be >= 2 tokens, got {length}")
    need = (n_calib + n_eval) * length
    if n_eval < 1 or n_calib < 0:
        raise ValueError(f"need n_eval >= 1 and n_calib >= 0, got {n_eval}, {n_calib}")
    if need > ids.numel():
        raise ValueError(f"{n_calib} + {n_eval} windows of {length} tokens need {need} tokens; "
                         f"the text has {ids.numel()}")
    wins = [ids[i * length:(i + 1) * length] for i in range(n_calib + n_eval)]
    return wins[:n_calib], wins[n_calib:]
