"""The web app without a browser: what its buttons run (medim/app/tasks.py) on the bundled demo model,
the page's wiring (tabs, one queue for the device, messages instead of tracebacks) and `medim app`.
tests/integration/test_app_browser.py drives the served page in Chromium."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from medim import MeDiMPipeline
from medim.app import build_app, tasks
from medim.app.ui import QUEUE
from medim.cli import main
from medim.data.synthetic import make_pair

FAST = tasks.Sampling(num_inference_steps=4, guidance_scale=0.0, strategy="maskgit", seed=0)
PAINT = np.zeros((64, 64, 4), dtype=np.uint8)  # an image editor's layer: strokes over the upper left
PAINT[8:24, 8:24, 3] = 255


@pytest.fixture(scope="module")
def pipe() -> MeDiMPipeline:
    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_to_image_with_progress_and_seed(pipe):
    seen = []
    images = tasks.text_to_image(pipe, " A large dense nodule in the right upper zone. ", 3, FAST,
                                 lambda done, total: seen.append((done, total)))
    assert [(im.mode, im.size) for im in images] == [("RGB", (64, 64))] * 3
    assert seen == [(i, 4) for i in range(1, 5)]  # the step callback feeds the bar
    again = tasks.text_to_image(pipe, "A large dense nodule in the right upper zone.", 3, FAST)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    other = tasks.text_to_image(pipe, "A large dense nodule in the right upper zone.", 1,
                                replace(FAST, num_inference_steps=4.0, seed=1.0))  # sliders may send floats
    assert not np.array_equal(np.asarray(other[0]), np.asarray(images[0]))


def test_image_to_report_and_pairs(pipe):
    image, _, _ = make_pair(7)
    report = tasks.image_to_report(pipe, image, "", FAST)
    assert isinstance(report, str) and report.strip()
    begun = tasks.image_to_report(pipe, image, "Frontal chest radiograph.", FAST)
    assert begun.startswith("Frontal chest radiograph.")
    pairs = tasks.generate_pairs(pipe, "Frontal view of the chest.", 2, FAST)
    assert len(pairs) == 2 and all(im.size == (64, 64) and r.startswith("Frontal view of the chest.")
                                   for im, r in pairs)
    assert len(tasks.generate_pairs(pipe, "  ", 1, FAST)) == 1  # no prompt: free pairs


@pytest.mark.parametrize("call, error", [
    (lambda p: tasks.text_to_image(p, "   ", 1, FAST), "the report is empty"),
    (lambda p: tasks.text_to_image(p, "a", 0, FAST), "number of images must be an int in \\[1, 8\\]"),
    (lambda p: tasks.text_to_image(p, "a", 2.5, FAST), "number of images"),
    (lambda p: tasks.text_to_image(p, "a", 1, replace(FAST, seed=-1)), "seed must be"),
    (lambda p: tasks.text_to_image(p, "a", 1, replace(FAST, seed=None)), "seed must be"),
    (lambda p: tasks.text_to_image(p, "a", 1, replace(FAST, guidance_scale=-1.0)), "guidance_scale must be"),
    (lambda p: tasks.text_to_image(p, "a", 1, replace(FAST, num_inference_steps=0)), "num_inference_steps"),
    (lambda p: tasks.text_to_image(p, "a", 1, replace(FAST, strategy="greedy")), "strategy must be one of"),
    (lambda p: tasks.image_to_report(p, None, "", FAST), "no image: upload one"),
    (lambda p: tasks.generate_pairs(p, "a", 9, FAST), "number of pairs"),
    (lambda p: tasks.inpaint(p, None, "a", 0, FAST), "no image"),
    (lambda p: tasks.inpaint(p, {"background": Image.new("RGB", (64, 64)), "layers": [PAINT]}, "a", -1, FAST),
     "grow must be an int in \\[0, 8\\]"),
])
def test_bad_inputs_fail_before_any_compute(pipe, call, error, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(pipe.model, "forward", no_compute)
    with pytest.raises((ValueError, TypeError), match=error):
        call(pipe)


def test_mask_from_editor():
    background = Image.new("RGB", (8, 8), (90, 90, 90))
    layer = np.zeros((8, 8, 4), dtype=np.uint8)
    layer[2:4, 5:7, 3] = 255  # the painted strokes
    image, mask = tasks.mask_from_editor({"background": background, "layers": [Image.fromarray(layer)],
                                          "composite": background})
    assert image.mode == "RGB" and mask.mode == "L" and mask.size == (8, 8)
    assert np.array_equal(np.asarray(mask) > 0, layer[:, :, 3] > 0)
    with pytest.raises(ValueError, match="nothing painted"):
        tasks.mask_from_editor({"background": background, "layers": [Image.new("RGBA", (8, 8))]})


class Recorder:
    """A pipeline seen through its tasks: counts the calls that run at the same time."""

    def __init__(self, pipe, delay: float = 0.0):
        self._pipe, self._delay, self._lock = pipe, delay, threading.Lock()
        self.active = self.most = 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def _run(self, method, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(self._delay)
            return getattr(self._pipe, method)(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1

    def text_to_image(self, *args, **kwargs):
        return self._run("text_to_image", *args, **kwargs)

    def generate_pairs(self, *args, **kwargs):
        return self._run("generate_pairs", *args, **kwargs)


class WithoutInpaint(Recorder):
    """A pipeline without the `inpaint` task."""

    def __getattr__(self, name):
        if name == "inpaint":
            raise AttributeError(name)
        return super().__getattr__(name)


class Inpainter(Recorder):
    """A pipeline seen through `inpaint` (records what it is given)."""

    def inpaint(self, images, masks, prompts, **kwargs):
        self.inpainted = (images, masks, prompts, kwargs)
        return self._pipe.inpaint(images, masks, prompts, **kwargs)


@pytest.mark.skipif(not hasattr(MeDiMPipeline, "inpaint"), reason="this MeDiMPipeline has no inpaint task")
def test_inpaint_redraws_the_painted_region(pipe):
    stand_in = Inpainter(pipe)
    phantom = make_pair(1)[0]
    image, report = tasks.inpaint(stand_in, {"background": phantom, "layers": [PAINT]}, "No focal lesion.", 1, FAST)
    images, masks, prompts, kwargs = stand_in.inpainted
    assert report == "No focal lesion." and prompts == ["No focal lesion."] and images[0].size == (64, 64)
    assert np.array_equal(np.asarray(masks[0]) > 0, PAINT[:, :, 3] > 0)
    assert kwargs["mask_dilation"] == 1 and kwargs["num_inference_steps"] == 4
    assert image.size == (64, 64) and image.mode == "RGB"
    tasks.inpaint(stand_in, {"background": phantom, "layers": [PAINT]}, "  ", 0, FAST)
    assert stand_in.inpainted[2] is None  # no report written: the model writes one with the region


# ---- the page ---------------------------------------------------------------------------------
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason="the app's page needs gradio: pip install 'medim-diffusion[app]'")


def events(app) -> dict:
    """The page's generation events by name (not the example loaders gradio adds)."""
    return {f.api_name: f for f in app.fns.values() if f.api_name and not f.api_name.startswith("load_example")}


