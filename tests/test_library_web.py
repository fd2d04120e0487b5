"""The imgsmlr page (GET /imgsmlr/) and the library page in headless Chromium: add by URL, search by URL and
by upload, the result grid with thumbnails, tag facets; screenshots kept next to the test's temporary files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import CHROMEDRIVER, CHROMIUM, headless_chromium
from tests.library_support import (
    PDQ_DATA,
    ImageServer,
    distinct_images,
    encode,
    library_env,
    library_server,
    photo,
)
from tests.servers import free_port

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Debian's chromium and chromium-driver (scripts/bootstrap.sh --test installs them)",
)


@pytest.fixture(scope="module")
def site(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ImageServer]]:
    tmp = tmp_path_factory.mktemp("library-web")
    with ImageServer() as images:
        images.files["/cat.jpg"] = encode(photo("chelsea"), "JPEG")
        images.files["/cat-copy.jpg"] = encode(ImageOps.mirror(photo("chelsea")).resize((300, 200)), "JPEG")
        images.files["/coffee.jpg"] = encode(photo("coffee"), "JPEG")
        port = free_port()
        with library_server(library_env(postgres_uri, tmp / "data"), tmp / "server.log", port):
            yield f"http://127.0.0.1:{port}", images


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    with headless_chromium(tmp_path_factory.mktemp("chromium-profile"), window="1200,900") as driver:
        yield driver


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 20.0) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def status_text(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "status").text)


def submit(driver: WebDriver, form: str) -> str:
    """Click the form's button and wait for the page to report the outcome in #status."""
    driver.execute_script("document.getElementById('status').textContent = ''")
    driver.find_element(By.CSS_SELECTOR, f"#{form} button").click()
    return str(wait_for(driver, lambda d: status_text(d) if status_text(d) not in ("", "…") else None))


def loaded_thumbnails(driver: WebDriver) -> list[str]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0)"
            ".map(i => i.alt)"
        )
    )


def test_add_search_by_url_and_by_upload(site: tuple[str, ImageServer], browser: WebDriver, tmp_path: Path) -> None:
    base, images = site
    browser.get(base + "/imgsmlr/")
    assert browser.title.startswith("imgsmlr")

    def add(url: str) -> str:
        field = browser.find_element(By.CSS_SELECTOR, "#add input[name=url]")
        field.clear()
        field.send_keys(url)
        return submit(browser, "add")

    assert add(images.url("/cat.jpg")).startswith("200 OK (id ")
    assert add(images.url("/coffee.jpg")).startswith("200 OK (id ")
    assert add(images.url("/cat.jpg")).startswith("400 image file already exists")

    search = browser.find_element(By.CSS_SELECTOR, "#search input[name=url]")
    search.send_keys(images.url("/cat-copy.jpg"))
    assert submit(browser, "search") == "1 result(s)"
    wait_for(browser, lambda d: len(loaded_thumbnails(d)) == 1)
    caption = browser.find_element(By.CSS_SELECTOR, "#results figcaption").text
    assert "pdq" in caption
    browser.save_screenshot(str(tmp_path / "imgsmlr-search-url.png"))

    upload = tmp_path / "query.jpg"
    upload.write_bytes(encode(photo("coffee").resize((300, 200)), "JPEG", quality=60))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(upload))
    assert submit(browser, "upload") == "1 result(s)"
    wait_for(
        browser,
        lambda d: (
            status_text(d) == "1 result(s)"
            and len(loaded_thumbnails(d)) == 1
            and "coffee" not in d.find_element(By.CSS_SELECTOR, "#results figcaption").text
        ),
    )
    browser.save_screenshot(str(tmp_path / "imgsmlr-search-upload.png"))
    assert (tmp_path / "imgsmlr-search-upload.png").stat().st_size > 10_000

    bad = browser.find_element(By.CSS_SELECTOR, "#search input[name=url]")
    bad.clear()
    bad.send_keys(images.url("/404"))
    assert "HTTP 404" in submit(browser, "search")
    assert loaded_thumbnails(browser) == []
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


