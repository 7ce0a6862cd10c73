"""`medim app`: a web app (Gradio) on a `MeDiMPipeline`: text to image, image to report, image-report
pairs, and inpainting when the pipeline has it. `pip install 'medim-diffusion[app]'` brings Gradio.

- `tasks`: what the buttons run, as plain functions of the widgets' values (no Gradio);
- `ui`: the page (`build_app`), its queue and its messages;
- `browser`: a served app and a headless Chromium driving it (the browser test, the screenshots);
- `screenshots`: `python -m medim.app.screenshots docs/` takes the screenshots of docs/app.md.

Example:
    >>> from medim import MeDiMPipeline
    >>> from medim.app import build_app, launch_options
    >>> build_app(MeDiMPipeline.from_pretrained("medim-demo")).launch(**launch_options())
"""

from __future__ import annotations

from medim.app.ui import build_app, launch_options, require_gradio

__all__ = ["build_app", "launch_options", "require_gradio"]
