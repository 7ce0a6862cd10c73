"""`MeDiMPipeline` and what its task methods run: plain functions over the pipeline's typed parts.

- `pipeline.py`: the class (parts, devices, compile, from_* / save / push, thin task methods);
- `common.py`: the outputs, input checks, the sampler settings of a call, chunked sampling, the
  VQGAN in and out;
- `generation.py`, `editing.py` (with `templates.py`), `scoring.py`: the tasks;
- `loading.py`: the parts from every source; `model_card.py`: the README written beside them.
"""

from medim.pipelines.pipeline import MeDiMOutput, MeDiMPipeline

__all__ = ["MeDiMPipeline", "MeDiMOutput"]