@needs_gradio
def test_page_has_a_tab_per_task_and_one_queue(pipe):
    handlers = events(build_app(WithoutInpaint(pipe)))
    assert sorted(handlers) == ["generate_pairs", "image_to_report", "text_to_image"]
    assert all(f.concurrency_id == QUEUE and f.concurrency_limit == 1 for f in handlers.values())
    handlers = events(build_app(Inpainter(pipe)))
    assert sorted(handlers) == ["generate_pairs", "image_to_report", "inpaint", "text_to_image"]
    assert all(f.concurrency_id == QUEUE and f.concurrency_limit == 1 for f in handlers.values())


@needs_gradio
def test_bad_input_is_a_message_and_warnings_are_toasts(pipe, monkeypatch):
    import gradio

    run = events(build_app(pipe))["text_to_image"].fn
    with pytest.raises(gradio.Error, match="guidance_scale must be a finite number &gt;= 0") as caught:
        run("A nodule.", 1, 4, -1, "maskgit", 0)
    assert "Traceback" not in caught.value.message
    shown = []
    monkeypatch.setattr(gradio, "Warning", shown.append)
    images = run("A large dense nodule in the right upper zone. " * 8, 1, 2, 0, "maskgit", 0)
    assert len(images) == 1 and any("truncated" in w for w in shown)


