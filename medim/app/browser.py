"""The app served on localhost and a headless Chromium that drives it as a person would (Selenium on
the system's chromium + chromedriver): what the browser test and the docs' screenshots share.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

from medim.app.ui import launch_options

__all__ = ["CHROMIUM_FLAGS", "find_chromium", "free_port", "serve", "chromium", "Page"]

# Headless, and nothing that reaches out: no sync, updates, field trials or QUIC probes.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) paths of the system's Chromium (Debian: chromium, chromium-driver), or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a `build_app` app on a free local port in this process; yields its URL."""
    port = free_port(host)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        yield f"http://{host}:{port}/"
    finally:
        app.close()


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile, quit on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise ImportError("driving the app in a browser needs selenium: pip install 'medim-diffusion[dev]'") from e
    found = find_chromium()
    if found is None:
        raise FileNotFoundError("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    with tempfile.TemporaryDirectory(prefix="medim-chromium-") as profile:
        for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(found[1]))  # no driver download
        try:
            yield driver
        finally:
            driver.quit()


class Page:
    """The app's page in a driver, addressed by the elem_ids of medim/app/ui.py."""

    def __init__(self, driver: Any, url: str, timeout: float = 120.0):
        from selenium.webdriver.common.by import By

        self.driver, self.by, self.timeout = driver, By, timeout
        driver.get(url)
        self.wait(lambda: self.driver.find_elements(By.ID, "t2i-run"), "the page to load")

    def wait(self, found: Callable[[], Any], what: str, timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = found()
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout or self.timeout:.0f} s for {what}")

    def css(self, selector: str) -> list[Any]:
        return self.driver.find_elements(self.by.CSS_SELECTOR, selector)

    def tab(self, name: str) -> None:
        button = self.wait(lambda: [b for b in self.css("button[role='tab']") if b.text.strip() == name],
                           f"the tab {name!r}")[0]
        button.click()
        self.wait(lambda: button.get_attribute("aria-selected") == "true", f"the tab {name!r} to open")

    def fill(self, elem_id: str, text: str) -> None:
        box = self.wait(lambda: self.css(f"#{elem_id} textarea, #{elem_id} input"), f"#{elem_id}")[0]
        box.clear()
        box.send_keys(text)

    def upload(self, elem_id: str, path: str) -> None:
        self.wait(lambda: self.css(f"#{elem_id} input[type=file]"), f"#{elem_id}'s file input")[0].send_keys(path)
        self.wait(lambda: self.css(f"#{elem_id} img"), f"the upload in #{elem_id}")

    def click(self, elem_id: str) -> None:
        self.driver.find_element(self.by.ID, elem_id).click()

    def stroke(self, elem_id: str, points: list[tuple[int, int]]) -> None:
        """Drag the mouse (button held) through `points`, offsets in CSS pixels from the centre of
        the canvas in `#elem_id`: a brush stroke in an image editor."""
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = self.wait(lambda: self.css(f"#{elem_id} canvas"), f"the canvas of #{elem_id}")[-1]
        actions = ActionChains(self.driver).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            actions.move_by_offset(x1 - x0, y1 - y0)
        actions.release().perform()

    def text(self, elem_id: str) -> str:
        boxes = self.css(f"#{elem_id} textarea, #{elem_id} input")
        return boxes[0].get_attribute("value") if boxes else ""

    def wait_text(self, elem_id: str) -> str:
        return self.wait(lambda: self.text(elem_id).strip(), f"text in #{elem_id}")

    def images(self, elem_id: str, count: int) -> list[Image.Image]:
        """The `count` images shown in a gallery or image output, fetched as the browser got them."""
        def shown() -> list[str] | None:
            sources = [s for s in (i.get_attribute("src") for i in self.css(f"#{elem_id} img")) if s]
            return sources if len(sources) >= count else None

        sources = self.wait(shown, f"{count} images in #{elem_id}")
        out = []
        for src in sources[:count]:
            with urllib.request.urlopen(src, timeout=30) as response:  # noqa: S310 (the app's own localhost URL)
                out.append(Image.open(io.BytesIO(response.read())).copy())
        return out

    def error(self) -> str:
        """The text of the error message shown, waiting for one."""
        return self.wait(lambda: " ".join(e.text for e in self.css("[data-testid='toast-body'].error")).strip(),
                         "an error message")

    def screenshot(self, path: str) -> None:
        self.driver.save_screenshot(str(path))
