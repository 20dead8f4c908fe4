"""BLASST inside Hugging Face transformers models (docs/DESIGN.md §10).

A tiny randomly initialised Llama-architecture model built from a config (GQA 4/2, RoPE; no
download), made peaked enough (scaled query and key weights) that BLASST skips tiles at moderate
thresholds, as real heads do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
transformers = pytest.importorskip("transformers", reason="the torch extra is not installed")

import blasst_ref  # noqa: E402
import blasst_ref.torch as bt  # noqa: E402
from blasst_ref import evaluate as ev  # noqa: E402

N_LAYERS, HQ, HKV, D = 3, 4, 2, 16
BLOCKS = dict(block_q=16, block_k=16, backend="cpu")


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=HQ * D, intermediate_size=96,
                      num_hidden_layers=N_LAYERS, num_attention_heads=HQ,
                      num_key_value_heads=HKV, head_dim=D, max_position_embeddings=2048,
                      rope_theta=10000.0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked heads: random init alone gives near-uniform attention
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 192), generator=torch.Generator().manual_seed(1))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_register_round_trips(model, tmp_path):
    from transformers import AttentionInterface, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    assert bt.register() == "blasst"
    assert AttentionInterface()["blasst"] is bt.hf_attention
    assert "blasst" in AttentionMaskInterface()
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="blasst").eval()
    assert loaded.config._attn_implementation == "blasst"
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    sdpa = _logits(model, ids)
    with bt.collect_stats() as st:  # registered, never configured: exact dense (thresh = 0)
        out = _logits(loaded, ids)
    assert _rel(out, sdpa) < 1e-5
    assert [c.layer for c in st.calls] == list(range(N_LAYERS))
    loaded.set_attn_implementation("sdpa")
    assert loaded.config._attn_implementation == "sdpa"


def test_thresh0_logits_equal_sdpa(model, ids):
    sdpa = _logits(model, ids)
    th = bt.configure(model, 0.0, **BLOCKS)
    try:
        assert model.config._attn_implementation == "blasst"
        assert th.threshold(0, 192, "prefill") == 0.0
        with bt.collect_stats() as st:
            out = _logits(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    assert _rel(out, sdpa) < 1e-5
    assert st.sparsity() == 0.0 and len(st.calls) == N_LAYERS


def test_thresh_positive_outputs_equal_blasst_on_captured_qkv(model, ids):
    from transformers import AttentionInterface

    records = []

    def spy(module, query, key, value, attention_mask, **kw):
        out, w = bt.hf_attention(module, query, key, value, attention_mask, **kw)
        records.append((module.layer_idx, query.clone(), key.clone(), value.clone(),
                        kw.get("scaling"), out.clone()))
        return out, w

    AttentionInterface.register("blasst_spy", spy)
    sfs = [16.0, 32.0, 64.0]  # one per layer
    bt.configure(model, sfs, **BLOCKS)
    model.set_attn_implementation("blasst_spy")
    try:
        with bt.collect_stats() as st:
            blasst_logits = _logits(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    assert [r[0] for r in records] == list(range(N_LAYERS))
    assert st.sparsity() > 0.02, st.format_table()
    for (layer, q, k, v, scale, out), call in zip(records, st.calls):
        thresh = sfs[layer] / k.shape[-2]
        assert call.thresh == pytest.approx(thresh)
        ref, ref_st = blasst_ref.attention(q.numpy(), k.numpy(), v.numpy(), thresh, causal=True,
                                           scale=scale, return_stats=True, **BLOCKS)
        np.testing.assert_array_equal(out.transpose(1, 2).numpy(), ref)  # (B, L, H, D) back
        assert call.skipped == ref_st.skipped_tiles and call.visited == ref_st.visited_tiles
    # the per-head view pools the same counts
    assert st.per_head().shape == (N_LAYERS, HQ)
    assert np.allclose(st.per_layer(), [c.skipped / c.visited for c in st.calls])
    assert _rel(blasst_logits, _logits(model, ids)) > 1e-6  # skipping did something


def test_decode_with_kv_cache_equals_full_forward(model, ids):
    from transformers import DynamicCache

    full = _logits(model, ids)
    bt.configure(model, 0.0, **BLOCKS)
    try:
        cache = DynamicCache(config=model.config)
        with bt.collect_stats() as st, torch.no_grad():
            steps = [model(ids[:, :180], cache=cache, use_cache=True).logits]
            for i in range(180, ids.shape[1]):
                steps.append(model(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    finally:
        model.set_attn_implementation("sdpa")
    assert _rel(torch.cat(steps, 1), full) < 1e-5
    assert {c.phase for c in st.calls} == {"prefill", "decode"}
    assert sum(c.phase == "decode" for c in st.calls) == N_LAYERS * 12


def test_decode_with_threshold_runs_split_kv(model):
    from transformers import DynamicCache

    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(3))
    bt.configure(model, 0.0, decode_scale_factor=30.0, block_q=32, block_k=32, decode_block_k=16,
                 backend="cpu")
    try:
        cache = DynamicCache(config=model.config)
        with bt.collect_stats() as st, torch.no_grad():
            model(ids[:, :599], cache=cache, use_cache=True)
            model(ids[:, 599:], cache=cache, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert st.sparsity("prefill") == 0.0
    assert st.sparsity("decode") > 0.0, st.format_table("decode")
    decode = [c for c in st.calls if c.phase == "decode"]
    assert len(decode) == N_LAYERS and decode[0].thresh == pytest.approx(30.0 / 600)
    assert all(c.visited == HKV * -(-600 // 16) for c in decode)  # decode tiles of 16 keys
    prefill = [c for c in st.calls if c.phase == "prefill"]
    assert all(c.head_visited.sum() == c.visited for c in prefill)


def test_padding_mask_raises_or_falls_back(model):
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # left padding in the second row
    sdpa = _logits(model, ids, attention_mask=mask)
    bt.configure(model, 4.0, **BLOCKS)
    try:
        with pytest.raises(ValueError, match="on_unsupported_mask='sdpa'"):
            _logits(model, ids, attention_mask=mask)
        # an all-ones mask is a plain causal batch: accepted
        with bt.collect_stats() as st:
            _logits(model, ids, attention_mask=torch.ones_like(ids))
        assert st.fallbacks == 0
        bt.configure(model, 4.0, on_unsupported_mask="sdpa", **BLOCKS)
        with bt.collect_stats() as st:
            out = _logits(model, ids, attention_mask=mask)
    finally:
        model.set_attn_implementation("sdpa")
    assert st.fallbacks == N_LAYERS
    assert _rel(out, sdpa) < 1e-5


def test_configure_validates(model):
    with pytest.raises(ValueError, match="3 layers"):
        bt.configure(model, [1.0, 2.0])
    with pytest.raises(ValueError, match="scale_factor"):
        bt.configure(model, -1.0)
    with pytest.raises(ValueError, match="target_sparsity"):
        bt.configure(model, calibration=object())
    model.set_attn_implementation("sdpa")


def test_calibration_gives_the_scale_factor(model):
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    cal = blasst_ref.Calibration(alpha=2.0, beta=3.0, phase="prefill", causal=True, block_q=16,
                                 block_k=16, backend="cpu", table=())
    th = bt.configure(model, calibration=cal, target_sparsity=0.5)
    model.set_attn_implementation("sdpa")
    assert th.prefill == (pytest.approx(2.0 * np.exp(1.5)),) * N_LAYERS
    assert th.block_q == 16 and th.decode == th.prefill
    del q, k, v


def test_perplexity_sweep_and_calibrate_model(model):
    g = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, 256, (160,), generator=g) for _ in range(3)]
    dense = ev.perplexity(model, windows[:1], progress=False)
    again = ev.perplexity(model, windows[:1], 0.0, progress=False, **BLOCKS)
    assert dense.perplexity == pytest.approx(again.perplexity, rel=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored
    sw = ev.sweep(model, windows[:1], [8.0, 64.0], progress=False, **BLOCKS)
    sp = [r.sparsity for r in sw.runs]
    assert 0 < sp[0] <= sp[1]
    assert "scale factor 64" in sw.format_table()
    budget = 0.02
    cal = ev.calibrate_model(model, windows[:2], budget, heldout=windows[2:], steps=4,
                             grid=[0, 1, 4, 16, 64], progress=False, **BLOCKS)
    assert len(cal.scale_factors) == N_LAYERS and cal.delta <= budget
    assert cal.layer_sparsity.shape == (N_LAYERS, 5)
    assert np.all(np.diff(cal.layer_sparsity, axis=1) >= -1e-12)  # more skipping as g grows
    assert cal.heldout is not None and cal.heldout[2] >= 0
    check = ev.perplexity(model, windows[:2], cal.scale_factors, progress=False, **BLOCKS)
    assert check.perplexity / cal.dense_perplexity - 1 == pytest.approx(cal.delta, abs=1e-9)


def _byte_tokenizer(path):
    """A byte-level tokenizer of 256 tokens, saved with the model (the CLI reads both)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(path)


