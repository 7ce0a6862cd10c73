"""The web app in a real browser: served on localhost from this process, driven by headless Chromium
(the system's chromium + chromedriver, through Selenium) as a person would use it. Screenshots of
every step go to the test's tmp dir. Skipped where Chromium is absent, except in CI (`CI` set),
where .ci/run installs it and a missing browser is a failure."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest

from medim.app.browser import find_chromium

MISSING = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
REASON = (f"needs {' and '.join(MISSING)} (pip install -e '.[dev,app]')" if MISSING else
          "needs Chromium (Debian: apt-get install chromium chromium-driver)" if find_chromium() is None else None)
if REASON and os.environ.get("CI"):
    pytest.fail(f"CI must run the browser test, but it {REASON}", pytrace=False)
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

REPORT = "A large dense nodule in the right upper zone."


@pytest.fixture(scope="module")
def url():
    from medim import MeDiMPipeline
    from medim.app import build_app
    from medim.app.browser import serve

    with serve(build_app(MeDiMPipeline.from_pretrained("medim-demo"))) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    from medim.app.browser import chromium

    with chromium() as driver:
        yield driver


@pytest.fixture
def page(driver, url):
    from medim.app.browser import Page

    return Page(driver, url)


def real_image(image, size: int = 64) -> bool:
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return image.size == (size, size) and pixels.std() > 5  # a phantom, not a blank or a placeholder


def test_text_to_image(page, tmp_path):
    page.fill("t2i-report", REPORT)
    page.click("t2i-run")
    images = page.images("t2i-images", 2)
    page.screenshot(tmp_path / "text_to_image.png")
    assert len(images) == 2 and all(real_image(im) for im in images)
    assert (tmp_path / "text_to_image.png").stat().st_size > 10_000


def test_report_of_an_uploaded_phantom(page, tmp_path):
    from medim.data.synthetic import make_pair

    make_pair(7)[0].save(tmp_path / "phantom.png")
    page.tab("Image to report")
    page.upload("i2r-image", str(tmp_path / "phantom.png"))
    page.click("i2r-run")
    report = page.wait_text("i2r-report")
    page.screenshot(tmp_path / "image_to_report.png")
    assert len(report.split()) >= 3


def test_example_phantom_and_pairs(page, tmp_path):
    from medim.data.synthetic import make_pair

    page.tab("Image to report")
    page.wait(lambda: page.css("#i2r-examples tr.tr-body"), "the example phantoms")[1].click()
    assert page.wait_text("i2r-truth") == make_pair(1)[1]  # the example fills the image and its true report
    assert real_image(page.images("i2r-image", 1)[0])
    page.tab("Pairs")
    page.click("pairs-run")
    images = page.images("pairs-images", 4)
    reports = page.wait_text("pairs-reports").splitlines()
    page.screenshot(tmp_path / "pairs.png")
    assert all(real_image(im) for im in images)
    assert [r.split(". ", 1)[0] for r in reports] == ["1", "2", "3", "4"]
    assert all("Frontal chest radiograph." in r for r in reports)


def test_bad_inputs_show_messages(page, tmp_path):
    page.fill("t2i-report", "")
    page.click("t2i-run")
    assert "the report is empty" in page.error()
    page.screenshot(tmp_path / "empty_report.png")
    page.driver.refresh()
    page.wait(lambda: page.css("#t2i-run"), "the page to load")
    page.fill("t2i-report", REPORT)
    page.fill("guidance", "-1")
    page.click("t2i-run")
    assert "guidance_scale must be a finite number >= 0" in page.error()  # the pipeline's own check
    page.screenshot(tmp_path / "negative_guidance.png")


def test_inpainting_a_painted_region(page, tmp_path):
    if "Inpainting" not in [b.text.strip() for b in page.css("button[role='tab']")]:
        pytest.skip("this pipeline has no inpaint task")
    page.tab("Inpainting")
    page.wait(lambda: page.css("#inpaint-examples button.gallery-item"), "the example phantoms")[0].click()
    page.wait(lambda: page.css("#inpaint-editor canvas"), "the phantom in the editor")
    time.sleep(1)  # the editor draws the phantom before it takes strokes
    page.stroke("inpaint-editor", [(30, -100), (60, -80), (90, -60), (110, -30)])  # the image's upper right
    page.fill("inpaint-report", "No focal lesion.")
    page.click("inpaint-run")
    assert page.wait_text("inpaint-result") == "No focal lesion."
    (image,) = page.images("inpaint-image", 1)
    page.screenshot(tmp_path / "inpainting.png")
    assert real_image(image)
