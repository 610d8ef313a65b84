"""`paradiff serve`: validation, limits, overload, deadlines and disconnects on an in-process server (fake pipeline);
the rank loop on 2 gloo ranks (same requests in the same order, failures, a rank that stops responding); and the
real CLI on 2 ranks with the reference model (images equal to `generate`'s, overload, SIGTERM drain, killed rank)."""

import io
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from serve_utils import CliServer, FakeRunner, InProcessServer, metric_samples, sample  # noqa: E402

KEY = "test-key-7f3a"


def _image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _wait(condition, timeout=20.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


# -- in-process: the HTTP side over a fake runner --------------------------------------------------------------


def test_requests_are_validated_and_the_server_keeps_serving():
    runner = FakeRunner()
    server = InProcessServer(runner, api_key=KEY, max_images=3, max_steps=10, max_body_bytes=2000,
                             max_prompt_chars=100)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            bad = [
                ({"prompt": "x", "size": "128x128"}, "is not served here; this server serves 32x48, 64x64"),
                ({"prompt": "x", "colour": "red"}, "Extra inputs are not permitted"),
                ({"prompt": "x", "image": "aGVsbG8="}, "which takes no input image"),
                ({"prompt": "x", "n": 4, "response_format": "b64_json"}, "less than or equal to 3"),
                ({"prompt": "x", "steps": 11}, "less than or equal to 10"),
                ({"prompt": "x", "steps": "4"}, "valid integer"),
                ({"prompt": "x", "n": 2}, "use 'b64_json' for n > 1"),
                ({"prompt": "   "}, "prompt is blank"),
                ({"prompt": "x" * 101}, "at most 100 characters"),
                ({"prompt": "x", "output_format": "gif"}, "'png', 'jpeg' or 'webp'"),
                ({}, "Field required"),
            ]
            for body, message in bad:
                r = http.post("/v1/images", json=body, headers=auth)
                assert r.status_code == 422 and message in r.text, (body, r.status_code, r.text)
            r = http.post("/v1/images", content=b'{"prompt": "x",', headers={**auth, "Content-Type": "application/json"})
            assert r.status_code == 422 and "json_invalid" in r.text
            r = http.post("/v1/images", content=json.dumps({"prompt": "x" * 2500}), headers=auth)
            assert r.status_code == 413 and "2000-byte limit" in r.text
            r = http.post("/v1/images", content=iter([b'{"prompt": "x"}']), headers=auth)  # chunked: no length
            assert r.status_code == 411
            assert http.post("/v1/images", json={"prompt": "x"}).status_code == 401
            r = http.post("/v1/images", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert http.get("/metrics").status_code == 401
            assert runner.calls == []  # nothing reached the ranks

            r = http.post("/v1/images", json={"prompt": "a circle", "seed": 7}, headers={"X-API-Key": KEY})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["X-Seed"] == "7"
            image = _image(r.content)
            assert image.size == (48, 32) and image.getpixel((0, 0)) == (7, 0, 4)  # default size, steps; seed 7
            r = http.post("/v1/images", json={"prompt": "a circle", "seed": 5, "size": "64", "n": 3, "steps": 9,
                                              "response_format": "b64_json", "output_format": "jpeg"}, headers=auth)
            assert r.status_code == 200
            payload = r.json()
            assert [item["seed"] for item in payload["images"]] == [5, 6, 7] and payload["size"] == "64x64"
            import base64

            for item in payload["images"]:
                decoded = _image(base64.b64decode(item["b64_json"]))
                assert decoded.format == "JPEG" and decoded.size == (64, 64)
                assert abs(decoded.getpixel((8, 8))[0] - item["seed"]) <= 2
            r = http.post("/v1/images", json={"prompt": "x", "output_format": "webp"}, headers=auth)
            assert r.status_code == 200 and _image(r.content).format == "WEBP" and int(r.headers["X-Seed"]) >= 0
            r = http.post("/v1/images", json={"prompt": "fail please"}, headers=auth)
            assert r.status_code == 500 and "ValueError: this prompt fails" in r.text
            assert http.post("/v1/images", json={"prompt": "still serving"}, headers=auth).status_code == 200
            assert runner.calls[1]["guidance"] is None and runner.calls[1]["negative_prompt"] is None

            from paradiff.client import Client, ServerError

            client = Client(server.url, api_key=KEY)
            images = client.generate("two", size=64, seed=11, n=2)
            assert [im.getpixel((0, 0))[0] for im in images] == [11, 12] and client.last_headers["x-seed"] == "11"
            with pytest.raises(ServerError, match="size: Value error, size '96x96' is not served here") as err:
                client.generate("x", size=96)
            assert err.value.status == 422
            with pytest.raises(ServerError, match="valid API key") as err:
                Client(server.url, api_key="wrong").generate("x")
            assert err.value.status == 401
            health = http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ready"
            assert http.get("/openapi.json").json()["paths"]["/v1/images"]["post"]
            samples = metric_samples(http.get("/metrics", headers=auth).text)
        assert sample(samples, "paradiff_images_total", size="32x48") == 3
        assert sample(samples, "paradiff_images_total", size="64x64") == 5
        assert sample(samples, "paradiff_failures_total", reason="invalid") == len(bad) + 2
        assert sample(samples, "paradiff_failures_total", reason="too_large") == 2
        assert sample(samples, "paradiff_failures_total", reason="unauthorized") == 4
        assert sample(samples, "paradiff_failures_total", reason="error") == 1
        assert sample(samples, "paradiff_requests_total", code="200") == 5
        assert sample(samples, "paradiff_requests_total", code="422") == len(bad) + 2
        assert sample(samples, "paradiff_request_seconds_count", size="32x48") == 3
        assert sample(samples, "paradiff_queue_depth") == 0 and sample(samples, "paradiff_ready") == 1
    finally:
        server.close()


def _b64(image, format="PNG") -> str:
    import base64

    buf = io.BytesIO()
    image.save(buf, format=format)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _noise(height, width, mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def test_image_inputs_are_decoded_checked_and_reach_the_runner():
    """img2img on a text-to-image model: the runner gets the exact pixels; every bad image is a 422 (never echoed
    back) and the server keeps serving; the size comes from the image when not given."""
    from paradiff.serve.inputs import PipelineInputs

    runner = FakeRunner()
    server = InProcessServer(runner, inputs=PipelineInputs("text-to-image", "StableDiffusionPipeline", img2img=True,
                                                           strength=0.8))
    picture = _noise(32, 48)
    good = _b64(picture)
    truncated = _b64(picture)[:400]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            bad = [
                ({"image": "%%%not base64%%%"}, "image is not valid base64"),
                ({"image": "aGVsbG8gd29ybGQ="}, "image is not a PNG, JPEG or WebP image"),
                ({"image": _b64(_noise(32, 48), "GIF")}, "image is not a PNG, JPEG or WebP image"),
                ({"image": good, "size": "64x64"}, "image is 32x48 (HxW) but the output size is 64x64"),
                ({"image": _b64(_noise(40, 40))}, "not a size this server serves (32x48, 64x64)"),
                ({"image": truncated}, "image could not be decoded (OSError: truncated or corrupt?)"),
                ({"mask": good}, "mask needs image"),
                ({"image": good, "mask": good}, "mask is for inpainting models; this server's model is a "
                                                "StableDiffusionPipeline (text to image)"),
                ({"control_image": good}, "control_image needs a ControlNet model"),
                ({"strength": 0.5}, "strength applies to an input image"),
                ({"image": good, "strength": 0.2, "steps": 4}, "steps x strength (4 x 0.2) is less than one"),
                ({"image": good, "strength": 1.5}, "less than or equal to 1"),
                ({"init_image": good}, "init_image: this API calls it 'image'"),
                ({"image": good, "controlnet_conditioning_scale": 1.0}, "needs control_image"),
            ]
            for extra, message in bad:
                r = http.post("/v1/images", json={"prompt": "x", **extra})
                assert r.status_code == 422 and message in r.text, (list(extra), r.status_code, r.text[:300])
                assert len(r.content) < 2000  # the image is not echoed back
            assert runner.calls == []
            r = http.post("/v1/images", json={"prompt": "x", "image": "data:image/png;base64," + good, "seed": 3,
                                              "strength": 0.5})
            assert r.status_code == 200 and _image(r.content).size == (48, 32)  # the image's size, served
            call = runner.calls[-1]
            assert (call["height"], call["width"], call["strength"]) == (32, 48, 0.5)
            assert np.array_equal(call["image"], np.asarray(picture)) and call.get("mask") is None
            wrapped = "\n".join(good[i:i + 76] for i in range(0, len(good), 76))  # `base64` without -w0
            jpeg = _b64(_noise(64, 64), "JPEG")
            for image in (wrapped, jpeg):
                assert http.post("/v1/images", json={"prompt": "x", "image": image}).status_code == 200
            assert runner.calls[-1]["image"].shape == (64, 64, 3) and runner.calls[-1]["strength"] is None
            assert http.post("/v1/images", json={"prompt": "still serving"}).status_code == 200
    finally:
        server.close()


@pytest.mark.parametrize("kind, given, message", [
    ("inpainting", {"image": (32, 48)}, "(inpainting): give image and mask"),
    ("inpainting", {}, "(inpainting): give image and mask"),
    ("inpainting", {"image": (32, 48), "mask": (64, 64)}, "mask is 64x64 (HxW) but the output size is 32x48"),
    ("inpainting", {"image": (32, 48), "mask": (32, 48)}, None),
    ("controlnet", {}, "(ControlNet): give control_image"),
    ("controlnet", {"image": (32, 48)}, "which takes no input image"),
    ("controlnet", {"control_image": (64, 64)}, None),
])
def test_inpainting_and_controlnet_inputs_follow_the_model(kind, given, message):
    from paradiff.serve.inputs import PipelineInputs

    runner = FakeRunner()
    server = InProcessServer(runner, inputs=PipelineInputs(kind, "SomePipeline", strength=1.0 if kind == "inpainting"
                                                           else None))
    body = {"prompt": "x", **{name: _b64(_noise(*size, "L" if name == "mask" else "RGB")) for name, size in
                              given.items()}}
    try:
        r = httpx.post(server.url + "/v1/images", json=body, timeout=30)
        if message is not None:
            assert r.status_code == 422 and message in r.text, r.text[:300]
            return
        assert r.status_code == 200, r.text[:300]
        call = runner.calls[-1]
        for name, size in given.items():
            assert call[name].shape == (*size, 1 if name == "mask" else 3)
    finally:
        server.close()


def test_the_default_body_limit_fits_the_images_of_the_largest_size():
    """A 1024x1024 noise PNG (incompressible: about the worst case) in base64 fits the default limit of an img2img
    server; a text-only server keeps 64 KiB; the mask and control images add their room."""
    from paradiff.serve.inputs import TEXT_BODY_BYTES, PipelineInputs, body_limit

    sizes = [(512, 512), (1024, 1024)]
    text_only = PipelineInputs("text-to-image", "P")
    img2img = PipelineInputs("text-to-image", "P", img2img=True)
    inpaint = PipelineInputs("inpainting", "P")
    body = json.dumps({"prompt": "x" * 2000, "image": _b64(_noise(1024, 1024)), "strength": 0.5})
    assert body_limit(sizes, text_only) == TEXT_BODY_BYTES
    assert len(body) < body_limit(sizes, img2img) < 1.1 * len(body) + TEXT_BODY_BYTES
    mask = _b64(_noise(1024, 1024, "L"))
    assert len(body) + len(mask) < body_limit(sizes, inpaint) < body_limit(sizes, img2img) + 1.1 * len(mask)


@pytest.mark.parametrize("backend", ["isal", "zlib"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (17, 33, 3), (64, 48, 1), (40, 40, 4), (96, 64, 3)])
def test_the_parallel_png_encoder_is_lossless(shape, backend, monkeypatch):
    """Bands deflated apart and joined (several bands: a small band size) decode to the same pixels, noise and
    smooth rows alike (every filter type gets chosen), with ISA-L's deflate and with zlib's."""
    import zlib

    from PIL import Image

    from paradiff.serve import png

    monkeypatch.setattr(png, "BAND_BYTES", 1000)
    monkeypatch.setattr(png, "deflate", pytest.importorskip("isal.isal_zlib") if backend == "isal" else zlib)
    rng = np.random.default_rng(shape[0])
    smooth = np.cumsum(rng.integers(0, 3, shape), axis=1).astype(np.uint8)
    pixels = np.concatenate([rng.integers(0, 256, shape, dtype=np.uint8), smooth, smooth.transpose(1, 0, 2)[
        :shape[0], :shape[1]] if shape[0] == shape[1] else smooth])
    decoded = Image.open(io.BytesIO(png.encode_png(pixels[:, :, 0] if shape[2] == 1 else pixels)))
    assert decoded.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    assert np.array_equal(np.asarray(decoded).reshape(pixels.shape), pixels)


def test_band_checksums_combine_into_the_checksum_of_the_whole():
    import zlib

    from paradiff.serve import png

    rng = np.random.default_rng(0)
    for _ in range(100):
        a, b = rng.bytes(int(rng.integers(0, 5000))), rng.bytes(int(rng.integers(0, 70000)))
        assert png._adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


def test_compile_without_a_parallel_method_compiles_the_denoiser_in_place():
    """`--compile --method none` (serve's one-rank baseline): the UNet itself is compiled (reduce-overhead), so the
    Img2Img pipeline made with from_pipe shares the compiled module."""
    from paradiff.cli import build_parser
    from paradiff.commands.common import methods_from_args
    from paradiff.commands.generate import compile_serial
    from paradiff.serve.server import serving_pipelines
    from support.models import tiny_sd_pipeline

    args = build_parser().parse_args(["serve", "--compile"])
    assert methods_from_args(args) == [] and args.compile
    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    compile_serial(pipe)
    _, img2img = serving_pipelines(pipe)
    assert pipe.unet is unet and img2img.unet is unet and unet._compiled_call_impl is not None


def _tiny_controlnet_pipeline():
    """A tiny random StableDiffusionControlNetPipeline: the tiny SD pipeline and a ControlNet made from its UNet."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from support.models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))  # VAE x2
    pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.controlnet):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_controlnet_pipeline_takes_control_image_and_equals_the_pipeline_call():
    """Served serially (method none, one rank): control_image is the ControlNet's conditioning; with image too it
    is ControlNet image-to-image (from_pipe). Both equal diffusers' own calls with the same seed."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from paradiff.commands.generate import generators, pipeline_kwargs
    from paradiff.serve.server import make_runner, serving_pipelines

    pipe = _tiny_controlnet_pipeline()
    inputs, img2img = serving_pipelines(pipe)
    assert (inputs.kind, inputs.img2img, inputs.image_fields()) == ("controlnet", True, ("image", "control_image"))
    assert isinstance(img2img, StableDiffusionControlNetImg2ImgPipeline)
    server = InProcessServer(make_runner(pipe, embedded_model=False, img2img=img2img), sizes=[(32, 32)], steps=2,
                             inputs=inputs)
    control, picture = _noise(32, 32, seed=1), _noise(32, 32, seed=2)
    call = pipeline_kwargs(steps=2, size=(32, 32))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.post("/v1/images", json={"prompt": "a red circle", "seed": 4, "control_image": _b64(control),
                                              "controlnet_conditioning_scale": 0.7})
            assert r.status_code == 200, r.text
            expected = pipe("a red circle", image=control, controlnet_conditioning_scale=0.7, generator=generators(4),
                            **call).images[0]
            assert np.array_equal(np.asarray(_image(r.content)), np.asarray(expected))
            r = http.post("/v1/images", json={"prompt": "a red circle", "seed": 5, "image": _b64(picture),
                                              "control_image": _b64(control), "strength": 0.5})
            assert r.status_code == 200, r.text
            del call["height"], call["width"]
            expected = img2img("a red circle", image=picture, control_image=control, strength=0.5,
                               generator=generators(5), **call).images[0]
            assert np.array_equal(np.asarray(_image(r.content)), np.asarray(expected))
            r = http.post("/v1/images", json={"prompt": "x", "control_image": _b64(_noise(32, 32)), "mask": "eA=="})
            assert r.status_code == 422 and "mask needs image" in r.text
    finally:
        server.close()


def _post_in_thread(url, body, results, key):
    def post():
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/images", json=body)
            results[key] = (r.status_code, r.headers.get("X-Seed"), r.headers.get("Retry-After"), r.text[:200])

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_overload_disconnect_deadline_and_drain():
    runner = FakeRunner()
    server = InProcessServer(runner, max_queue=3, ready=False)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            r = http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading" and "Retry-After" in r.headers
            r = http.post("/v1/images", json={"prompt": "too early"})
            assert r.status_code == 503 and "loading" in r.text and int(r.headers["Retry-After"]) > 0
            server.start_loop()
            runner.gate.clear()  # the ranks are busy with the first request until the gate opens
            results, threads = {}, []
            threads.append(_post_in_thread(server.url, {"prompt": "A", "seed": 1}, results, "A"))
            _wait(runner.started.is_set)
            for name, seed in (("B", 2), ("C", 3)):
                threads.append(_post_in_thread(server.url, {"prompt": name, "seed": seed}, results, name))
            _wait(lambda: server.dispatcher.depth() == 2)
            # a client that goes away while queued: its request never reaches the ranks
            body = json.dumps({"prompt": "gone", "seed": 9}).encode()
            gone = socket.create_connection(("127.0.0.1", server.http.address[1]))
            gone.sendall(b"POST /v1/images HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            _wait(lambda: server.dispatcher.depth() == 3)
            r = http.post("/v1/images", json={"prompt": "D"})
            assert r.status_code == 503 and "queue is full" in r.text and int(r.headers["Retry-After"]) >= 1
            gone.close()
            _wait(lambda: server.dispatcher.depth() == 2)
            threads.append(_post_in_thread(server.url, {"prompt": "E", "seed": 5}, results, "E"))
            _wait(lambda: server.dispatcher.depth() == 3)
            # SIGTERM's effect: refuse new requests, finish the accepted ones, then stop
            server.dispatcher.request_stop()
            r = http.post("/v1/images", json={"prompt": "late"})
            assert r.status_code == 503 and "shutting down" in r.text
            assert http.get("/health").json()["status"] == "draining"
            runner.gate.set()
            for thread in threads:
                thread.join(30)
            server.loop.join(10)
            assert not server.loop.is_alive() and server.dispatcher.phase.value == "stopped"
            assert {k: v[:2] for k, v in results.items()} == {"A": (200, "1"), "B": (200, "2"), "C": (200, "3"),
                                                              "E": (200, "5")}
            prompts = [c["prompt"] for c in runner.calls]  # B and C were sent at the same time: either order
            assert prompts[0] == "A" and sorted(prompts[1:3]) == ["B", "C"] and prompts[3:] == ["E"]  # not "gone"
            samples = metric_samples(server.metrics.render()[0].decode())
            assert sample(samples, "paradiff_failures_total", reason="disconnected") == 1
            assert sample(samples, "paradiff_failures_total", reason="overloaded") == 1
            assert sample(samples, "paradiff_failures_total", reason="not_ready") == 2
    finally:
        runner.gate.set()
        server.close()


def test_request_deadline():
    runner = FakeRunner()
    server = InProcessServer(runner, timeout_s=0.6)
    try:
        runner.gate.clear()
        results = {}
        first = _post_in_thread(server.url, {"prompt": "slow"}, results, "running")
        _wait(runner.started.is_set)
        second = _post_in_thread(server.url, {"prompt": "waits"}, results, "queued")
        first.join(20)
        second.join(20)
        assert results["running"][0] == 504 and "while generating" in results["running"][3]
        assert results["queued"][0] == 504 and "in the queue" in results["queued"][3]
        runner.gate.set()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/images", json={"prompt": "fast"}).status_code == 200
        assert [c["prompt"] for c in runner.calls] == ["slow", "fast"]
    finally:
        runner.gate.set()
        server.close()


# -- the rank loop on 2 gloo ranks -------------------------------------------------------------------------------


def _loop_on_two_ranks():
    from paradiff import runtime
    from paradiff.serve.dispatch import Dispatcher, RankFailure

    rt = runtime.get()
    calls = []

    def runner(params):
        calls.append(params["prompt"])
        if params["prompt"] == "fails everywhere" or (params["prompt"] == "fails on rank 1" and rt.rank == 1):
            raise ValueError("no")
        return [f"{params['prompt']} on rank {rt.rank}"]

    d = Dispatcher(runner, max_queue=8, rank=rt.rank, world_size=rt.world_size, device=rt.device, tick_s=0.05,
                   log=lambda line: None)
    jobs = []

    def client():
        _wait(lambda: d.phase.value == "ready")
        for prompt in ("a", "b", "fails everywhere", "c", "fails on rank 1", "never runs"):
            jobs.append(d.submit({"prompt": prompt}))
            if prompt != "fails on rank 1":  # "never runs" is queued before request 5 can fail (a race otherwise)
                time.sleep(0.15)  # ticks in between

    if rt.is_main:
        threading.Thread(target=client, daemon=True).start()
    try:
        d.run()
        error = None
    except RankFailure as err:
        error = str(err)
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.future.result(5))
        except Exception as err:  # noqa: BLE001
            outcomes.append(type(err).__name__)
    return calls, error, outcomes, d.phase.value


@pytest.mark.slow
def test_every_rank_runs_the_same_requests_and_an_inconsistent_failure_stops_all():
    from support.distributed import run_ranks

    (calls0, error0, outcomes, phase0), (calls1, error1, _, phase1) = run_ranks(_loop_on_two_ranks, 2, timeout=120)
    assert calls0 == calls1 == ["a", "b", "fails everywhere", "c", "fails on rank 1"]
    assert outcomes == [["a on rank 0"], ["b on rank 0"], "ValueError", ["c on rank 0"], "ServerStopping",
                        "ServerStopping"]
    for error in (error0, error1):
        assert "request 5 failed on rank(s) 1 but not on the others" in error
    assert phase0 == "failed"


def _rank1_stops_responding():
    from paradiff import runtime
    from paradiff.serve.dispatch import Dispatcher, RankFailure

    rt = runtime.get()
    if rt.rank == 1:
        time.sleep(8)  # alive but never takes part again, as a stuck process
        return None
    d = Dispatcher(lambda params: [], rank=0, world_size=2, device=rt.device, log=lambda line: None)
    start = time.monotonic()
    try:
        d.run()
    except RankFailure as err:
        return time.monotonic() - start, str(err), d.phase.value
    return None


@pytest.mark.slow
def test_an_idle_rank_that_stops_responding_is_found_within_the_timeout():
    from support.distributed import run_ranks

    seconds, error, phase = run_ranks(_rank1_stops_responding, 2, env={"PARADIFF_TIMEOUT": "3"}, timeout=120)[0]
    assert "a rank died or stopped responding" in error and "Timed out" in error
    assert phase == "failed"
    assert seconds < 3 + 3, f"found after {seconds:.1f} s"


# -- the real CLI: `paradiff serve --nproc 2` with the reference model -------------------------------------------

STEPS = 4
SPECS = [  # (prompt, seed, guidance, negative prompt): 8 different generations, each requested 4 times
    ("a red circle on the left, blue background", 1, None, None),
    ("a large yellow star at the top, purple background", 2, None, None),
    ("a small green square on the right, white background", 3, 5.0, None),
    ("a blue triangle in the middle, orange background", 4, None, "red"),
    ("a purple circle at the bottom, yellow background", 5, 2.0, None),
    ("a large white star in the middle, black background", 6, None, None),
    ("a small orange square at the top, green background", 7, None, None),
    ("a red triangle on the right, gray background", 8, 4.0, "blue"),
]
SERVED = {"images": 0, "overloaded": 0}  # what the tests below got from the shared server, for the metrics check


def _generate_args(prompt, seed, guidance, negative, method="patch"):
    from paradiff.cli import build_parser

    argv = ["generate", prompt, "--method", method, "--steps", str(STEPS), "--size", "128", "--seed", str(seed)]
    if guidance is not None:
        argv += ["--guidance", str(guidance)]
    if negative is not None:
        argv += ["--negative-prompt", negative]
    return build_parser().parse_args(argv)


IMG2IMG = [(11, 0.6), (12, 1.0)]  # (seed, strength) of the image-to-image requests, from _picture()


def _picture():
    """The input picture of the image-to-image requests: a yellow disc on blue, 128x128."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 128), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((24, 40, 88, 104), fill=(240, 220, 40))
    return image


def _generate_reference(specs):
    """What `paradiff generate --method patch --nproc 2 ...` makes for each spec (generate's own functions), and
    the image-to-image calls of IMG2IMG through `StableDiffusionImg2ImgPipeline.from_pipe` of that pipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from paradiff.commands.generate import call_kwargs, generators, prepare_pipeline, pipeline_kwargs

    rt, pipe = prepare_pipeline(_generate_args(*specs[0]))
    images = []
    for spec in specs:
        args = _generate_args(*spec)
        images.append(np.asarray(pipe(args.prompt, generator=generators(args.seed), **call_kwargs(args)).images[0]))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    changed = []
    for seed, strength in IMG2IMG:
        kwargs = pipeline_kwargs(steps=STEPS, embedded_model=True)
        changed.append(np.asarray(img2img(specs[0][0], image=_picture(), strength=strength,
                                          generator=generators(seed), **kwargs).images[0]))
    return (images, changed) if rt.is_main else None


def _body(spec, **extra):
    prompt, seed, guidance, negative = spec
    body = {"prompt": prompt, "seed": seed, **extra}
    if guidance is not None:
        body["guidance"] = guidance
    if negative is not None:
        body["negative_prompt"] = negative
    return body


@pytest.fixture(scope="module")
def patch_server(tmp_path_factory):
    """One `serve --nproc 2 --method patch` for the tests below; /health is polled from the moment it listens."""
    log = tmp_path_factory.mktemp("serve") / "patch-server.log"
    server = CliServer("--nproc", "2", "--method", "patch", "--steps", str(STEPS), "--sizes", "128",
                       "--max-queue", "8", "--timeout", "180", env={"PARADIFF_API_KEY": KEY}, log_path=str(log))
    try:
        server.wait_listening()
        server.health_codes = []

        def poll():
            end = time.monotonic() + 300
            while time.monotonic() < end:
                try:
                    code = httpx.get(server.url + "/health", timeout=5).status_code
                except httpx.HTTPError:
                    code = None
                server.health_codes.append(code)
                if code == 200:
                    return
                time.sleep(0.2)

        server.poller = threading.Thread(target=poll, daemon=True)
        server.poller.start()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def references():
    from support.distributed import run_ranks

    return run_ranks(_generate_reference, 2, SPECS, timeout=300)[0]


@pytest.fixture(scope="module")
def reference(references):
    return references[0]


@pytest.mark.slow
def test_image_to_image_requests_equal_the_img2img_pipeline(patch_server, references):
    """An image on the embedded (text-to-image) model runs its Img2Img pipeline, with the patch-parallel UNet on 2
    ranks: the served image equals the same from_pipe call's; a bad image is a 422 and the server serves on."""
    from paradiff.client import Client

    patch_server.poller.join(300)
    client = Client(patch_server.url, api_key=KEY, timeout=240)
    for (seed, strength), expected in zip(IMG2IMG, references[1]):
        image = client.generate(SPECS[0][0], seed=seed, strength=strength, image=_picture())
        assert np.array_equal(np.asarray(image), expected), (seed, strength)
    auth = {"X-API-Key": KEY}
    r = httpx.post(patch_server.url + "/v1/images", json={"prompt": "x", "image": _b64(_noise(64, 64))},
                   headers=auth, timeout=60)
    assert r.status_code == 422 and "not a size this server serves (128x128)" in r.text
    r = httpx.post(patch_server.url + "/v1/images", json={"prompt": "x", "image": _b64(_picture()), "mask": "eA=="},
                   headers=auth, timeout=60)
    assert r.status_code == 422 and "mask is for inpainting models" in r.text
    assert httpx.get(patch_server.url + "/health", timeout=10).json()["image_inputs"] == ["image"]
    SERVED["images"] += len(IMG2IMG)


@pytest.mark.slow
def test_concurrent_clients_get_the_images_generate_makes(patch_server, reference):
    from paradiff.client import Client

    patch_server.poller.join(300)
    codes = patch_server.health_codes
    assert codes[-1] == 200 and 503 in codes and 200 not in codes[:-1], codes  # 503 until warm-up ended
    results, errors = {}, []

    def client(c):
        api = Client(patch_server.url, api_key=KEY, timeout=240)
        for j in range(4):
            k = (c + 3 * j) % len(SPECS)
            prompt, seed, guidance, negative = SPECS[k]
            try:
                image = api.generate(prompt, seed=seed, guidance=guidance, negative_prompt=negative)
                results[(c, j)] = (k, np.asarray(image))
            except Exception as err:  # noqa: BLE001
                errors.append(repr(err))

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    seconds = time.monotonic() - start
    assert errors == [] and len(results) == 32
    for k, image in results.values():
        assert image.shape == (128, 128, 3) and np.array_equal(image, reference[k]), f"spec {k} differs"
    SERVED["images"] += 32
    # n = 2: image i is seed + i's image, up to the rounding of the batched call
    pair = Client(patch_server.url, api_key=KEY).generate(SPECS[0][0], seed=SPECS[0][1], n=2)
    assert len(pair) == 2
    assert np.abs(np.asarray(pair[0]).astype(int) - reference[0].astype(int)).max() <= 2
    SERVED["images"] += 2
    print(f"32 requests from 8 clients in {seconds:.1f} s")


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_server_keeps_serving(patch_server, reference):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = patch_server.url + "/v1/images"
    with httpx.Client(timeout=120) as http:
        assert http.post(url, content=b"{not json", headers={**auth, "Content-Type": "application/json"}
                         ).status_code == 422
        assert http.post(url, json={"prompt": "x", "size": "256x256"}, headers=auth).status_code == 422
        assert http.post(url, json={"prompt": "x", "sampler": "euler"}, headers=auth).status_code == 422
        assert http.post(url, json={"prompt": "x" * 300_000}, headers=auth).status_code == 413
        assert http.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.post(url, json={"prompt": "x"}).status_code == 401
        r = http.post(url, json=_body(SPECS[1]), headers=auth)
    assert r.status_code == 200 and np.array_equal(np.asarray(_image(r.content)), reference[1])
    SERVED["images"] += 1


@pytest.mark.slow
def test_overload_gives_503_and_loses_none_of_the_accepted(patch_server, reference):
    """20 requests at once at a queue of 8: the ones refused get 503 + Retry-After, every accepted one its image."""
    results = {}

    def post(i):
        k = i % len(SPECS)
        r = httpx.post(patch_server.url + "/v1/images", json=_body(SPECS[k]), headers={"X-API-Key": KEY},
                       timeout=240)
        results[i] = (k, r.status_code, r.headers.get("Retry-After"), r.content)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(results) == 20
    refused = [r for r in results.values() if r[1] == 503]
    accepted = [r for r in results.values() if r[1] == 200]
    assert len(refused) + len(accepted) == 20 and refused and len(accepted) >= 9
    assert all(int(r[2]) >= 1 for r in refused)
    for k, _, _, content in accepted:
        assert np.array_equal(np.asarray(_image(content)), reference[k])
    SERVED["images"] += len(accepted)
    SERVED["overloaded"] += len(refused)


@pytest.mark.slow
def test_metrics_parse_and_count_what_was_served(patch_server):
    r = httpx.get(patch_server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    assert sample(samples, "paradiff_images_total", size="128x128") == SERVED["images"]
    assert sample(samples, "paradiff_failures_total", reason="overloaded") == SERVED["overloaded"]
    assert sample(samples, "paradiff_ready") == 1 and sample(samples, "paradiff_queue_depth") == 0
    assert sample(samples, "paradiff_generation_seconds_count", size="128x128") > 0
    assert httpx.get(patch_server.url + "/metrics", timeout=30).status_code == 401


@pytest.mark.slow
def test_sigterm_drains_the_queue_and_exits_0(patch_server, reference):
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, httpx.post(
        patch_server.url + "/v1/images", json=_body(SPECS[i]), headers={"X-API-Key": KEY}, timeout=240)))
        for i in range(4)]
    for thread in threads:
        thread.start()
    queued = []

    def accepted():  # answered, queued or running: every one of the 4 was taken before the SIGTERM
        health = httpx.get(patch_server.url + "/health", timeout=5).json()
        queued[:] = [health["queue"]]
        return len(results) + health["queue"] + int(bool(health["busy"])) >= 4

    _wait(accepted, timeout=60)
    start = time.monotonic()
    patch_server.proc.send_signal(__import__("signal").SIGTERM)  # what a supervisor sends to the launcher
    _wait(lambda: httpx.get(patch_server.url + "/health", timeout=5).status_code == 503, timeout=10)
    late = httpx.post(patch_server.url + "/v1/images", json=_body(SPECS[0]), headers={"X-API-Key": KEY}, timeout=30)
    assert late.status_code == 503 and "shutting down" in late.text
    for thread in threads:
        thread.join(120)
    assert rc_after(patch_server, 60) == 0, patch_server.output()
    assert sorted(results) == [0, 1, 2, 3]
    for i, r in results.items():
        assert r.status_code == 200 and np.array_equal(np.asarray(_image(r.content)), reference[i])
    output = patch_server.output()
    assert "stopped cleanly" in output and "Traceback" not in output
    print(f"drained {queued[0]} queued requests and stopped {time.monotonic() - start:.1f} s after SIGTERM")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_inpainting_requests_equal_generate_with_image_and_mask(tmp_path):
    """A saved tiny inpainting model served on 2 ranks (patch): image + mask gives `paradiff generate --image --mask`'s
    image with the same seed and method; the inputs it needs are required (422), and the warm-up inpainted."""
    from PIL import Image

    from cli_utils import run_cli
    from support.models import tiny_sd_inpaint_pipeline

    tiny_sd_inpaint_pipeline().save_pretrained(tmp_path / "inpaint")
    picture, mask = _noise(32, 32, seed=3), np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    picture.save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", str(tmp_path / "inpaint"), "--method", "patch", "--nproc", "2", "--warmup-steps", "2"]
    server = CliServer(*common, "--steps", "2", "--sizes", "32", log_path=str(tmp_path / "log"))
    try:
        server.wait_listening()
        proc, _ = run_cli("generate", "a red circle", *common, "--image", str(tmp_path / "image.png"), "--mask",
                          str(tmp_path / "mask.png"), "--steps", "2", "--seed", "6", "-o", str(tmp_path / "out.png"))
        assert proc.returncode == 0, proc.stderr
        expected = np.asarray(Image.open(tmp_path / "out.png"))
        _wait(lambda: httpx.get(server.url + "/health", timeout=5).status_code == 200, timeout=240)
        url = server.url + "/v1/images"
        r = httpx.post(url, json={"prompt": "a red circle", "seed": 6, "image": _b64(picture),
                                  "mask": _b64(Image.fromarray(mask))}, timeout=120)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(_image(r.content)), expected)
        r = httpx.post(url, json={"prompt": "x", "image": _b64(picture)}, timeout=60)
        assert r.status_code == 422 and "(inpainting): give image and mask" in r.text
        r = httpx.post(url, json={"prompt": "x", "image": _b64(picture), "mask": _b64(_noise(32, 16, "L"))},
                       timeout=60)
        assert r.status_code == 422 and "mask is 32x16 (HxW) but the output size is 32x32" in r.text
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["image_inputs"] == ["image", "mask"] and health["pipeline"] == "StableDiffusionInpaintPipeline"
    finally:
        server.kill()


def rc_after(server, timeout):
    try:
        return server.proc.wait(timeout)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
        return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_server_with_an_error(tmp_path):
    import signal

    server = CliServer("--nproc", "2", "--method", "cfg", "--steps", str(STEPS), log_path=str(tmp_path / "log"))
    try:
        server.wait_listening()
        _wait(lambda: httpx.get(server.url + "/health", timeout=5).status_code == 200, timeout=240)
        assert httpx.post(server.url + "/v1/images", json={"prompt": "a red circle"}, timeout=120).status_code == 200
        result = {}
        inflight = threading.Thread(target=lambda: result.__setitem__("r", _post_or_error(server.url)))
        inflight.start()
        rank1 = server.rank_pids()[1]
        start = time.monotonic()
        __import__("os").kill(rank1, signal.SIGKILL)
        rc = rc_after(server, 60)
        seconds = time.monotonic() - start
        inflight.join(30)
        output = server.output()
        assert rc not in (None, 0), output
        assert seconds < 60
        assert "rank 1 failed (killed by SIGKILL" in output
        assert result["r"] in (503, "connection error"), result  # answered or cut, not left hanging
        print(f"ended {seconds:.1f} s after rank 1 was killed (exit {rc})")
    finally:
        server.kill()


def _post_or_error(url):
    try:
        return httpx.post(url + "/v1/images", json={"prompt": "in flight", "steps": 20}, timeout=90).status_code
    except httpx.HTTPError:
        return "connection error"


@pytest.mark.parametrize("args, env, message", [
    (["--nproc", "2"], {}, "needs a parallel --method"),
    (["--steps", "200", "--max-steps", "100"], {}, "--steps 200 is more than --max-steps 100"),
    (["--sizes", "128x100"], {}, "multiples of 8"),
    ([], {"PARADIFF_API_KEY": " "}, "the API key is empty"),
    (["--port", "PORT_IN_USE"], {}, "cannot listen on 127.0.0.1:"),
])
def test_serve_mistakes_give_one_clear_line(args, env, message):
    from cli_utils import run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [str(busy.getsockname()[1]) if a == "PORT_IN_USE" else a for a in args]
        proc, seconds = run_cli("serve", *args, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_bench_runs_end_to_end_on_a_tiny_model(tmp_path):
    """benchmarks/serve_bench.py --tiny: the GPU section's stages (build and save, serve, load, drain, bare call,
    report) on the CPU, so the one-GPU run works the first time."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/serve_bench.py", "--tiny", "--out", str(out), "--solo", "2",
                           "--clients", "2", "--requests", "2", "--bare-runs", "1", "--model-dir",
                           str(tmp_path / "model")], capture_output=True, text=True, timeout=580,
                          cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "serve_bench.json").read_text())
    assert report["serve"]["server_exit"] == 0 and report["serve"]["stopped_cleanly"]
    assert report["serve"]["load"]["solo"]["ok"] == 2 and report["serve"]["load"]["load"]["ok"] == 2
    assert len(report["bare"]["seconds"]) == len(report["bare"]["pixels_seconds"]) == 1
    assert report["overhead"]["bare_ratio"] is not None and report["overhead"]["bare_pixels_p50_s"] > 0
    assert "Target <= 3 % at p50" in (out / "serve_bench.md").read_text()


def test_to_pixels_gives_diffusers_pixels_as_contiguous_rows():
    """The server's uint8 images equal diffusers' own PIL conversion, and are C-contiguous (H, W, C): the PNG
    encoder reads rows of interleaved channels, so a planar array would cost it a copy."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from paradiff.serve.server import to_pixels

    images = torch.rand(2, 3, 8, 6)
    pixels = to_pixels(images)
    expected = [np.asarray(p) for p in VaeImageProcessor().postprocess(images * 2 - 1, output_type="pil")]
    assert all(p.flags.c_contiguous and p.shape == (8, 6, 3) for p in pixels)
    assert all(np.array_equal(p, e) for p, e in zip(pixels, expected))
