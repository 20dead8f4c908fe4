"""``blasst_ref.graph``: a small fused-graph executor after oneDNN Graph Compiler
(docs/DESIGN.md §7).

::

    from blasst_ref import graph as bg
    g = bg.Graph("mlp")
    x = g.input("x", (32, 13), "float32")
    h = g.relu(g.add(g.matmul(x, g.constant("w1", W1)), g.constant("b1", b1)))
    g.output("y", h)
    ref = bg.interpret(g, x=X)                     # the op-by-op numpy oracle
    cg = bg.compile(g, attention_thresh=0.0)       # passes, memory plan, kernels
    out = cg(x=X)                                  # {"y": array}
    print(cg.report())                             # fused ops, arena vs naive, per-op time
    cg.plot_memory()                               # the arena over the execution order

Modules, one job each:

* :mod:`.ir` -- the graph: tensors, nodes, the builder, shape inference;
* :mod:`.ops` -- every op described once, in its ``OpDef``: shape rule, numpy meaning
  (fused ops included), compiled kernel and ONNX form;
* :mod:`.interpreter` -- the oracle: op by op, in numpy;
* :mod:`.passes` -- constant folding, attention fusion (-> :func:`blasst_ref.attention`),
  MatMul post-op fusion, int8 lowering, layout merging, weight packing; each
  ``Graph -> Graph``, in the order of ``passes.PIPELINE``, each switchable;
* :mod:`.memory` -- liveness, best-fit arena placement, in-place reuse;
* :mod:`.kernels` -- the Numba CPU kernels of the fused ops;
* :mod:`.steps` -- how the compiled graph runs each op (the ``OpDef``'s kernel);
* :mod:`.compiler` -- ``compile``: passes + plan + steps -> a callable;
* :mod:`.models` -- reference graphs: DLRM MLPs, a BERT layer, an LLM block;
* :mod:`.onnx_export` -- export to ONNX and run ONNX Runtime (optional extra ``onnx``);
  :mod:`.onnx_forms` -- each op's ONNX form (the ``OpDef``'s ``onnx``);
* :mod:`.onnx_import` -- ``from_onnx``: real models (BERT/MiniLM exports) into the IR;
* :mod:`.tensor_ops` -- the ops imported models add (Gather, Cast, Where, Expand, ...);
* :mod:`.quantize` -- post-training static quantization (``quantize_graph``);
* :mod:`.int8_kernels` -- u8 x s8 -> s32 kernels on VNNI (``int8_backend()``).
"""

from . import models
from .compiler import CompiledGraph, compile
from .interpreter import check_feeds, interpret
from .ir import Graph, GraphError, Node, Tensor, TensorInfo
from .memory import MemoryPlan, plan_memory
from . import ops_dynamic as _ops_dynamic  # noqa: F401  (registers the dynamic int8 ops)
from .onnx_import import OnnxImportError, from_onnx
from .int8_kernels import int8_backend
from .ops import OPS
from .quantize import quantize_graph

__all__ = ["OPS", "CompiledGraph", "Graph", "GraphError", "MemoryPlan", "Node",
           "OnnxImportError", "Tensor", "TensorInfo", "check_feeds", "compile", "from_onnx",
           "int8_backend", "interpret", "models",
           "plan_memory", "quantize_graph"]
