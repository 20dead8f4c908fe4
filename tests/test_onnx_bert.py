"""A real framework export through ``from_onnx``: a tiny randomly initialised
``transformers.BertModel`` (no download), exported with ``torch.onnx.export`` as a user would
(:mod:`blasst_ref.graph.bert_onnx`), imported, interpreted and compiled; its outputs equal
ONNX Runtime's on the same file and the torch model's, within 1e-5 relative (float32), with
and without padding in the attention mask, for both attention implementations that
transformers exports (SDPA and eager).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="optional extra: pip install 'blasst_ref[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install 'blasst_ref[onnx]'")
torch = pytest.importorskip("torch", reason="needs torch (the dev extra installs it)")
pytest.importorskip("transformers", reason="needs transformers (the dev extra installs it)")

from blasst_ref import graph as bg  # noqa: E402
from blasst_ref.graph import bert_onnx  # noqa: E402

B, L, VOCAB = 3, 24, 100


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def exported(request, tmp_path_factory):
    model = bert_onnx.tiny_bert(seed=1, vocab=VOCAB, attn_implementation=request.param)
    path = bert_onnx.export(model, tmp_path_factory.mktemp("bert") / "tiny.onnx")
    return model, path


def feeds_with_padding(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), np.int64)
    mask[1, L - 7:] = 0           # a padded sentence
    mask[2, 5:] = 0               # a short one
    return {"input_ids": rng.integers(0, VOCAB, (B, L)).astype(np.int64),
            "attention_mask": mask,
            "token_type_ids": rng.integers(0, 2, (B, L)).astype(np.int64)}


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_bert_equals_onnxruntime_and_torch(exported, seed):
    model, path = exported
    feeds = feeds_with_padding(seed)
    g = bg.from_onnx(path, input_shapes=bert_onnx.input_shapes(B, L))
    assert not {"Shape", "Range", "ConstantOfShape"} & set(g.count_ops())  # folded
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want_ort = dict(zip(bert_onnx.OUTPUT_NAMES, sess.run(None, feeds)))
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    want_torch = {"last_hidden_state": out.last_hidden_state.numpy(),
                  "pooler_output": out.pooler_output.numpy()}
    cg = bg.compile(g)
    for how, got in (("interpret", bg.interpret(g, **feeds)), ("compiled", cg(**feeds))):
        for name in bert_onnx.OUTPUT_NAMES:
            assert got[name].dtype == np.float32
            assert rel_err(got[name], want_ort[name]) <= 1e-5, (how, name, "ort")
            assert rel_err(got[name], want_torch[name]) <= 1e-5, (how, name, "torch")


def test_one_file_imports_at_several_sizes(exported):
    """The export's batch and sequence axes are dynamic: the same file imports at any
    size given in input_shapes, and each import runs at its own size."""
    _, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for b, s in ((1, 8), (2, 17)):
        feeds = {"input_ids": rng.integers(0, VOCAB, (b, s)).astype(np.int64),
                 "attention_mask": np.ones((b, s), np.int64),
                 "token_type_ids": np.zeros((b, s), np.int64)}
        g = bg.from_onnx(path, input_shapes=bert_onnx.input_shapes(b, s))
        got = bg.compile(g)(**feeds)
        want = sess.run(None, feeds)
        assert rel_err(got["last_hidden_state"], want[0]) <= 1e-5


def test_mean_pooling_ignores_padding():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    emb = bert_onnx.mean_pooling(h, mask)
    want = h[0, :3].mean(0)
    np.testing.assert_allclose(emb[0], want / np.linalg.norm(want), rtol=1e-6)
    h[0, 3:] = 1e6  # padded positions never count
    np.testing.assert_allclose(bert_onnx.mean_pooling(h, mask)[0], emb[0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