@pytest.fixture(scope="module")
def full_site(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not FONT.is_file():
        pytest.skip(f"CJK font {FONT} not installed (apt fonts-wqy-zenhei)")
    tmp = tmp_path_factory.mktemp("library-page")
    env = library_env(postgres_uri, tmp / "data", LIBRARY_OCR_MODEL="PP-OCRv6_small")
    port = free_port()
    with library_server(env, tmp / "server.log", port):
        base = f"http://127.0.0.1:{port}"
        invoice = Image.new("RGB", (700, 160), "white")
        ImageDraw.Draw(invoice).text((30, 40), "增值税专用发票", font=ImageFont.truetype(str(FONT), 56), fill="black")
        uploads = {
            "invoice.png": encode(invoice),
            "coffee.jpg": encode(photo("coffee"), "JPEG"),
            "coffee-small.jpg": encode(photo("coffee").resize((300, 200)), "JPEG", quality=50),
            "bridge.jpg": (PDQ_DATA / "bridge-mods/aaa-orig.jpg").read_bytes(),
        }
        with httpx.Client(base_url=base, timeout=60) as client:
            for name, data in uploads.items():
                assert client.post("/api/items", files={"file": (name, data)}, data={"remark": name}).status_code == 201
            known = b"f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22,100,known bridge\n"
            assert client.post("/api/blocklist/hashes", files={"file": ("k.txt", known)}).status_code == 200
            deadline = time.monotonic() + 120
            while any(st["pending"] + st["running"] for st in client.get("/api/status").json()["steps"].values()):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        yield base


def test_library_page(full_site: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(full_site + "/")
    wait_for(browser, lambda d: "4 items" in d.find_element(By.ID, "counts").text)
    assert "1 blocked" in browser.find_element(By.ID, "counts").text

    browser.find_element(By.CSS_SELECTOR, "#text input[name=q]").send_keys("发票")
    assert submit(browser, "text") == "1 result(s)"
    wait_for(browser, lambda d: loaded_thumbnails(d) == ["item 1"])
    assert "invoice.png" in browser.find_element(By.CSS_SELECTOR, "#results figcaption").text

    query = tmp_path / "query.jpg"
    query.write_bytes(encode(photo("coffee").resize((240, 160)), "JPEG", quality=70))
    browser.execute_script("document.getElementById('status').textContent = ''")
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait_for(browser, lambda d: status_text(d) == "2 result(s)" and len(loaded_thumbnails(d)) == 2)
    browser.save_screenshot(str(tmp_path / "library-search.png"))

    browser.find_element(By.ID, "load-dups").click()
    wait_for(browser, lambda d: status_text(d) == "1 duplicate group(s)")
    wait_for(
        browser,
        lambda d: (
            d.execute_script(
                "return [...document.querySelectorAll('#duplicates img')].filter(i => i.complete && i.naturalWidth > 0)"
                ".length"
            )
            == 2
        ),
    )

    browser.find_element(By.ID, "load-hits").click()
    wait_for(browser, lambda d: status_text(d) == "1 blocklist hit(s)")
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#hits td")]
    assert cells[0] == "4" and "known bridge" in cells
    browser.save_screenshot(str(tmp_path / "library-page.png"))
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_library_page_finds_a_video_from_a_screenshot(postgres_uri: str, browser: WebDriver, tmp_path: Path) -> None:
    """A dropped screenshot finds the video: the caption gives the time and the thumbnail is that frame."""
    import numpy as np

    from tests.video_support import Shot, encode_video, photos, render, screenshot

    found = photos()
    frames = render([Shot(found["astronaut"], 4, "pan"), Shot(found["coffee"], 4, "zoom")], 10, (320, 240))
    env = library_env(postgres_uri, tmp_path / "data")
    port = free_port()
    with library_server(env, tmp_path / "server.log", port):
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            clip = ("clip.mp4", encode_video(frames, 10))
            assert client.post("/api/items", files={"file": clip}).status_code == 201
            deadline = time.monotonic() + 120
            while client.get("/api/items/1").json()["steps"][0]["state"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.2)
        query = tmp_path / "screenshot.jpg"
        query.write_bytes(screenshot(np.ascontiguousarray(frames[55])))  # 5.5 s, in the zoom
        browser.get(base + "/")
        wait_for(browser, lambda d: "1 items" in d.find_element(By.ID, "counts").text)
        browser.find_element(By.ID, "file").send_keys(str(query))
        wait_for(browser, lambda d: status_text(d) == "1 result(s)" and loaded_thumbnails(d) == ["item 1"])
        caption = browser.find_element(By.CSS_SELECTOR, "#results figcaption").text
        at = float(caption.rsplit("·", 1)[1].strip().removesuffix(" s"))
        assert abs(at - 5.5) <= 2, caption
        src = browser.find_element(By.CSS_SELECTOR, "#results img").get_attribute("src")
        assert src and "/api/items/1/image?t=" in src and abs(float(src.rsplit("=", 1)[1]) - at) <= 0.05, src
        browser.save_screenshot(str(tmp_path / "library-video.png"))
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_library_page_tag_facets(postgres_uri: str, clip_model_dir: Path, browser: WebDriver, tmp_path: Path) -> None:
    """A text search shows its results' tags with counts (English names in an English browser), as the API
    counts them; a click narrows the search to that tag. Random-weight CLIP: plumbing only."""
    env = library_env(
        postgres_uri,
        tmp_path / "data",
        LIBRARY_CLIP_MODEL="test-cn-clip-tiny",
        LIBRARY_TAGS_ENABLED="true",
        LIBRARY_TAGS_TOP_K="2",
        LIBRARY_TAGS_MIN_SCORE="-1",
    )
    env["AI_SERVICE_MODEL_DIR"] = str(clip_model_dir)  # the server loads the tiny CLIP model in-process
    port = free_port()
    with library_server(env, tmp_path / "server.log", port), httpx.Client(timeout=60) as client:
        base = f"http://127.0.0.1:{port}"
        for n, data in enumerate(distinct_images(3)):
            assert client.post(base + "/api/items", files={"file": (f"{n}.png", data)}).status_code == 201
        deadline = time.monotonic() + 120
        while any(st["pending"] + st["running"] for st in client.get(base + "/api/status").json()["steps"].values()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        expected = client.get(base + "/api/tags", params={"q": "猫", "mode": "clip", "lang": "en", "limit": 20}).json()
        assert expected["items"] == 3 and expected["tags"]

        browser.get(base + "/")
        browser.get_log("browser")  # drop what earlier tests' pages logged (their servers are gone)
        browser.find_element(By.CSS_SELECTOR, "#text input[name=q]").send_keys("猫")
        browser.find_element(By.CSS_SELECTOR, "#text select[name=mode] option[value=clip]").click()
        assert submit(browser, "text") == "3 result(s)"
        chips = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#facets button") or None)
        assert [c.text for c in chips] == [f"{f['name']} · {f['count']}" for f in expected["tags"]]
        assert all(f["name"] == f["en"] for f in expected["tags"])
        browser.save_screenshot(str(tmp_path / "library-facets.png"))
        first = expected["tags"][0]
        browser.execute_script("document.getElementById('status').textContent = ''")
        chips[0].click()
        wait_for(browser, lambda d: status_text(d) == f"{first['count']} result(s)")
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
