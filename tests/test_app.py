"""The local web page (mfsr_fast.apps.web, ``mfsr-web``): the work behind it without a browser, its command line's
checks, and the page itself in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload, upscale, compare, download, bad files, the upload size limit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from mfsr_fast import upscale  # noqa: E402
from mfsr_fast.apps.web import Upscaler, build_parser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(path, h=20, w=24, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (4, 5, 4 if mode == "RGBA" else 3)).astype(np.uint8)
    Image.fromarray(small, mode).resize((w, h), Image.BICUBIC).save(path)
    return str(path)


def test_upscaler_equals_the_library_and_lists_bad_files(model_dir, tmp_path):
    good = _photo(tmp_path / "good.png")
    rgba = _photo(tmp_path / "alpha.png", 12, 16, seed=1, mode="RGBA")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    big = _photo(tmp_path / "big.png", 40, 60, seed=2)
    up = Upscaler(model_dir, max_megapixels=0.002, work_dir=str(tmp_path / "work"))  # 2000 px: big.png is over
    seen = []
    res, failed, _ = up.run([good, str(bad), rgba, big], steps=2, scale=4, seed=3,
                            progress=lambda f, text: seen.append((f, text)))
    assert [r.name for r in res] == ["good.png", "alpha.png"]
    assert dict(failed).keys() == {"bad.png", "big.png"}
    assert dict(failed)["bad.png"] == "not an image Pillow can read"  # named once, by the upload's name
    assert "megapixels" in dict(failed)["big.png"] and "60x40" in dict(failed)["big.png"]
    with Image.open(res[0].output) as o:
        want = upscale(good, model=model_dir, steps=2, seed=3)
        assert os.path.basename(res[0].output) == "good_x4.png" and np.array_equal(np.asarray(o), np.asarray(want))
    with Image.open(res[1].output) as o, Image.open(res[1].before) as b, Image.open(res[1].after) as a:
        assert o.mode == "RGBA" and o.size == (64, 48) and b.size == a.size == (64, 48) and a.mode == "RGB"
    fractions = [f for f, _ in seen]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == pytest.approx(0.75)  # file 3 of 4 ended
    assert "good.png (1/4): tile" in seen[0][1]
    # Other scales name the file by the scale; the colour fix and seed reach the library call unchanged.
    res, failed, _ = up.run([good], steps=1, scale=2.5, seed=0, color_fix="adain")
    assert not failed and os.path.basename(res[0].output) == "good_x2.5.png"
    with Image.open(res[0].output) as o:
        assert np.array_equal(np.asarray(o), np.asarray(upscale(good, model=model_dir, scale=2.5, color_fix="adain")))
    with pytest.raises(ValueError, match="colour fix"):
        up.run([good], color_fix="magic")
    # detail (upscale's; tested with a restorer-conditioned model in test_restorer_model) is checked before any file:
    # this model's flow has no base to blend towards.
    assert not up.pipe.has_base
    with pytest.raises(ValueError, match="no base"):
        up.run([good], detail=0.5)
    with pytest.raises(ValueError, match="detail must be"):
        up.run([good], detail=2)
    # The page's --sampler file: the sampler's own checks, against this model, before the page starts.
    for values, match in (({"flat_detail": 0.5}, "not a restorer-conditioned"),
                          ({"flat_detail": 2}, "flat_detail must be")):
        path = tmp_path / "sampler.json"
        path.write_text(json.dumps(values))
        with pytest.raises(ValueError, match=match):
            Upscaler(model_dir, work_dir=str(tmp_path / "work"), sampler=str(path))


def test_sixteen_bit_grey_keeps_its_depth_and_previews_scaled(model_dir, tmp_path):
    import png

    a16 = np.linspace(0, 65535, 6 * 8).reshape(6, 8).astype(np.uint16)
    p = tmp_path / "deep.png"
    with open(p, "wb") as f:
        png.Writer(8, 6, greyscale=True, bitdepth=16).write(f, a16)
    res, failed, _ = Upscaler(model_dir, work_dir=str(tmp_path / "w")).run([str(p)])
    assert not failed
    _, _, _, info = png.Reader(filename=res[0].output).read()
    assert info["bitdepth"] == 16
    with Image.open(res[0].before) as b:
        px = np.asarray(b)
        assert px.max() > 200 and px.min() < 50  # scaled from 16 bits, not clipped to white


def test_web_command_line():
    """``mfsr-web`` is its own command (``python -m mfsr_fast.apps.web``): it binds to this machine by default, takes
    no image, and refuses a bad port; ``mfsr-upscale`` has no web options."""
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.max_upload_mb > 0 and args.max_megapixels > 0
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    r = run("mfsr_fast.apps.web", "x.png")
    assert r.returncode == 2 and "unrecognized arguments: x.png" in r.stderr
    r = run("mfsr_fast.apps.web", "--port", "0")
    assert r.returncode == 2 and "--port" in r.stderr
    r = run("mfsr_fast", "x.png", "--serve")
    assert r.returncode == 2 and "unrecognized arguments: --serve" in r.stderr


def test_missing_gradio_is_a_clear_message(monkeypatch, capsys):
    from mfsr_fast.apps import web

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert web.main([]) == 2
    assert "pip install 'mfsr-fast[web]'" in capsys.readouterr().err


def _browser():
    """(chromium, chromedriver) paths, or skip with the reason."""
    pytest.importorskip("gradio", reason="the web extra is not installed (pip install -e '.[web]')")
    pytest.importorskip("selenium", reason="selenium is not installed (the test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(model_dir, tmp_path):
    chromium, driver = _browser()
    from mfsr_fast.apps.web import build

    up = Upscaler(model_dir, work_dir=str(tmp_path / "work"))
    demo = build(up, max_upload_mb=1)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, max_file_size="1mb", prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", chromium, driver
    finally:
        demo.close()


def test_page_in_headless_chromium(page, model_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, chromium, driver = page
    good = _photo(tmp_path / "photo.png", 24, 32, seed=5)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,950"):
        opts.add_argument(a)
    b = webdriver.Chrome(options=opts, service=Service(driver))
    try:
        b.get(url)
        wait = WebDriverWait(b, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#inputs input[type=file]"))
        assert "mfsr-fast" in b.title
        upload.send_keys(f"{good}\n{bad}")
        wait.until(lambda d: "broken" in d.find_element(By.ID, "inputs").text)  # shown as stem and extension
        b.find_element(By.ID, "upscale").click()
        status = wait.until(lambda d: d.find_element(By.ID, "status").text if "upscaled" in
                            d.find_element(By.ID, "status").text else None)
        assert "1 image(s) upscaled" in status and "1 failed" in status and "broken.jpg" in status
        assert "cannot read the image" in status or "not an image" in status
        links = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#downloads a[href]"))
        href = links[0].get_attribute("href")
        assert href.endswith("photo_x4.png")
        before_after = b.find_elements(By.CSS_SELECTOR, "#compare img")
        assert len(before_after) == 2
        shot = tmp_path / "page.png"
        assert b.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        with urllib.request.urlopen(href, timeout=60) as r:
            got = tmp_path / "got.png"
            got.write_bytes(r.read())
        with Image.open(got) as o:
            assert o.size == (128, 96)
            assert np.array_equal(np.asarray(o), np.asarray(upscale(good, model=model_dir)))
    finally:
        b.quit()


def test_page_refuses_uploads_over_the_limit(page, tmp_path):
    import httpx

    url, _, _ = page
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2 * 2**20))  # 2 MB against the fixture's 1 MB limit
    with open(big, "rb") as f:
        r = httpx.post(url + "gradio_api/upload", files={"files": ("huge.png", f, "image/png")}, timeout=60)
    assert r.status_code == 413, r.text
    small = _photo(tmp_path / "s.png")
    with open(small, "rb") as f:
        r = httpx.post(url + "gradio_api/upload", files={"files": ("s.png", f, "image/png")}, timeout=60)
    assert r.status_code == 200
