"""The ColorNet website example in a real browser: headless Chromium (Debian's package) driven by
Selenium uploads a picture at both endpoints, with and without a trailing slash, and checks the
colourised result that the page's JavaScript renders.

Each test runs twice: over plain HTTP, and over HTTPS through a gateway started with
`--tls self-signed`. There Chromium trusts mlserve's local CA the way a user's would: the CA file is
added to the NSS database in the browser's own $HOME (certutil, Debian's libnss3-tools), with no flag
that ignores certificate errors. A browser whose database lacks the CA must refuse the same page.

Set MLSERVE_SCREENSHOT=PATH to keep a screenshot of the page with its result (the one in
examples/colornet-website/ was taken that way).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.harness import EXAMPLES, Mlserve, make_mlserve, teardown_mlserve

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CERTUTIL = Path("/usr/bin/certutil")
PAGE_TITLE = "ColorNet on mlserve"

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


def _require(programs: tuple[Path, ...], reason: str) -> None:
    if all(program.exists() for program in programs):
        return
    if os.environ.get("MLSERVE_REQUIRE_ENGINE"):
        pytest.fail(reason)
    pytest.skip(reason)


def _chromium(home: Path) -> Any:
    """A headless Chromium whose $HOME is ``home``: on Linux it trusts the CAs in $HOME/.pki/nssdb."""
    _require((CHROMIUM, CHROMEDRIVER),
             "Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    # chromedriver passes its environment on to chromium.
    service = Service(str(CHROMEDRIVER), env={**os.environ, "HOME": str(home)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def _nss_home(home: Path, ca_file: Path | None) -> Path:
    """``home`` with an NSS database that trusts ``ca_file`` to identify web sites (or nothing, if None)."""
    _require((CERTUTIL,), "certutil is not installed: apt-get install libnss3-tools (make test installs it)")
    database = f"sql:{home / '.pki' / 'nssdb'}"
    (home / ".pki" / "nssdb").mkdir(parents=True)
    subprocess.run([str(CERTUTIL), "-d", database, "-N", "--empty-password"], check=True, capture_output=True)
    if ca_file is not None:
        subprocess.run([str(CERTUTIL), "-d", database, "-A", "-t", "C,,", "-n", "mlserve-test-ca", "-i", str(ca_file)],
                       check=True, capture_output=True)
    return home


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    driver = _chromium(tmp_path_factory.mktemp("chromium-home"))
    yield driver
    driver.quit()


def _run_website(ms: Mlserve, tmp_path_factory) -> dict[str, Any]:
    project = tmp_path_factory.mktemp("site") / "colornet-website"
    shutil.copytree(EXAMPLES / "colornet-website", project, ignore=shutil.ignore_patterns("screenshot.png"))
    return ms.json("run", "--mode", "serve", cwd=project)


@pytest.fixture(scope="module")
def website(mlserve_module, tmp_path_factory) -> dict[str, Any]:
    return _run_website(mlserve_module, tmp_path_factory)


@pytest.fixture(scope="module")
def tls_mlserve(docker_client, nginx_available) -> Iterator[tuple[Mlserve, Path]]:
    """An mlserve of its own (a TLS gateway is per home) whose gateway serves HTTPS, and its CA file."""
    ms = make_mlserve()
    try:
        started = ms.json("gateway", "start", "--tls", "self-signed", "--host", "127.0.0.1")
        assert started["url"] == f"https://127.0.0.1:{ms.port}", started
        yield ms, Path(started["ca_file"])
    finally:
        teardown_mlserve(ms, docker_client)


@pytest.fixture(scope="module")
def tls_website(tls_mlserve, tmp_path_factory) -> dict[str, Any]:
    site = _run_website(tls_mlserve[0], tmp_path_factory)
    assert site["endpoint"].startswith("https://") and site["project_endpoint"].startswith("https://"), site
    return site


@pytest.fixture(scope="module")
def trusting_browser(tls_mlserve, tmp_path_factory) -> Iterator[Any]:
    driver = _chromium(_nss_home(tmp_path_factory.mktemp("chromium-home"), tls_mlserve[1]))
    yield driver
    driver.quit()


class Served(NamedTuple):
    scheme: str
    browser: Any
    website: dict[str, Any]


@pytest.fixture(scope="module", params=["http", "https"])
def served(request) -> Served:
    """The website and a browser to use it with, over plain HTTP or over HTTPS with mlserve's CA trusted."""
    if request.param == "http":
        return Served("http", request.getfixturevalue("browser"), request.getfixturevalue("website"))
    return Served("https", request.getfixturevalue("trusting_browser"), request.getfixturevalue("tls_website"))


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
    assert driver.title == PAGE_TITLE, driver.find_element(By.TAG_NAME, "body").text[:500]
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


def _assert_loaded_over(driver, scheme: str) -> None:
    """The page shown is the site's, reached with ``scheme`` (no interstitial, no downgrade)."""
    assert driver.current_url.startswith(f"{scheme}://"), driver.current_url
    assert driver.execute_script("return location.protocol") == f"{scheme}:"
    assert driver.title == PAGE_TITLE


@pytest.mark.parametrize("which", ["unique", "unique/", "project", "project/"])
def test_page_uploads_and_shows_the_colourised_picture(served, gray_picture, which):
    browser = served.browser
    url = dict(zip(["unique", "unique/", "project", "project/"], _endpoint_urls(served.website), strict=True))[which]
    assert url.startswith(f"{served.scheme}://")
    _upload(browser, url, gray_picture, "ocean")
    assert _wait_for_result(browser) == "Done."
    _assert_loaded_over(browser, served.scheme)

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

    if which == "unique" and served.scheme == "http" and os.environ.get("MLSERVE_SCREENSHOT"):
        browser.save_screenshot(os.environ["MLSERVE_SCREENSHOT"])


def test_page_explains_a_file_that_is_not_a_picture(served, tmp_path):
    from selenium.webdriver.common.by import By

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture\n")
    _upload(served.browser, served.website["project_endpoint"], text_file, "sunset")
    status = _wait_for_result(served.browser)
    assert served.browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert status == "Failed: notes.txt is not a picture this site can read"
    _assert_loaded_over(served.browser, served.scheme)


def test_plain_http_on_the_tls_port_lands_on_the_https_page(trusting_browser, tls_website):
    endpoint = tls_website["project_endpoint"]
    trusting_browser.get("http://" + endpoint.removeprefix("https://"))
    _assert_loaded_over(trusting_browser, "https")
    assert trusting_browser.current_url.rstrip("/") == endpoint


def test_https_page_is_refused_without_the_ca(tls_website, tmp_path):
    """The same browser set-up, its NSS database without mlserve's CA: the certificate is what the
    HTTPS tests above trust, not something any browser would take."""
    from selenium.webdriver.common.by import By

    driver = _chromium(_nss_home(tmp_path / "chromium-home", None))
    try:
        driver.get(tls_website["endpoint"])
        body = driver.find_element(By.TAG_NAME, "body").text
        assert driver.title != PAGE_TITLE
        assert "ERR_CERT_AUTHORITY_INVALID" in body, body[:500]
        assert not driver.find_elements(By.ID, "file")
    finally:
        driver.quit()
