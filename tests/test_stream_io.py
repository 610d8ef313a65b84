"""Stream IO and filter: bounded drop-oldest queues, frame order through the loop (lag undone for files),
the similarity filter's skip statistics without host syncs, and the `paradiff stream` command on a tiny pipe."""

import threading
import time

import numpy as np
import pytest
import torch
from test_stream import NoScalarReads

from paradiff.errors import UserError
from paradiff.stream import io

torch.set_num_threads(1)


def test_queue_drops_oldest_and_stays_bounded():
    q = io.FrameQueue(3, drop=True)
    for i in range(10):
        q.put(i)
        assert len(q) <= 3
    assert q.dropped == 7
    assert [q.get(), q.get(), q.get()] == [7, 8, 9]
    with pytest.raises(TimeoutError):
        q.get(timeout=0.01)
    q.close()
    with pytest.raises(io.Closed):
        q.get()


def test_blocking_queue_waits_instead_of_dropping():
    q = io.FrameQueue(2, drop=False)
    q.put(0)
    q.put(1)
    done = threading.Event()

    def producer():
        q.put(2)  # waits until a slot frees
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.1)
    assert q.get() == 0
    assert done.wait(2)
    assert [q.get(), q.get()] == [1, 2] and q.dropped == 0
    t.join()


class DelayStream:
    """Stand-in for StreamPipeline with its lag: call c returns the frames of call c-(k-1) (warm-started)."""

    def __init__(self, steps=3, frame_buffer_size=1, size=8, delay=0.0):
        self.steps, self.frame_buffer_size, self.height, self.width = steps, frame_buffer_size, size, size
        self.device = torch.device("cpu")
        self.delay = delay
        self.history = []
        self._out = torch.zeros(frame_buffer_size, size, size, 3, dtype=torch.uint8)

    def __call__(self, batch):
        time.sleep(self.delay)
        self.history.append(batch.clone())
        self._out.copy_(self.history[max(0, len(self.history) - self.steps)])
        return self._out

    def stats(self):
        return {"frames": 0, "skipped": 0}


def _numbered(n, size=8):
    return [np.full((size, size, 3), i, np.uint8) for i in range(n)]


class ListSink:
    def __init__(self):
        self.frames = []

    def write(self, frame):
        self.frames.append(frame)

    def close(self):
        pass


@pytest.mark.parametrize("steps,fbs,n", [(3, 1, 7), (2, 2, 9), (1, 1, 4)])
def test_file_run_keeps_every_frame_in_order(steps, fbs, n):
    sink = ListSink()
    stats = io.run(DelayStream(steps, fbs), io.Source(iter(_numbered(n)), live=False), sink, queue_size=2,
                   progress=False)
    assert [int(f[0, 0, 0]) for f in sink.frames] == list(range(n))
    assert stats.frames_in == stats.frames_out == n and stats.dropped == 0


def test_live_run_drops_oldest_under_overload():
    def camera():
        for frame in _numbered(60):
            time.sleep(0.001)
            yield frame

    sink = ListSink()
    stats = io.run(DelayStream(1, delay=0.02), io.Source(camera(), live=True), sink, queue_size=2, progress=False)
    got = [int(f[0, 0, 0]) for f in sink.frames]
    assert stats.dropped > 20  # the GPU loop is ~10x slower than the camera
    assert stats.frames_out + stats.dropped == 60
    assert got == sorted(got) and got[-1] == 59  # newest frames survive, order kept


