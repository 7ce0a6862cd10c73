"""The sampler's view of a MeDiMModel (`ModelDenoiser`): raw logits at the positions asked for,
context-cached steps (`cached`), and an opt-in compiled forward for the fixed shapes of a task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from medim.models.cache import ContextCache
from medim.utils.checks import check_bool, check_choice

__all__ = ["ModelDenoiser", "COMPILE_MODES"]

# torch.compile's modes; the two that capture CUDA graphs are marked, since their outputs live in
# buffers the next replay reuses.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class ModelDenoiser:
    """The denoiser protocol of `medim.diffusion.sample` (docs/architecture.md) on a MeDiMModel.

    `denoiser(x, sigma, positions, **condition)` returns raw float32 logits per segment (the sampler
    normalises them itself, so the model's log-softmax is a pass saved); `denoiser.cached(...)` is
    the optional capability the sampler's `cache_interval` uses; `compile()` opts in to
    torch.compile.

    Example:
        >>> denoiser = ModelDenoiser(pipe.model)
        >>> out = sample(denoiser, task.x, task.known, segments=pipe.layout.segments,
        ...              mask_id=pipe.layout.mask_id, num_inference_steps=32, cache_interval=4)
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._segments = {seg.name: seg for seg in model.layout.segments}
        self._compiled: Callable[..., dict[str, torch.Tensor]] | None = None
        self._cuda_graphs = False

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, positions: dict[str, torch.Tensor],
                 **condition: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._compiled is None:
            return self._logits(x, sigma, positions, condition)
        return self._compiled_call(x, sigma, positions, condition)

    def cached(self, x: torch.Tensor, sigma: torch.Tensor, positions: dict[str, torch.Tensor],
               cache: ContextCache | None, **condition: torch.Tensor) -> tuple[dict[str, torch.Tensor], ContextCache]:
        """A refresh (`cache=None`) or a cached step (`MeDiMModel.forward_cached`); always eager."""
        out, cache = self.model.forward_cached(x, sigma, positions, cache, return_logits=True, **condition)
        return out.logits, cache

    def compile(self, mode: str | None = None, backend: str | Callable[..., Any] = "inductor",
                fullgraph: bool = False) -> ModelDenoiser:
        """Compile the forward with static shapes (`torch.compile(dynamic=False)`). The shapes are
        those of a task: each generated segment is computed whole (the positions a chunk leaves
        unknown are read out of it afterwards) and the batch is the chunk size (the pipeline pads
        the last chunk), so a task compiles two graphs, unguided and guided, and then nothing
        recompiles across steps or chunks. `mode="reduce-overhead"` adds CUDA graphs on CUDA.
        Returns self.

        Example:
            >>> denoiser = ModelDenoiser(model).compile(mode="reduce-overhead")
        """
        check_choice(mode, "mode", COMPILE_MODES)
        if not (isinstance(backend, str) or callable(backend)):
            raise TypeError(f"backend must be a torch.compile backend name or callable, got {type(backend).__name__}")
        check_bool(fullgraph, "fullgraph")
        self._compiled = torch.compile(self._logits, dynamic=False, mode=mode, backend=backend, fullgraph=fullgraph)
        self._cuda_graphs = mode in _CUDA_GRAPH_MODES
        return self

    def _logits(self, x, sigma, positions, condition) -> dict[str, torch.Tensor]:
        return self.model(x, sigma, positions=positions, return_logits=True, **condition).logits

    def _compiled_call(self, x, sigma, positions, condition) -> dict[str, torch.Tensor]:
        segments = self._segments
        whole = {name: torch.arange(segments[name].start, segments[name].stop, device=x.device) for name in positions}
        graphs = self._cuda_graphs and x.is_cuda
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled(x, sigma, whole, condition)
        result = {}
        for name, pos in positions.items():
            logits = out[name]
            if pos.numel() != segments[name].length:
                logits = logits.index_select(1, pos.to(x.device) - segments[name].start)
            elif graphs:
                logits = logits.clone()  # the sampler writes into its inputs; the graph owns these
            result[name] = logits
        return result