@needs_gradio
def test_queue_runs_one_generation_at_a_time(pipe):
    from gradio_client import Client

    from medim.app.browser import serve

    recorder = Recorder(pipe, delay=0.5)
    with serve(build_app(recorder)) as url:
        client = Client(url, verbose=False, download_files=False)
        jobs = [client.submit("A nodule.", 1, 2, 0, "maskgit", i, api_name="/text_to_image") for i in range(2)]
        jobs.append(client.submit("Frontal chest radiograph.", 2, 2, 0, "maskgit", 0, api_name="/generate_pairs"))
        results = [job.result(timeout=300) for job in jobs]
    assert recorder.most == 1  # different tasks too: one queue for the device
    assert [len(r) for r in results[:2]] == [1, 1] and len(results[2][0]) == 2


def test_missing_gradio_says_how_to_install(monkeypatch):
    from medim.app import require_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"pip install 'medim-diffusion\[app\]'"):
        require_gradio()
    with pytest.raises(SystemExit, match=r"pip install 'medim-diffusion\[app\]'"):
        main(["app"])


def test_command_checks_the_port_first():
    with pytest.raises(SystemExit, match="--port must be"):
        main(["app", "--port", "70000"])


@needs_gradio
def test_command_names_a_model_it_cannot_load():
    with pytest.raises(SystemExit, match="cannot load --model /nonexistent/medim-folder"):
        main(["app", "--model", "/nonexistent/medim-folder"])


@needs_gradio
def test_command_serves_the_demo(tmp_path):
    from medim.app.browser import free_port

    port = free_port("127.0.0.1")
    log = (tmp_path / "log").open("w+")
    server = subprocess.Popen([sys.executable, "-m", "medim", "app", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline, config = time.monotonic() + 180, {}
        while time.monotonic() < deadline and server.poll() is None and not config:
            time.sleep(1)
            with contextlib.suppress(OSError):
                config = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5))
        log.seek(0)
        assert config, log.read()
        ids = {c["props"].get("elem_id") for c in config["components"]}
        assert config["title"] == "MeDiM" and {"t2i-run", "i2r-run", "pairs-run"} <= ids
        assert config["analytics_enabled"] is False
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---- issue 27: every failure a message naming the problem ------------------------------------------