def test_sources_and_sinks(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((30, 40, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    src = io.open_source(str(tmp_path), (16, 16))
    frames = list(src.frames)
    assert len(frames) == 3 and frames[0].shape == (16, 16, 3) and not src.live
    gif = tmp_path / "out.gif"
    sink = io.open_sink(str(gif), 10)
    for f in frames:
        sink.write(f)
    sink.close()
    assert len(list(io.open_source(str(gif)).frames)) == 3
    with pytest.raises(UserError, match="no such file"):
        io.open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        io.open_source(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not an image"):
        io.open_sink(str(tmp_path / "out.png"))


# --------------------------------------------------------------------------------------- similarity filter
def _static(n, rng):
    base = rng.integers(0, 256, (64, 64, 3))
    return [np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _moving(n, rng):
    """A textured scene panning 3 px per frame, like a handheld camera."""
    from PIL import Image

    big = np.asarray(Image.fromarray(rng.integers(0, 256, (24, 96, 3), dtype=np.uint8)).resize((384, 96)))
    return [np.ascontiguousarray(big[16:80, 3 * i:3 * i + 64]) for i in range(n)]


def test_filter_skip_rates_static_vs_moving():
    from paradiff.stream.similarity import SimilarityFilter

    rng = np.random.default_rng(0)
    rates = {}
    for name, clip in (("static", _static(100, rng)), ("moving", _moving(100, rng))):
        filt = SimilarityFilter(0.98, 10, (1, 3, 64, 64), "cpu")
        on = torch.ones((), dtype=torch.bool)
        for frame in clip:
            filt.decide(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1, on)
        rates[name] = filt.stats()["skipped"] / filt.stats()["frames"]
    assert rates["static"] >= 0.8, rates
    assert rates["moving"] < 0.05, rates


def test_filter_in_stream_repeats_output_without_host_sync(monkeypatch):
    from paradiff import StreamPipeline
    from support.models import tiny_stream_pipeline

    stream = StreamPipeline(tiny_stream_pipeline(), [30, 45], similarity_filter=0.98, max_skip_frames=3)
    stream.prepare("a red circle")
    rng = np.random.default_rng(1)
    clip = [torch.from_numpy(f) for f in _static(10, rng)] + [torch.from_numpy(f) for f in _moving(4, rng)]

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the stream step")

    outs = []
    # the decision must stay a device tensor: no .item()/bool() from Python, and no tensor-to-scalar read from
    # C++ either (aten._local_scalar_dense: e.g. indexing with a 0-dim tensor), which would break CUDA graphs
    with monkeypatch.context() as m, NoScalarReads():
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "__bool__", no_sync)
        for frame in clip:
            outs.append(stream(frame).clone())
    stats = stream.stats()
    assert stats["frames"] == 14
    # 9 static repeats: runs of at most 3 skips, then a forced refresh
    assert 6 <= stats["skipped"] <= 9
    assert torch.equal(outs[1], outs[0])  # a skipped frame repeats the last output
    assert not torch.equal(outs[-1], outs[-2])  # a moving scene is processed


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_stream_folder_to_folder(tmp_path, capsys):
    from PIL import Image

    from paradiff.cli import main

    frames = tmp_path / "in"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(frames / f"{i:02d}.png")
    out = tmp_path / "out"
    code = main(["stream", "--tiny", "--input", str(frames), "-o", str(out), "--prompt", "a red square",
                 "--t-index", "30,40,45", "--guidance", "self", "--size", "64", "--device", "cpu"])
    assert code == 0
    assert len(list(out.glob("frame_*.png"))) == 5
    assert "5 frames" in capsys.readouterr().out
    code = main(["stream", "--tiny", "--input", str(frames), "-o", str(out), "--prompt", "x", "--t-index", "30,60",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "outside the schedule" in err[0]
    assert main(["stream", "--tiny", "--input", str(frames), "--prompt", "x"]) == 2


def test_cli_stream_with_controlnet_lora_and_sdxl(tmp_path, capsys):
    """--controlnet (a derived map, or a fixed --control-image), --lora with a live scale, --tiny sdxl; a LoRA for
    another model and a ControlNet without maps are one line each."""
    from PIL import Image

    from paradiff.cli import main
    from test_stream_lora import _make_lora

    frames = tmp_path / "in"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(frames / f"{i:02d}.png")
    Image.fromarray(np.eye(64, dtype=np.uint8)[..., None].repeat(3, 2) * 255).save(tmp_path / "edges.png")
    lora = _make_lora(tmp_path / "lora", 1)
    common = ["stream", "--input", str(frames), "--prompt", "a red square", "--t-index", "30,45", "--device", "cpu"]
    assert main(common + ["--tiny", "-o", str(tmp_path / "a"), "--controlnet", "random", "--control-preprocessor",
                          "canny", "--controlnet-scale", "0.5", "--lora", lora, "--lora-scale", "0.7"]) == 0
    assert len(list((tmp_path / "a").glob("frame_*.png"))) == 3
    assert main(common + ["--tiny", "sdxl", "-o", str(tmp_path / "b"), "--controlnet", "random", "--control-image",
                          str(tmp_path / "edges.png"), "--tiny-vae", "random"]) == 0
    assert len(list((tmp_path / "b").glob("frame_*.png"))) == 3
    capsys.readouterr()
    for extra, message in ((["--controlnet", "random"], "--controlnet needs each frame's control map"),
                           (["--lora", _make_lora(tmp_path / "other", 2, other=True)], "--lora "),
                           (["--control-preprocessor", "canny"], "--control-preprocessor needs a --controlnet")):
        assert main(common + ["--tiny", "-o", str(tmp_path / "c")] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_io_errors_name_the_source_and_the_cli_the_flag(tmp_path, capsys):
    """`open_source`/`open_sink` speak of the source and the sink; `paradiff stream` of --input and -o."""
    from PIL import Image

    from paradiff.cli import main

    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(UserError, match=r"^source '.*missing\.mp4': no such file"):
        io.open_source(missing)
    with pytest.raises(UserError, match=r"^sink 'out\.png': give a video file"):
        io.open_sink("out.png")
    args = ["stream", "--tiny", "--prompt", "x", "--size", "64", "--device", "cpu"]
    assert main(args + ["--input", missing, "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"paradiff: error: --input {missing}: no such file")
    frames = tmp_path / "in"
    frames.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / "0.png")
    assert main(args + ["--input", str(frames), "-o", "out.png"]) == 2
    assert capsys.readouterr().err.startswith("paradiff: error: -o out.png: give a video file")


def test_host_frames_are_filtered_on_the_host_and_skips_cost_no_step():
    from paradiff import StreamPipeline
    from support.models import tiny_stream_pipeline

    stream = StreamPipeline(tiny_stream_pipeline(), [30, 45], similarity_filter=0.98, max_skip_frames=3, filter_on_host=True)
    stream.prepare("a red circle")
    calls = []
    step = stream._img2img.fn
    stream._img2img.fn = lambda *args: calls.append(1) or step(*args)
    rng = np.random.default_rng(2)
    clip = _static(12, rng) + _moving(3, rng)
    outs = []
    for frame in clip:
        outs.append(stream(frame))
    stats = stream.stats()
    processed = stats["frames"] - stats["skipped"]
    assert stats["frames"] == 15 and stats["skipped"] >= 6
    assert len(calls) == processed + 1  # + the warm-start step: skipped frames launch nothing
    assert np.array_equal(outs[1], outs[0]) and not np.array_equal(outs[-1], outs[-2])
    stream.prepare("a blue square")  # a new prompt starts a new video: the first frame is never skipped
    before = len(calls)
    stream(clip[0])
    assert len(calls) == before + 2 and stream.stats() == {"frames": 1, "skipped": 0}
