"""The browser demo: websocket protocol (frames, live prompt and ControlNet-scale changes, rejected messages that do
not end the session) with FastAPI's test client, and the real page end to end in headless Chromium with a fake
camera."""

import io
import os
import shutil
import socket
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def stream():
    from paradiff import StreamPipeline
    from paradiff.stream.tiny import tiny_controlnet
    from support.models import tiny_stream_pipeline

    pipe = tiny_stream_pipeline()
    s = StreamPipeline(pipe, [30, 45], guidance="initialize", controlnet=tiny_controlnet(pipe.unet),
                       control_preprocessor="canny")
    s.prepare("a red circle", negative_prompt="blurry")
    return s


def _jpeg(size=(48, 80), value=120):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _image(data):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def test_websocket_protocol_and_bad_messages(stream):
    from fastapi.testclient import TestClient

    from paradiff.stream.web import create_app

    app = create_app(stream, max_message_bytes=20_000)
    with TestClient(app) as client:
        assert "getUserMedia" in client.get("/").text
        with client.websocket_connect("/ws") as ws:
            ready = ws.receive_json()
            assert ready["type"] == "ready" and (ready["height"], ready["width"]) == (64, 64)
            assert ready["controlnet_scale"] == [1.0]
            ws.send_bytes(_jpeg())  # any size: cropped and resized to the stream's
            out = _image(ws.receive_bytes())
            assert out.size == (64, 64) and out.format == "JPEG"
            ws.send_bytes(b"\xff" * 30_000)
            err = ws.receive_json()
            assert err["type"] == "error" and "over the 20000-byte limit" in err["message"]
            ws.send_bytes(b"not an image")
            assert "could not process the frame" in ws.receive_json()["message"]
            ws.send_text("{bad json")
            assert "bad control message" in ws.receive_json()["message"]
            ws.send_json({"prompt": "   "})
            assert "non-empty" in ws.receive_json()["message"]
            with client.websocket_connect("/ws") as second:  # one client at a time
                assert "another client" in second.receive_json()["message"]
            ws.send_json({"prompt": "a blue star"})
            assert ws.receive_json() == {"type": "prompt", "prompt": "a blue star"}
            assert stream.prompt == ["a blue star"] and stream.negative_prompt == ["blurry"]
            ws.send_json({"controlnet_scale": 0.5})
            assert ws.receive_json() == {"type": "scale", "controlnet_scale": [0.5]}
            assert stream.controlnet_scale == [0.5]
            ws.send_json({"controlnet_scale": [0.5, 1.0]})  # this stream has one ControlNet
            assert "one number per ControlNet (1)" in ws.receive_json()["message"] and stream.controlnet_scale == [0.5]
            ws.send_json({"controlnet_scale": "strong"})
            assert "controlnet_scale must be a number" in ws.receive_json()["message"]
            ws.send_bytes(_jpeg(value=30))  # still serving after the rejected messages
            assert _image(ws.receive_bytes()).size == (64, 64)
        health = client.get("/health").json()
        assert health["frames"] == 2 and health["rejected"] == 6 and health["prompt"] == "a blue star"
    stream.set_controlnet_scale(1.0)


def test_controlnet_scale_on_a_stream_without_one_is_rejected():
    from fastapi.testclient import TestClient

    from paradiff import StreamPipeline
    from paradiff.stream.web import create_app
    from support.models import tiny_stream_pipeline

    plain = StreamPipeline(tiny_stream_pipeline(), [45])
    plain.prepare("a red circle")
    with TestClient(create_app(plain)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["controlnet_scale"] == []
        ws.send_json({"controlnet_scale": 1.0})
        assert "no ControlNet" in ws.receive_json()["message"]
        ws.send_bytes(_jpeg(value=90))
        assert _image(ws.receive_bytes()).size == (64, 64)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_browser_page_with_fake_camera(stream):
    pytest.importorskip("selenium", reason="needs selenium from PyPI (pip install selenium)")
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from paradiff.stream.web import create_app

    stream.update_prompt("a red circle")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(stream), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    profile = tempfile.mkdtemp(prefix="paradiff-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver or browser
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 90, poll_frequency=0.2)
        wait.until(lambda d: int(d.find_element(By.ID, "received").text) >= 3)
        assert driver.find_element(By.ID, "status").text == "streaming"
        # the page sets the <img> source when a frame arrives; decoding it is asynchronous, so wait for it
        wait.until(lambda d: d.execute_script("return document.getElementById('output').naturalWidth") == 64)
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("a green triangle")
        driver.find_element(By.ID, "apply").click()
        wait.until(lambda d: d.find_element(By.ID, "current").text == "a green triangle")
        assert stream.prompt == ["a green triangle"]
        assert driver.find_element(By.ID, "controlnet").is_displayed()
        driver.execute_script("const s = document.getElementById('cnscale'); s.value = '0.25';"
                              "s.dispatchEvent(new Event('change'));")  # what moving the slider does
        wait.until(lambda d: d.find_element(By.ID, "cnvalue").text == "0.25")
        assert stream.controlnet_scale == [0.25]
        seen = int(driver.find_element(By.ID, "received").text)
        wait.until(lambda d: int(d.find_element(By.ID, "received").text) >= seen + 2)  # frames keep coming
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
