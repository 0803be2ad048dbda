"""The ColorNet website example in a real browser: headless Chromium (Debian's package) driven by
Selenium uploads a picture at both endpoints, with and without a trailing slash, and checks the
colourised result that the page's JavaScript renders.

Set MLSERVE_SCREENSHOT=PATH to keep a screenshot of the page with its result (the one in
examples/colornet-website/ was taken that way).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.harness import EXAMPLES

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

READ_RESULT_JS = """
const done = arguments[arguments.length - 1];
fetch(document.getElementById("result").src)
  .then(answer => answer.arrayBuffer())
  .then(buffer => {
    const bytes = new Uint8Array(buffer);
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    done(btoa(text));
  })
  .catch(err => done("ERROR " + err));
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = "Debian's chromium and chromium-driver are not installed (make test installs them)"
        if os.environ.get("MLSERVE_REQUIRE_ENGINE"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def website(mlserve_module, tmp_path_factory):
    project = tmp_path_factory.mktemp("site") / "colornet-website"
    shutil.copytree(EXAMPLES / "colornet-website", project, ignore=shutil.ignore_patterns("screenshot.png"))
    return mlserve_module.json("run", "--mode", "serve", cwd=project)


@pytest.fixture(scope="module")
def gray_picture(tmp_path_factory) -> Path:
    """A grey scene: a sky gradient, a sun, hills and a house, drawn with Pillow."""
    width, height = 480, 320
    sky = np.linspace(90, 220, height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    image = Image.fromarray(sky, "L")
    draw = ImageDraw.Draw(image)
    draw.ellipse((340, 40, 410, 110), fill=250)
    draw.polygon([(0, 230), (90, 150), (200, 210), (310, 130), (480, 220), (480, 320), (0, 320)], fill=70)
    draw.rectangle((0, 260, 480, 320), fill=40)
    draw.rectangle((70, 200, 120, 260), fill=150)
    draw.polygon([(60, 200), (95, 170), (130, 200)], fill=110)
    path = tmp_path_factory.mktemp("pictures") / "landscape.png"
    image.save(path)
    return path


def _endpoint_urls(website: dict) -> list[str]:
    unique, project = website["endpoint"], website["project_endpoint"]
    return [unique, unique + "/", project, project + "/"]


def _upload(driver, url: str, picture: Path, palette: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(url)
    assert driver.title == "ColorNet on mlserve"
    Select(driver.find_element(By.ID, "palette")).select_by_value(palette)
    driver.find_element(By.ID, "file").send_keys(str(picture))
    driver.find_element(By.ID, "submit").click()


def _wait_for_result(driver) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "const img = document.getElementById('result');"
            "return img.dataset.ready === '1' && img.complete && img.naturalWidth > 0;")
        or status.get_attribute("class") == "error"
    )
    return status.text


@pytest.mark.parametrize("which", ["unique", "unique/", "project", "project/"])
def test_page_uploads_and_shows_the_colourised_picture(browser, website, gray_picture, which):
    url = dict(zip(["unique", "unique/", "project", "project/"], _endpoint_urls(website), strict=True))[which]
    _upload(browser, url, gray_picture, "ocean")
    assert _wait_for_result(browser) == "Done."

    # The stylesheet came from /static under the endpoint's prefix and applies.
    header = browser.execute_script("return getComputedStyle(document.querySelector('header')).backgroundImage")
    assert "linear-gradient" in header
    natural = browser.execute_script(
        "const img = document.getElementById('result'); return [img.naturalWidth, img.naturalHeight];")
    original = Image.open(gray_picture)
    assert natural == [original.width, original.height]

    encoded = browser.execute_async_script(READ_RESULT_JS)
    assert not encoded.startswith("ERROR"), encoded
    result = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert result.format == "PNG" and result.size == original.size
    pixels = np.asarray(result.convert("RGB"), dtype=np.int16)
    # The input is grey (R = G = B); the result is coloured, blue-green for the ocean palette.
    assert np.abs(pixels[..., 0] - pixels[..., 2]).mean() > 20
    assert pixels[..., 2].mean() > pixels[..., 0].mean()

    if which == "unique" and os.environ.get("MLSERVE_SCREENSHOT"):
        browser.save_screenshot(os.environ["MLSERVE_SCREENSHOT"])


def test_page_explains_a_file_that_is_not_a_picture(browser, website, tmp_path):
    from selenium.webdriver.common.by import By

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture\n")
    _upload(browser, website["project_endpoint"], text_file, "sunset")
    status = _wait_for_result(browser)
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert status == "Failed: notes.txt is not a picture this site can read"
