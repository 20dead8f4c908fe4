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


def test_bos_is_prepended_and_its_prediction_dropped():
    cfg = train.TinyLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64,
                             max_len=64, bos=0)
    model = train.TinyLM(cfg, seed=3)
    lengths = []

    def attn(q, k, v, layer):
        lengths.append(q.shape[2])
        return train.sdpa_attention(q, k, v, layer)

    x = torch.randint(1, 256, (2, 63), generator=torch.Generator().manual_seed(0))
    logits = model(x, attn=attn)
    assert logits.shape == (2, 63, 256) and lengths == [64, 64]
    # the same as running the bos-less model on [bos, x] and dropping the first row
    plain = train.TinyLM(train.TinyLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            mlp_hidden=64, max_len=64), seed=3)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(torch.cat([torch.zeros(2, 1, dtype=torch.int64), x], 1))[:, 1:],
                               logits)
    with pytest.raises(ValueError, match="max_len=64 - 1"):
        model(torch.zeros((1, 64), dtype=torch.int64))
    with pytest.raises(ValueError, match="bos=256"):
        train.TinyLMConfig(bos=256)


def test_perplexity_at_interpolates_between_measured_points():
    pts = [train.FrontierPoint(t, s, 0.0, p, ()) for t, s, p in
           [(0.0, 0.0, 2.0), (0.1, 0.4, 2.2), (0.3, 0.8, 3.0)]]
    assert train.perplexity_at(pts, 0.6) == pytest.approx(2.6)
    assert train.perplexity_at(pts, 0.0) == pytest.approx(2.0)
    assert np.isnan(train.perplexity_at(pts, 0.9))


def test_blasst_attention_trains_and_counts_tiles(corpus):
    """One model trained a few steps with BLASST in the loop: the gradient flows (weights
    move, loss finite), and at thresh 0 the BLASST model's evaluation equals SDPA's."""
    model = train.TinyLM(TINY, seed=4)
    counter = train.TileCounter()
    attn = train.blasst_attention(0.3, block_q=16, block_k=16, counter=counter)
    before = model.blocks[0].wq.weight.detach().clone()
    hist = train.train(model, corpus.train, steps=3, batch=2, length=64, attn=attn,
                       progress=False)
    assert np.all(np.isfinite(hist.loss))
    assert not torch.equal(before, model.blocks[0].wq.weight)
    assert len(counter.per_layer()) == 2 and sum(counter.visited.values()) > 0
    dense = train.evaluate(model, corpus.val, length=64, windows=4)
    (pt,) = train.frontier(model, corpus.val, (0.0,), length=64, windows=4, block_q=16,
                           block_k=16)
    assert pt.sparsity == 0.0 and pt.loss == pytest.approx(dense.loss, rel=1e-5)
    mass, per_layer = train.kept_mass(model, corpus.val, 0.0, length=64, windows=2,
                                      block_q=16, block_k=16)
    assert mass == pytest.approx((1.0, 1.0)) and per_layer == (0.0, 0.0)


def test_cli_runs_the_experiment(capsys):
    """``python -m blasst_ref.train`` at toy sizes: three frontiers on one sweep, JSON out."""
    import json

    from blasst_ref.train.__main__ import main

    assert main(["--d-model", "32", "--layers", "2", "--length", "64", "--block-q", "16",
                 "--block-k", "16",
                 "--pretrain-steps", "10", "--steps", "3", "--batch", "2",
                 "--eval-windows", "2", "--thresholds", "0,0.5,0.9",
                 "--corpus-bytes", "200000", "--quiet", "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["frontiers"]) == {"base", "dense", "blasst"}
    for pts in res["frontiers"].values():
        assert [p["thresh"] for p in pts] == [0.0, 0.5, 0.9] and pts[0]["sparsity"] == 0.0
        assert all(np.isfinite(p["perplexity"]) and len(p["per_layer"]) == 2 for p in pts)
    assert len(res["train_loss"]["dense"]) == len(res["train_loss"]["blasst"]) == 3
    assert set(res["seconds"]) == {"pretrain", "dense", "blasst", "evaluate", "total"}
    assert set(res["gains"]) == {"0.5", "0.7"} and res["settings"]["length"] == 64
    assert 0 < res["train_thresh"] < 1
