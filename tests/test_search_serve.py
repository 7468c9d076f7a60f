"""tools/search.py serve in a real headless browser: the page finds a test image by its caption and an image by
itself; the JSON API refuses bad requests with a clear message and serves only the index's items.
The README's screenshot is this test's: ``FISVL_WRITE_ASSETS=1 pytest tests/test_search_serve.py`` rewrites
assets/search_page.png."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, bytes, str]:
    """Status, body and content type of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers["content-type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["content-type"]


@pytest.fixture(scope="module")
def test_entries(search_demo_root: Path) -> list[dict]:
    return json.loads((search_demo_root / "demo_test.json").read_text())


@pytest.fixture(scope="module")
def server(trained_clip: Path, search_demo_root: Path, test_entries: list[dict],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tools/search.py serve`` over an index of the demo test images, on a free port; yields its URL."""
    folder = tmp_path_factory.mktemp("serve") / "idx"
    tool = str(ROOT / "tools" / "search.py")
    images = [str(search_demo_root / "images" / e["image"]) for e in test_entries]
    subprocess.run([sys.executable, tool, "index", "--checkpoint", str(trained_clip), "--images", *images,
                    "--index", str(folder), "--workers", "0"], check=True, capture_output=True, timeout=300)
    port = free_port()
    log = folder.parent / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, tool, "serve", "--index", str(folder), "--port", str(port),
                                    "--top", "10"], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not answer at {url}:\n{log.read_text()}")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_api_answers_like_query_and_refuses_bad_requests(server: str, test_entries: list[dict]) -> None:
    status, body, kind = get(server + "/api/search?q=" + urllib.request.quote(test_entries[0]["caption"][0]) + "&top=5")
    answer = json.loads(body)
    assert status == 200 and kind == "application/json" and answer["query"] == test_entries[0]["caption"][0]
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4, 5]
    assert set(answer["results"][0]) == {"rank", "score", "path", "window", "crs", "bounds", "item"}
    status, body, kind = get(server + "/api/search?q=%20")
    assert status == 400 and json.loads(body) == {"error": "empty query: type what the images should show"}
    assert get(server + "/api/search?q=lake&top=0")[0] == 400
    status, body, kind = get(server + f"/thumb/{answer['results'][0]['item']}")
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, body, kind = get(server + f"/item/{answer['results'][0]['item']}")
    assert status == 200 and kind == "image/png" and body[:4] == b"\x89PNG"
    status, body, _ = get(server + "/item/100")  # 100 test images: rows 0..99
    assert status == 404 and "no item 100 in index" in json.loads(body)["error"]
    assert get(server + "/item/..%2F..%2Fetc%2Fpasswd")[0] in (404, 422)  # never a path


def first_found_caption(server: str, entries: list[dict]) -> tuple[str, str]:
    """The first test caption whose own image the API ranks in its top 10 (most are, by the metrics test),
    and that image's name."""
    for entry in entries:
        for caption in entry["caption"]:
            answer = json.loads(get(server + "/api/search?top=10&q=" + urllib.request.quote(caption))[1])
            if entry["image"] in [Path(r["path"]).name for r in answer["results"]]:
                return caption, entry["image"]
    pytest.fail("no test caption finds its image in the top 10: the trained checkpoint learned nothing")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (install Debian's chromium)")
def test_the_page_finds_images_by_caption_and_by_image(server: str, test_entries: list[dict],
                                                       search_demo_root: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    caption, name = first_found_caption(server, test_entries)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server + "/")
        page.fill("#q", caption)
        page.click("#search")
        page.wait_for_selector("#results .card")
        paths = page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.path)")
        assert len(paths) == 10 and name in [Path(p).name for p in paths]
        assert page.inner_text("#status") == f"10 results for {caption}"
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)

        other = search_demo_root / "images" / test_entries[7]["image"]
        page.set_input_files("#image", str(other))
        page.click("#search-image")
        page.wait_for_function(f"document.getElementById('status').textContent.endsWith({json.dumps(other.name)})")
        first = page.eval_on_selector("#results .card", "card => card.dataset.path")
        assert Path(first).name == other.name

        page.fill("#q", "   ")
        page.click("#search")
        page.wait_for_selector("#status.error")
        assert page.inner_text("#status") == "empty query: type what the images should show"
        browser.close()
    assert (tmp_path / "search_page.png").stat().st_size > 10_000
    if os.environ.get("FISVL_WRITE_ASSETS") == "1":
        shutil.copy(tmp_path / "search_page.png", ROOT / "assets" / "search_page.png")
