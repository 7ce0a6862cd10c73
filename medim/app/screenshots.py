"""`python -m medim.app.screenshots [FOLDER]`: a screenshot of each tab of the app, on the bundled demo
model, driven in headless Chromium like the browser test (docs/app.md shows them; needs
`pip install -e '.[dev,app]'` and Debian's chromium + chromium-driver).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from medim.app.browser import Page, chromium, serve
from medim.app.ui import build_app
from medim.demo.settings import DEMO_NAME, DEMO_PROMPTS

__all__ = ["take_screenshots"]

# Palette PNGs: the page is mostly flat colour, so 96 colours keep it sharp at a fraction of the size.
COLOURS = 96


def _save(page: Page, path: Path) -> Path:
    page.driver.execute_script("window.scrollTo(0, 0)")
    shot = Image.open(io.BytesIO(page.driver.get_screenshot_as_png())).convert("RGB")
    left, top, right, bottom = ImageChops.difference(shot, Image.new("RGB", shot.size, "white")).getbbox()
    shot = shot.crop((0, 0, shot.width, min(shot.height, bottom + 24)))  # no blank page below the app
    shot.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def take_screenshots(folder: str | Path, pipe: Any = None, *, width: int = 1200, height: int = 1000) -> list[Path]:
    """Fill and run each tab of the app on `pipe` (default: the demo model) and save
    app_<tab>.png in `folder`; returns the files."""
    from medim.pipelines.pipeline import MeDiMPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipe if pipe is not None else MeDiMPipeline.from_pretrained(DEMO_NAME)
    saved = []
    with serve(build_app(pipe)) as url, chromium(width, height) as driver:
        page = Page(driver, url)
        page.fill("t2i-report", DEMO_PROMPTS[0])
        page.click("t2i-run")
        page.images("t2i-images", 2)
        saved.append(_save(page, folder / "app_text_to_image.png"))

        page.tab("Image to report")
        page.wait(lambda: page.css("#i2r-examples tr.tr-body"), "the example phantoms")[2].click()
        page.wait_text("i2r-truth")
        page.click("i2r-run")
        page.wait_text("i2r-report")
        saved.append(_save(page, folder / "app_image_to_report.png"))

        page.tab("Pairs")
        page.click("pairs-run")
        page.images("pairs-images", 4)
        page.wait_text("pairs-reports")
        saved.append(_save(page, folder / "app_pairs.png"))

        if hasattr(pipe, "inpaint"):
            page.tab("Inpainting")
            page.wait(lambda: page.css("#inpaint-examples button.gallery-item"), "the example phantoms")[0].click()
            page.wait(lambda: page.css("#inpaint-editor canvas"), "the phantom in the editor")
            time.sleep(1)  # the editor draws the phantom before it takes strokes
            # Over the upper right lesion; no report given, so the model writes one with the region.
            page.stroke("inpaint-editor", [(30, -78), (78, -78), (78, -62), (28, -62), (28, -46), (78, -46),
                                           (78, -30), (30, -30)])
            page.click("inpaint-run")
            page.wait_text("inpaint-result")
            page.images("inpaint-image", 1)
            saved.append(_save(page, folder / "app_inpainting.png"))
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medim.app.screenshots", description=__doc__)
    parser.add_argument("folder", nargs="?", default="docs", help="where the PNGs go (default: docs)")
    args = parser.parse_args(argv)
    for path in take_screenshots(args.folder):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
