"""The training machinery (blasst_ref.train): a tiny byte-level LM, its data, its loop.

Tiny sizes: these tests check behaviour (causality, the attention hook, learning), not
quality. They need PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="blasst_ref.train needs PyTorch")

from blasst_ref import train  # noqa: E402

TINY = train.TinyLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64,
                          max_len=64)


@pytest.fixture(scope="module")
def corpus():
    return train.stdlib_corpus(max_bytes=200_000)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="d_model=30 must be a multiple of n_heads=4"):
        train.TinyLMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        train.TinyLMConfig(n_heads=4, n_kv_heads=3)


def test_corpus_is_python_source_split_by_files(corpus):
    assert len(corpus.train) > 100_000 and len(corpus.val) > 1000
    assert corpus.train.dtype == np.uint8
    text = bytes(corpus.train[:20_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    again = train.stdlib_corpus(max_bytes=200_000)
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)


def test_random_windows_are_shifted_by_one(corpus):
    x, y = train.random_windows(corpus.train, 4, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 32) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_model_is_causal_and_calls_the_attention_once_per_layer():
    model = train.TinyLM(TINY, seed=1)
    calls = []

    def attn(q, k, v, layer):
        calls.append((layer, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return train.sdpa_attention(q, k, v, layer)

    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = model(x, attn=attn)
    assert logits.shape == (2, 40, 256)
    assert calls == [(i, (2, 4, 40, 8), (2, 2, 40, 8), (2, 2, 40, 8)) for i in range(2)]
    x2 = x.clone()
    x2[:, 30:] = (x2[:, 30:] + 1) % 256  # change the future: the past must not move
    torch.testing.assert_close(model(x2)[:, :30], logits[:, :30])
    assert not torch.allclose(model(x2)[:, 30:], logits[:, 30:])
    with pytest.raises(ValueError, match="at most max_len=64"):
        model(torch.zeros((1, 65), dtype=torch.int64))


def test_training_lowers_the_validation_loss(corpus):
    torch.manual_seed(0)
    model = train.TinyLM(TINY, seed=2)
    before = train.evaluate(model, corpus.val, length=64, windows=16)
    hist = train.train(model, corpus.train, steps=60, batch=8, length=64, lr=1e-2, warmup=5,
                       progress=False)
    after = train.evaluate(model, corpus.val, length=64, windows=16)
    assert len(hist.loss) == 60 and hist.seconds > 0
    assert before.loss > 5.0  # ~log(256) = 5.5 at initialisation
    assert after.loss < before.loss - 1.5, (before, after)
    assert after.perplexity == pytest.approx(np.exp(after.loss))
    # evaluation is deterministic: the same windows every call
    assert train.evaluate(model, corpus.val, length=64, windows=16) == after