def _garbage_files(folder):
    """Uploads that are not images: text named .png, a truncated PNG, a DICOM without pixels."""
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "ok.png")
    whole = (folder / "ok.png").read_bytes()
    (folder / "trunc.png").write_bytes(whole[: len(whole) // 2])
    (folder / "report.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 20)
    return folder


def test_unreadable_images_are_named_before_any_compute(pipe, tmp_path, monkeypatch):
    files = _garbage_files(tmp_path)
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    truncated = Image.open(files / "trunc.png")  # PIL decodes lazily: the damage shows on load
    with pytest.raises(ValueError, match="the image cannot be decoded: image file is truncated"):
        tasks.image_to_report(pipe, truncated, "", FAST)
    with pytest.raises(TypeError, match="the image must be an image, got int"):
        tasks.image_to_report(pipe, 3, "", FAST)
    with pytest.raises(ValueError, match="the uploaded file 'trunc.png' cannot be read as an image"):
        tasks.image_to_report(pipe, str(files / "trunc.png"), "", FAST)
    with pytest.raises(ValueError, match="DICOM object without pixel data"):
        tasks.read_upload(files / "report.dcm", "report.dcm")
    with pytest.raises(ValueError, match="the image cannot be decoded"):
        tasks.inpaint(pipe, {"background": Image.open(files / "trunc.png"), "layers": [PAINT]}, "", 0, FAST)


@pytest.mark.parametrize("layer", [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8),
                                   Image.new("RGBA", (64, 32))])
def test_a_layer_of_another_size_is_refused_not_read_as_nothing_painted(layer):
    with pytest.raises(ValueError, match="a painted layer is 32x32|a painted layer is 64x32"):
        tasks.mask_from_editor({"background": Image.new("RGB", (64, 64)), "layers": [layer]})


def test_a_layer_without_alpha_is_read_by_whiteness():
    layer = np.zeros((8, 8, 3), np.uint8)
    layer[:2, :3] = 255
    _, mask = tasks.mask_from_editor({"background": Image.new("RGB", (8, 8)), "layers": [layer]})
    assert (np.asarray(mask) > 0).sum() == 6
    with pytest.raises(ValueError, match="a painted layer is not an image: array of shape \\[8, 8, 3\\]"):
        tasks.mask_from_editor({"background": Image.new("RGB", (8, 8)), "layers": [np.zeros((8, 8, 3), object)]})


@needs_gradio
def test_api_garbage_and_wrong_types_are_messages(pipe, tmp_path):
    """Through the Gradio API, as a client script would call it: each failure says what is wrong
    (not "has not enabled verbose error reporting" or an empty error)."""
    from gradio_client import Client, handle_file

    from medim.app.browser import serve

    files = _garbage_files(tmp_path)
    Image.new("RGBA", (32, 32)).save(files / "small.png")
    up = {name: handle_file(str(files / name)) for name in ("text.png", "trunc.png", "report.dcm", "ok.png",
                                                           "small.png")}
    sampler = (4, 0, "maskgit", 0)

    def editor(background, *layers):
        return {"background": up[background], "layers": [up[x] for x in layers], "composite": None}

    cases = [
        ("/image_to_report", (up["text.png"], "", *sampler), "Image: the uploaded file 'text.png' cannot be read"),
        ("/image_to_report", (up["trunc.png"], "", *sampler), "'trunc.png' could not be decoded: image file is trunc"),
        ("/image_to_report", (up["report.dcm"], "", *sampler), "'report.dcm': DICOM object without pixel data"),
        ("/image_to_report", (None, "", *sampler), "no image: upload one"),
        ("/image_to_report", (up["ok.png"], "", "abc", 0, "maskgit", 0), "Steps must be a number, got 'abc'"),
        ("/text_to_image", ("a nodule", "x", *sampler), "Images must be a number, got 'x'"),
        ("/text_to_image", ("a nodule", 1, 4, 0, "maskgit", "s"), "Seed must be a number, got 's'"),
        ("/text_to_image", ("a nodule", 1, 4, 0, "greedy", 0), "greedy"),
        ("/generate_pairs", ("a", None, *sampler), "Pairs must be a number, got None"),
        ("/inpaint", (editor("text.png"), "", 0, *sampler), "the uploaded file 'text.png' cannot be read"),
        ("/inpaint", (editor("ok.png", "trunc.png"), "", 0, *sampler), "'trunc.png' could not be decoded"),
        ("/inpaint", (editor("ok.png", "small.png"), "", 0, *sampler), "a painted layer is 32x32 but the image is"),
        ("/inpaint", ("abc", "", 0, *sampler), "input_value='abc'"),
        ("/inpaint", (editor("ok.png"), "", "x", *sampler), "Grow the region by \\(codes\\) must be a number"),
    ]
    with serve(build_app(pipe)) as url:
        client = Client(url, verbose=False, download_files=False)
        for api_name, args, match in cases:
            with pytest.raises(Exception) as failed:
                client.predict(*args, api_name=api_name)
            message = str(failed.value)
            assert re.search(match, message) and "verbose error reporting" not in message, (api_name, message)