def test_cli_on_a_local_model(model, tmp_path, capsys):
    from blasst_ref.evaluate.__main__ import main

    model.save_pretrained(tmp_path / "m")
    _byte_tokenizer(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(ev.default_text()[:20000])
    out_json, png = tmp_path / "r.json", tmp_path / "p.png"
    assert main(["--model", str(tmp_path / "m"), "--text", str(text), "--length", "128",
                 "--windows", "1", "--scale-factors", "4", "16", "--calibrate", "0.05",
                 "--block-q", "16", "--block-k", "16", "--json", str(out_json),
                 "--plot", str(png), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "sparsity per layer" in shown and "per-layer (5.0%)" in shown
    doc = json.loads(out_json.read_text())
    assert doc["length"] == 128 and len(doc["runs"]) == 3
    assert len(doc["calibration"]["scale_factors"]) == N_LAYERS
    assert png.stat().st_size > 1000
    # --compare re-reads the JSON (a round trip of Sweep) and plots without running anything
    again = ev.Sweep.from_dict(doc)
    assert again.delta(again.runs[0]) == pytest.approx(doc["runs"][0]["delta_ppl"])
    both = tmp_path / "both.png"
    assert main(["--compare", str(out_json), str(out_json), "--labels", "a", "b",
                 "--plot", str(both)]) == 0
    assert both.stat().st_size > 1000


def test_default_text_and_windows():
    text = ev.default_text()
    assert len(text) > 100_000 and text == ev.default_text()  # fixed order
    ids = torch.arange(1000)
    calib, test = ev.split_windows(ids, 100, n_eval=3, n_calib=2)
    assert [int(w[0]) for w in calib + test] == [0, 100, 200, 300, 400]
    with pytest.raises(ValueError, match="need 1100 tokens"):
        ev.split_windows(ids, 100, n_eval=10, n_calib=1)
