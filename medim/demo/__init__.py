"""The embedded demo: a tiny MeDiM trained on synthetic phantom pairs, shipped inside the package.

Real MeDiM weights are gigabytes and under other licences, so medim ships a model of its own,
trained only on phantoms (`medim.data.synthetic`) whose truth is known. That makes the demo an
honest end-to-end measure too: the phantom readers check whether a generated image shows what
its report says. It is an application of the library and sits above it: nothing else in medim
but the command line imports it. One module per job:

- `settings`: the fixed facts and the build recipe `BuildSettings` (torch-free);
- `build`: `build_demo(out)` retrains it from scratch with medim's own code paths (tokenizer,
  tiny Llama backbone, token cache, `medim.training`);
- `vqgan`: its VQGAN training on lesion-rich phantoms (`train_vqgan`);
- `evaluate`: `evaluate_demo(pipe)` scores the three tasks on held-out phantoms with the readers;
- `run`: `run_demo(out)`, what `medim demo` does: a few results of each task written to a folder.

Example:
    >>> from medim import MeDiMPipeline
    >>> pipe = MeDiMPipeline.from_pretrained("medim-demo")   # no network: it ships with medim
    >>> pipe.text_to_image(["A large dense nodule in the right upper zone."]).images[0]
"""

from __future__ import annotations

import importlib

# Public names, imported lazily so `medim.demo.settings` loads without torch: name -> module.
_EXPORTS: dict[str, str] = {
    "DEMO_NAME": "settings",
    "IMAGE_SIZE": "settings",
    "TEXT_LEN": "settings",
    "DEMO_SAMPLER": "settings",
    "EVAL_SEED": "settings",
    "PAIR_PROMPTS": "settings",
    "DEMO_PROMPTS": "settings",
    "BuildSettings": "settings",
    "demo_path": "settings",
    "build_demo": "build",
    "train_tokenizer": "build",
    "train_vqgan": "vqgan",
    "DemoScores": "evaluate",
    "evaluate_demo": "evaluate",
    "scores_table": "evaluate",
    "run_demo": "run",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medim.demo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
