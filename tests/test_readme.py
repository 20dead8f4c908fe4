"""The README's Python examples run as written, and do what they say.

Each ```python block of README.md is executed here, in order and in one namespace (the later
blocks use the names of the earlier ones, as a reader pasting them into one session would).
Then what the text claims is checked on the names the blocks left behind: the tour skips a
good share of its tiles, the graph examples equal their oracle, the graph's BLASST call
skips tiles too, and the imported ONNX model embeds two paraphrases close together.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import numpy as np
import pytest

import blasst_ref as br

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

#: a substring that identifies each Python block, in the README's order
BLOCKS = {
    "tour": "br.workloads.llm_like(1, 8, 2, 2048, 2048, 64)",
    "gradients": "br.attention_backward(dout, q, k, v, out, saved)",
    "real model": "bt.configure(model, scale_factor=160.0)",
    "graph": "bg.models.bert_layer(batch=1, seq=128)",
    "graph attention": 'bg.Graph("causal_attention")',
    "int8": "bg.quantize_graph(g, [x])",
    "onnx": "bg.from_onnx(path",
}


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.fixture(scope="module")
def readme_run():
    """Runs every Python block of the README; returns ``{block: (namespace, stdout)}``, each
    namespace as it stood after that block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = python_blocks(README.read_text())
    assert len(blocks) == len(BLOCKS), f"README has {len(blocks)} python blocks; the test " \
        f"knows {list(BLOCKS)}"
    namespace: dict = {"__name__": "__readme__"}
    runs = {}
    for (name, marker), code in zip(BLOCKS.items(), blocks):
        assert marker in code, f"the README's {name} block no longer holds {marker!r}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md ({name} block)", "exec"), namespace)
        runs[name] = (dict(namespace), out.getvalue())
    plt.close("all")
    return runs


def test_python_blocks_are_found():
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb\n```\n") == \
        ["a = 1\n", "b\n"]


def test_tour_skips_and_stays_close_to_dense(readme_run):
    ns, printed = readme_run["tour"]
    stats, err = ns["stats"], ns["err"]
    assert stats.sparsity > 0.3            # "half the tiles skipped"
    assert 0 < err < 0.02                  # "~7e-03"
    assert stats.visited_tiles == 2176     # 8 heads x the causal tiles of 2048 x 2048
    assert f"{stats.sparsity} {stats.skipped_tiles} {stats.visited_tiles}" in printed


def test_gradients_block(readme_run):
    """The gradients example: the same decisions as the tour's call, gradients shaped like
    q, k, v (dk, dv per kv head)."""
    ns, printed = readme_run["gradients"]
    saved, stats = ns["saved"], readme_run["tour"][0]["stats"]
    assert saved.sparsity == stats.sparsity
    assert [g.shape for g in (ns["dq"], ns["dk"], ns["dv"])] == \
        [(1, 8, 2048, 64), (1, 2, 2048, 64), (1, 2, 2048, 64)]
    assert all(np.isfinite(g).all() for g in (ns["dq"], ns["dk"], ns["dv"]))
    assert f"{saved.sparsity} (1, 2, 2048, 64)" in printed


def test_tour_explains_why_gaussian_inputs_do_not_skip(readme_run):
    """The sentence under the tour: Gaussian q/k give nearly uniform attention, sparsity 0."""
    ns, _ = readme_run["tour"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(x.shape, dtype=np.float32)
               for x in (ns["q"], ns["k"], ns["v"]))
    _, st = br.attention(q, k, v, br.threshold_for(2048, 2.0), causal=True, return_stats=True)
    assert st.sparsity == 0.0


def test_graph_equals_its_oracle(readme_run):
    ns, printed = readme_run["graph"]
    y, ref = ns["out"]["y"], ns["ref"]["y"]
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5   # "equal to ref"
    assert "Attention" in ns["cg"].graph.count_ops()               # fused into one call
    assert "memory reduced from" in printed and "fuse_attention" in printed


def test_graph_attention_skips_tiles(readme_run):
    ns, printed = readme_run["graph attention"]
    ca, feeds, o = ns["ca"], ns["feeds"], ns["o"]
    (st,) = ca.attention_stats.values()
    assert st.skipped_tiles > 0 and st.sparsity > 0.3              # "skips half its tiles"
    assert f"({st.skipped_tiles}/{st.visited_tiles} tiles skipped" in printed
    assert ca.graph.count_ops().get("Attention") == 1
    dense = br.dense_attention(feeds["q"], feeds["k"], feeds["v"], causal=True)
    assert np.linalg.norm(o - dense) / np.linalg.norm(dense) < 0.02


def test_int8_block_runs_int8_kernels(readme_run):
    ns, printed = readme_run["int8"]
    assert ns["cq"].graph.count_ops().get("QMatMul", 0) > 0
    assert "QMatMul" in printed


def test_onnx_block_embeds_like_its_oracle(readme_run):
    """The imported MiniLM: the compiled graph equals the op-by-op interpretation of the same
    imported graph, and the two paraphrases come out similar ("sentence similarity")."""
    ns, printed = readme_run["onnx"]
    gm, feeds, emb = ns["gm"], ns["feeds"], ns["emb"]
    bert_onnx = ns["bert_onnx"]
    ref = bert_onnx.mean_pooling(ns["bg"].interpret(gm, **feeds)["last_hidden_state"],
                                 feeds["attention_mask"])
    assert emb.shape == (2, 384)
    assert np.linalg.norm(emb - ref) / np.linalg.norm(ref) < 1e-4
    cos = emb[0] @ emb[1] / (np.linalg.norm(emb[0]) * np.linalg.norm(emb[1]))
    assert cos > 0.5, f"paraphrases should embed close together (cosine {cos:.2f})"
    assert printed.strip()
