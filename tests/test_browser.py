"""A real browser (Playwright driving Debian's headless Chromium, installed by scripts/test.sh) uploads
pictures, trains, watches progress and previews, and generates with the result; a screenshot of each tab is
saved to test-artifacts/ (or $STUDIO_TEST_ARTIFACTS)."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import serve_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("STUDIO_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    url, app = serve_app(tmp_path_factory.mktemp("browser_workspace"))
    yield url
    app.close()


def test_train_and_generate_in_a_real_browser(page_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from studio.bench.evaluate import write_b2_training_set

    assert Path(CHROMIUM).exists(), \
        "Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)"
    images = write_b2_training_set(tmp_path / "stars")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(page_url)
        page.set_input_files("#train-files input[type=file]", [str(p) for p in images]
                             + [str(p.with_suffix(".txt")) for p in images])
        page.get_by_label("Name", exact=True).fill("browser_star")
        page.get_by_text("Advanced settings").click()
        page.get_by_label("Steps (0: preset)", exact=True).fill("60")
        page.get_by_label("Preview every N steps (0: preset)").fill("20")
        page.get_by_role("button", name="Start training").click()
        status = page.locator("#train-status")
        expect(status).to_contain_text("step", timeout=120_000)          # progress shows
        expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)  # and previews
        page.screenshot(path=str(ARTIFACTS / "train-tab.png"), full_page=True)
        expect(status).to_contain_text("done", timeout=300_000)

        page.get_by_role("tab", name="Generate").click()
        page.get_by_label("Prompt", exact=True).fill("a red sks on a blue background")
        page.get_by_label("Adapters from the library").click()
        page.get_by_role("option", name="browser_star").click()
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Generate", exact=True).click()
        expect(page.locator("#gallery img").first).to_be_visible(timeout=120_000)
        expect(page.get_by_text("with browser_star at 1")).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "generate-tab.png"), full_page=True)

        page.get_by_role("tab", name="Library").click()
        expect(page.locator("#library-table")).to_contain_text("browser_star", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "library-tab.png"), full_page=True)
        browser.close()
    for name in ("train-tab.png", "generate-tab.png", "library-tab.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000


def test_draw_a_control_image_and_preview_it_in_a_real_browser(page_url):
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(page_url)
        page.get_by_role("tab", name="Control").click()
        page.locator("#control-image button[aria-label='Brush']").click()
        box = page.locator("#control-image canvas").first.bounding_box()
        x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2 - 40
        page.mouse.move(x, y)
        page.mouse.down()
        for i in range(1, 21):  # a white stroke on the black canvas
            page.mouse.move(x + 6 * i, y + 4 * i)
        page.mouse.up()
        page.get_by_role("button", name="Preview condition").click()
        condition = page.locator("#control-condition img").first
        expect(condition).to_be_visible(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "control-tab.png"), full_page=True)
        src = condition.get_attribute("src")
        browser.close()
    path = src.split("/file=", 1)[1]  # the condition the server computed from what was drawn
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.shape == (128, 128) and 100 < (pixels > 128).sum() < 0.5 * pixels.size
