"""Benchmark harness behind ``python -m blasst_ref.bench <subcommand>`` (docs/DESIGN.md §4).

Subcommands, one module each, listed in :data:`SUBCOMMANDS`:

* ``attention`` (:mod:`.attention`): BLASST attention, dense and sparse, against PyTorch SDPA;
  ``--preset cpu`` reproduces the CPU tables of docs/BENCHMARKS.md.
* ``graph`` (:mod:`.graph`): compiled model graphs against the op-by-op interpreter and
  ONNX Runtime; ``--preset dlrm-bert`` reproduces its tables in docs/BENCHMARKS.md.
* ``int8`` (:mod:`.int8`): the u8 x s8 ``QMatMul`` kernel and int8 MLP graphs against
  float32, with the fraction of the VNNI peak; ``--preset matmul-dlrm``.
* ``backward`` (:mod:`.backward`): the BLASST backward, dense and sparse, against PyTorch's
  SDPA backward (CPU, or a GPU with ``--device cuda``).
* ``gemm`` (:mod:`.gemm`): the float32 GEMM kernels of the graph executor against sgemm.
* ``minilm`` (:mod:`.minilm`): all-MiniLM-L6-v2 from ONNX: int8 (static, dynamic) and
  BLASST accuracy and speed against float32 and ONNX Runtime.
* ``cuda_versions`` (:mod:`.cuda_versions`): registers and spills of every CUDA kernel
  version (``ptxas``, no GPU needed), and two source trees timed side by side on a GPU.

To add one (e.g. ``graph``, ``int8``): write ``blasst_ref/bench/<name>.py`` with
``register(subparsers)`` — it adds its parser and ``set_defaults(func=run, parser=p)`` — and
``run(args) -> int``, then add ``"<name>"`` to :data:`SUBCOMMANDS`. Shared pieces:
:mod:`.machine` (the machine line every table starts with), :mod:`.timing` (warm-up, then
interleaved repeats, median), :mod:`.oracle` (a memory-bounded float64 dense result),
:mod:`.flops` (FLOP and byte counts), :mod:`.backends` (which backends run here),
:mod:`.torch_peers` (PyTorch SDPA as a peer).
"""

#: Subcommand modules of ``python -m blasst_ref.bench``, in help order. Imported lazily.
SUBCOMMANDS = ("attention", "backward", "gemm", "graph", "int8", "minilm", "cuda_versions")
