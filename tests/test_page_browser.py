"""The inpainting page (cluster/web/index.html) driven in a real headless Chromium.

Open an image, paint a stroke with the mouse, Fill, Download: the downloaded image must differ
from the input inside the stroke and equal it, bit for bit, everywhere the brush did not reach.

Needs Debian's ``chromium`` (Playwright's own browser download does not work offline) and the
``playwright`` package (in the ``test`` extra; its wheel bundles the driver, nothing is
downloaded). The README's test command installs both. Missing either, the test fails under CI
(``CI`` set) and is skipped with the reason elsewhere.

``page_url`` is the real Ray Serve app (tests/serve_harness.py, a local Ray) serving the page and
its API (POST v1/inpaint, GET v1/model), as ``python jobs/serve.py`` does. To refresh the README's screenshot:
``PAGE_SCREENSHOT=docs/serve-page.png python -m pytest tests/test_page_browser.py`` (with
``PAGE_CHECKPOINT=runs/quickstart-sample`` to fill with a trained model instead of the tiny one).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "cluster" / "web" / "index.html"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
INSTALL = ("apt-get update && apt-get install -y chromium (Debian's package), "
           "and pip install -e '.[test]' (playwright)")

pytestmark = pytest.mark.slow

# Whether any mask pixel is painted (read back from the page's full-resolution mask canvas).
PAINTED = ("(() => { const c = document.getElementById('mask');"
           " return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0); })()")
# A DataTransfer holding one PNG file, built in the page: what a drop or a paste delivers.
FILE_TRANSFER = """async ([b64, name]) => {
    const blob = await (await fetch('data:image/png;base64,' + b64)).blob();
    const transfer = new DataTransfer();
    transfer.items.add(new File([blob], name, {type: 'image/png'}));
    return transfer;
}"""


def _browser_or_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM}"
    return None


def require_browser() -> None:
    """Nothing when Playwright and Chromium are here; else fail under CI (``CI`` set) and skip elsewhere."""
    reason = _browser_or_reason()
    if reason:
        message = f"{reason}: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the browser test: {message}", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian Chromium through Playwright (see :func:`require_browser`)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI runs the browser test: no Chromium at .*apt-get"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        require_browser()


# ---------------------------------------------------------------- the server the page talks to
@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """The base URL of the real Ray Serve app (tests/serve_harness.py) serving the page and its API.

    ``PAGE_CHECKPOINT`` fills with a trained run instead of the tiny debug checkpoint.
    """
    from tests.serve_harness import debug_checkpoint, running_app

    checkpoint = os.environ.get("PAGE_CHECKPOINT") or str(debug_checkpoint(tmp_path_factory.mktemp("page-run"), (2,)))
    with running_app(checkpoint) as url:
        yield url.rstrip("/") + "/"


# ---------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> tuple[Path, np.ndarray]:
    import skimage.data

    array = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((320, 320), Image.LANCZOS))
    path = tmp_path_factory.mktemp("page-photo") / "astronaut.png"
    Image.fromarray(array).save(path)
    return path, array


def distance_to_segment(shape: tuple[int, int], start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Per pixel centre, the distance in pixels to the segment start-end (x, y image coordinates)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))


def test_paint_fill_and_download_changes_only_the_painted_stroke(chromium, page_url, photo, tmp_path):
    path, array = photo
    page = chromium.new_page(viewport={"width": 1000, "height": 720}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
    elsewhere: list[str] = []  # the page works offline: nothing but its own server, data: and blob: URLs
    page.on("request", lambda request: request.url.startswith((page_url, "data:", "blob:"))
            or elsewhere.append(request.url))
    page.goto(page_url)
    page.wait_for_function("document.getElementById('model').textContent.includes('step')")

    page.set_input_files("#file", str(path))
    page.wait_for_selector("#frame", state="visible")
    box = page.locator("#image").bounding_box()
    scale = array.shape[1] / box["width"]  # image px per screen px: the display is fitted, the mask is not
    assert box["width"] > array.shape[1], "a small image is scaled up to fit the window"
    brush = float(page.locator("#size").input_value()) * scale
    start, end = (100.0, 150.0), (220.0, 175.0)  # image px
    page.mouse.move(box["x"] + start[0] / scale, box["y"] + start[1] / scale)
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] / scale, box["y"] + end[1] / scale, steps=12)
    page.mouse.up()
    assert page.locator("#fill").is_enabled()

    page.click("#fill")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Filled')"
                           " || document.getElementById('status').classList.contains('error')")
    status = page.locator("#status").text_content()
    assert status.startswith("Filled"), status
    with page.expect_download() as download:
        page.click("#download")
    result = np.asarray(Image.open(download.value.path()).convert("RGB"))
    assert result.shape == array.shape
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.3)  # the brush cursor, for the picture
    screenshot = tmp_path / "serve-page.png"
    page.screenshot(path=str(screenshot))
    if os.environ.get("PAGE_SCREENSHOT"):
        shutil.copy(screenshot, REPO / os.environ["PAGE_SCREENSHOT"])
    page.close()

    distance = distance_to_segment(array.shape[:2], start, end)
    changed = (result != array).any(axis=2)
    core, outside = distance < brush * 0.3, distance > brush / 2 + 1.5
    assert changed[core].mean() > 0.9, f"only {changed[core].mean():.0%} of the stroke's core was filled"
    assert not changed[outside].any(), f"{changed[outside].sum()} px outside the stroke changed"
    assert changed.sum() <= (distance <= brush / 2 + 1.5).sum()
    assert not errors, errors
    assert not elsewhere, elsewhere


def test_the_result_becomes_the_image_and_undo_brings_back_the_stroke(chromium, page_url, photo):
    path, array = photo
    page = chromium.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#frame", state="visible")
    box = page.locator("#image").bounding_box()
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.down()
    page.mouse.move(box["x"] + 120, box["y"] + 60, steps=5)
    page.mouse.up()
    painted = PAINTED
    assert page.evaluate(painted)
    page.keyboard.press("Control+z")
    assert not page.evaluate(painted) and page.locator("#fill").is_disabled()
    page.keyboard.press("Control+Shift+z")
    assert page.evaluate(painted)
    page.keyboard.press("]")
    assert int(page.locator("#size").input_value()) > 36
    page.click("#fill")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Filled')")
    assert not page.evaluate(painted), "after a fill the mask is empty, ready to paint on the result"
    assert page.locator("#download").get_attribute("aria-disabled") == "false"
    page.keyboard.press("Control+z")  # the fill itself is undoable: back to the original and its stroke
    assert page.evaluate(painted)
    page.close()


def test_a_large_photo_keeps_its_resolution_and_server_errors_show_as_one_line(chromium, page_url, tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 2400, 3), dtype=np.uint8)).save(path)
    page = chromium.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#frame", state="visible")
    assert page.evaluate("[document.getElementById('mask').width, document.getElementById('mask').height]") \
        == [2400, 1500], "the mask is painted at the image's full resolution"
    box = page.locator("#image").bounding_box()
    assert box["width"] <= 900 and box["height"] <= 700, "the display is fitted to the window"
    # Paint, then erase the same stroke with a wider eraser: the mask is empty and the server says so.
    for key in ("b", "e"):
        page.keyboard.press(key)
        if key == "e":
            page.keyboard.press("]")
        page.mouse.move(box["x"] + 100, box["y"] + 100)
        page.mouse.down()
        page.mouse.move(box["x"] + 200, box["y"] + 120, steps=5)
        page.mouse.up()
    page.click("#fill")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    status = page.locator("#status").text_content()
    assert status.startswith("error: ") and "no hole" in status and "\n" not in status, status
    assert page.locator("#download").get_attribute("aria-disabled") == "true"
    page.close()



def test_open_by_drop_and_paste_paint_by_touch_and_hold_to_see_the_original(chromium, page_url, tmp_path):
    def png(width: int, height: int, seed: int) -> str:
        out = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    context = chromium.new_context(viewport={"width": 800, "height": 600}, has_touch=True)
    page = context.new_page()
    page.goto(page_url)
    size = "[document.getElementById('image').width, document.getElementById('image').height]"

    dropped = page.evaluate_handle(FILE_TRANSFER, [png(120, 80, 1), "dropped.png"])
    page.dispatch_event("#stage", "drop", {"dataTransfer": dropped})
    page.wait_for_function(f"{size}[0] === 120")
    assert page.evaluate(size) == [120, 80] and "dropped" in page.locator("#status").text_content()

    pasted = page.evaluate_handle(FILE_TRANSFER, [png(64, 96, 2), "clipboard.png"])
    page.evaluate("(transfer) => window.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer}))", pasted)
    page.wait_for_function(f"{size}[0] === 64")
    assert page.evaluate(size) == [64, 96] and not page.evaluate(PAINTED)

    # A finger drags across the image: Chromium turns the touch events into pointer events.
    box = page.locator("#image").bounding_box()
    x, y = box["x"] + box["width"] / 3, box["y"] + box["height"] / 2
    cdp = context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for step in range(1, 6):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x + 12 * step, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.wait_for_function(PAINTED)
    assert page.locator("#undo").is_enabled() and page.locator("#fill").is_enabled()

    hidden = "getComputedStyle(document.getElementById('mask')).visibility === 'hidden'"
    page.keyboard.down(" ")
    assert page.evaluate(hidden), "holding Space shows the original without the mask"
    page.keyboard.up(" ")
    assert not page.evaluate(hidden)
    page.hover("#compare")
    page.mouse.down()
    assert page.evaluate(hidden), "holding the Original button shows the original"
    page.mouse.up()
    assert not page.evaluate(hidden)
    context.close()


@pytest.mark.parametrize("status, headers, body, shown", [
    (503, {"Retry-After": "3"}, '{"error": "too many requests queued"}',
     "error: too many requests queued (busy: try again in 3 s)"),
    (413, {}, '{"error": "request body is over the limit of 67,108,864 bytes"}',
     "error: request body is over the limit of 67,108,864 bytes"),
    (502, {}, "<html>bad gateway</html>", "error: the server answered 502"),
])
def test_server_refusals_show_as_one_line_and_fill_can_be_retried(chromium, page_url, photo, status, headers,
                                                                  body, shown):
    page = chromium.new_page(viewport={"width": 800, "height": 600})
    page.route("**/v1/inpaint", lambda route: route.fulfill(status=status, headers=headers, body=body,
                                                            content_type="application/json"))
    page.goto(page_url)
    page.set_input_files("#file", str(photo[0]))
    page.wait_for_selector("#frame", state="visible")
    box = page.locator("#image").bounding_box()
    page.mouse.move(box["x"] + 50, box["y"] + 50)
    page.mouse.down()
    page.mouse.move(box["x"] + 90, box["y"] + 70, steps=3)
    page.mouse.up()
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert page.locator("#status").text_content() == shown
    assert page.locator("#fill").is_enabled(), "the stroke is kept: Fill can be pressed again"
    page.close()
