"""The Gradio page: one tab per task (and inpainting when the pipeline has it), the sampler controls,
a progress bar fed by the pipeline's step callback, one queue for the device, and bad inputs shown
as messages: those the tasks refuse, and those Gradio cannot even read (an upload that is not an
image, text where a number goes), which `_guard` words instead of Gradio's generic error.
"""

from __future__ import annotations

import html
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medim.app import tasks
from medim.diffusion.config import MAX_STEPS, STRATEGIES
from medim.utils.errors import REPORT_BUGS

__all__ = ["require_gradio", "build_app", "launch_options", "QUEUE"]

# Every event that runs the model joins this queue with a limit of one: concurrent users wait their
# turn instead of running two generations on one device at once.
QUEUE = "medim-device"
EVENT = dict(concurrency_limit=1, concurrency_id=QUEUE)
# Small images (64 px for the demo model) fill their frame, scaled without blur.
CSS = (".medim-out img { image-rendering: pixelated; }\n"
       "#i2r-image img, #inpaint-image img { width: 100%; height: 100%; object-fit: contain; }")


def require_gradio():
    """Import gradio, or say how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app runs offline
    try:
        import gradio
    except ImportError as e:
        raise ImportError("the medim app needs gradio: pip install 'medim-diffusion[app]'") from e
    return gradio


def _theme(gr):
    # System fonts: the default theme would fetch web fonts, and the app must work offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch_options() -> dict[str, Any]:
    """What `Blocks.launch` takes besides the address (Gradio 6 reads theme and CSS there)."""
    gr = require_gradio()
    # show_error: what Gradio itself refuses before our checks run (a value of the wrong JSON type
    # through the API) is shown as its message rather than "has not enabled verbose error reporting".
    return dict(theme=_theme(gr), css=CSS, footer_links=[], show_error=True)


def _error(gr, message: str):
    return gr.Error(html.escape(message, quote=False), title="Cannot run this", print_exception=False)


def _files(payload: Any) -> list[Any]:
    """The uploaded files (Gradio `FileData`) of an image's or an image editor's payload."""
    parts = [payload] if hasattr(payload, "path") else [getattr(payload, "background", None),
                                                          *(getattr(payload, "layers", None) or [])]
    return [f for f in parts if getattr(f, "path", None)]


def _guard(gr, component: Any, kind: str) -> Any:
    """`component` whose reading of a value (Gradio's `preprocess`) says what is wrong when it fails:
    `kind` "number" names the value; "image" names the upload that is not an image (and reads a
    file Gradio cannot but medim can, such as a DICOM, itself)."""
    read = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return read(payload)
        except gr.Error:
            raise
        except Exception as e:
            if kind == "number":
                raise _error(gr, f"{component.label} must be a number, got {payload!r}") from None
            for upload in _files(payload):
                name = getattr(upload, "orig_name", None) or Path(upload.path).name
                try:
                    image = tasks.read_upload(upload.path, name)
                except ValueError as unreadable:
                    raise _error(gr, f"{component.label}: {unreadable}") from None
                if upload is payload and component.type == "pil":
                    return image  # one image Gradio cannot decode but medim can
            raise _error(gr, f"{component.label}: the upload cannot be read ({type(e).__name__}: {e})") from None

    component.preprocess = preprocess
    return component


def _runner(gr, pipe: Any, task: Callable[..., Any], shown: Callable[[Any], Any] = lambda result: result):
    """`task(pipe, *inputs, sampling, progress)` as an event handler whose outputs are
    `shown(result)`: the sampler controls come last (in `_sampler_controls`' order), the bar hears
    each step, warnings become toasts and bad inputs become error messages."""

    def run(*values: Any, progress=gr.Progress()):  # noqa: B008 (gradio injects the bar by this default)
        *inputs, num_inference_steps, guidance_scale, strategy, seed = values
        sampling = tasks.Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  strategy=strategy, seed=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = task(pipe, *inputs, sampling, lambda done, total: progress((done, total), unit="steps"))
            except (ValueError, TypeError, OSError) as e:
                raise _error(gr, str(e)) from None
            except Exception as e:  # a bug: said so, with its traceback in the server's log
                raise gr.Error(html.escape(f"unexpected {type(e).__name__}: {e}. This is a bug in medim: please "
                                           f"report it at {REPORT_BUGS}"), title="Something went wrong") from e
        for w in caught:
            if issubclass(w.category, UserWarning):
                gr.Warning(html.escape(str(w.message)))
        return shown(result)

    return run


def _pairs_out(pairs: list[tuple[Any, str]]) -> tuple[list[tuple[Any, str]], str]:
    return pairs, "\n".join(f"{i + 1}. {report}" for i, (_, report) in enumerate(pairs))


def _sampler_controls(gr, defaults: Any) -> list[Any]:
    """The controls every task shares (steps, guidance scale, strategy, seed), starting at the
    model's `SamplerConfig` (`defaults`)."""
    steps = defaults.num_inference_steps
    with gr.Accordion("Sampler", open=True), gr.Row():
        return [
            _guard(gr, gr.Slider(1, min(MAX_STEPS, max(256, steps)), value=steps, step=1, label="Steps",
                                 elem_id="steps"), "number"),
            _guard(gr, gr.Number(value=defaults.guidance_scale, label="Guidance scale (0 = off)", elem_id="guidance"),
                   "number"),
            gr.Dropdown(list(STRATEGIES), value=defaults.strategy, label="Strategy", elem_id="strategy"),
            _guard(gr, gr.Number(value=0, precision=0, label="Seed", elem_id="seed"), "number"),
        ]


def _text_to_image_tab(gr, pipe: Any, controls: list[Any]) -> None:
    with gr.Tab("Text to image", id="t2i"):
        with gr.Row():
            with gr.Column():
                report = gr.Textbox(label="Report", lines=4, elem_id="t2i-report",
                                    placeholder="A large dense nodule in the right upper zone.")
                count = _guard(gr, gr.Slider(1, tasks.MAX_COUNT, value=2, step=1, label="Images", elem_id="t2i-count"),
                               "number")
                go = gr.Button("Generate", variant="primary", elem_id="t2i-run")
            images = gr.Gallery(label="Images", format="png", columns=4, elem_id="t2i-images",
                                elem_classes="medim-out", object_fit="contain", height=320)
        go.click(_runner(gr, pipe, tasks.text_to_image), [report, count, *controls], images,
                 api_name="text_to_image", **EVENT)


def _image_to_report_tab(gr, pipe: Any, controls: list[Any], phantoms: list[tuple[Any, str]]) -> None:
    with gr.Tab("Image to report", id="i2r"):
        truth = gr.Textbox(label="True report (example phantoms)", interactive=False, elem_id="i2r-truth",
                           render=False)
        with gr.Row():
            with gr.Column():
                image = _guard(gr, gr.Image(type="pil", label="Image", sources=["upload", "clipboard"],
                                            elem_id="i2r-image", elem_classes="medim-out", height=320), "image")
                gr.Examples([[str(p), r] for p, r in phantoms], [image, truth], label="Example phantoms",
                            elem_id="i2r-examples")
            with gr.Column():
                prompt = gr.Textbox(label="Report begins with (optional)", elem_id="i2r-prompt")
                go = gr.Button("Write the report", variant="primary", elem_id="i2r-run")
                written = gr.Textbox(label="Report", lines=3, interactive=False, elem_id="i2r-report")
                truth.render()
        go.click(_runner(gr, pipe, tasks.image_to_report), [image, prompt, *controls], written,
                 api_name="image_to_report", **EVENT)


def _pairs_tab(gr, pipe: Any, controls: list[Any]) -> None:
    with gr.Tab("Pairs", id="pairs"):
        with gr.Row():
            with gr.Column():
                opener = gr.Textbox(label="Reports begin with (may be empty)", value="Frontal chest radiograph.",
                                    elem_id="pairs-prompt")
                count = _guard(gr, gr.Slider(1, tasks.MAX_COUNT, value=4, step=1, label="Pairs", elem_id="pairs-count"),
                               "number")
                go = gr.Button("Generate pairs", variant="primary", elem_id="pairs-run")
                listed = gr.Textbox(label="Their reports", lines=5, interactive=False, elem_id="pairs-reports")
            pairs = gr.Gallery(label="Pairs", format="png", columns=2, elem_id="pairs-images",
                               elem_classes="medim-out", object_fit="contain", height=480)
        go.click(_runner(gr, pipe, tasks.generate_pairs, _pairs_out), [opener, count, *controls], [pairs, listed],
                 api_name="generate_pairs", **EVENT)


def _inpaint_tab(gr, pipe: Any, controls: list[Any], phantoms: list[tuple[Any, str]]) -> None:
    with gr.Tab("Inpainting", id="inpaint"), gr.Row():
        with gr.Column():
            editor = _guard(gr, gr.ImageEditor(type="pil", label="Paint the region to redraw", sources=["upload"],
                                               elem_id="inpaint-editor", height=360, layers=False,
                                               brush=gr.Brush(colors=["#ff3b30"], color_mode="fixed",
                                                              default_size=max(2, pipe.image_resolution // 12))),
                            "image")
            gr.Examples([[str(p)] for p, _ in phantoms], [editor], label="Example phantoms",
                        elem_id="inpaint-examples")
            wanted = gr.Textbox(label="Report of the result (empty: written with the region)", lines=3,
                                elem_id="inpaint-report")
            grow = _guard(gr, gr.Slider(0, 3, value=0, step=1, label="Grow the region by (codes)",
                                        elem_id="inpaint-grow"), "number")
            go = gr.Button("Redraw", variant="primary", elem_id="inpaint-run")
        with gr.Column():
            redrawn = gr.Image(type="pil", label="Result", interactive=False, elem_id="inpaint-image",
                               elem_classes="medim-out", height=320)
            result_report = gr.Textbox(label="Report", lines=3, interactive=False, elem_id="inpaint-result")
    go.click(_runner(gr, pipe, tasks.inpaint), [editor, wanted, grow, *controls], [redrawn, result_report],
             api_name="inpaint", **EVENT)


def build_app(pipe: Any, *, title: str = "MeDiM") -> Any:
    """A `gradio.Blocks` app on `pipe` (a `MeDiMPipeline`), queued; `.launch(**launch_options())`
    serves it.

    Example:
        >>> from medim import MeDiMPipeline
        >>> from medim.app import build_app, launch_options
        >>> build_app(MeDiMPipeline.from_pretrained("medim-demo")).launch(**launch_options())
    """
    gr = require_gradio()
    pipe.set_progress_bar_config(disable=True)  # the page has its own bar
    examples_dir = tempfile.TemporaryDirectory(prefix="medim-app-")
    phantoms = tasks.example_phantoms(examples_dir.name, pipe.image_resolution)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        app.medim_examples_dir = examples_dir  # the example files live as long as the app
        gr.Markdown(f"# {title}\nMasked discrete diffusion for medical images and reports: "
                    f"{pipe.image_resolution} x {pipe.image_resolution} images, reports of up to "
                    f"{pipe.layout.text_segment.length} tokens. Research use only, not for diagnosis.")
        controls = _sampler_controls(gr, pipe.sampler_config)
        _text_to_image_tab(gr, pipe, controls)
        _image_to_report_tab(gr, pipe, controls, phantoms)
        _pairs_tab(gr, pipe, controls)
        if hasattr(pipe, "inpaint"):
            _inpaint_tab(gr, pipe, controls, phantoms)
    return app.queue(default_concurrency_limit=1, max_size=64)
