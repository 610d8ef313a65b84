"""Frames from a source, through the stream, to a sink: bounded queues and one GPU loop.

source thread -> FrameQueue (bounded) -> GPU loop (batches of frame_buffer_size) -> FrameQueue -> sink thread

A live source (webcam, screen, websocket) must never make a queue grow: when the GPU falls behind, the oldest
waiting frame is dropped (`drop=True`), so the output stays close to real time. A file source is not live, so by
default the reader waits instead (`drop=False`) and every frame is processed. Frames cross to the GPU as uint8
through pinned host buffers (two, so the copy of the next frame overlaps the current step) and come back the same
way; all float work happens in the stream step on the device.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from paradiff.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


class Closed(Exception):
    """The queue was closed and is empty."""


class FrameQueue:
    """A bounded, thread-safe FIFO. When full, `put` drops the oldest item (drop=True) or waits (drop=False)."""

    def __init__(self, maxsize: int, drop: bool = True):
        if maxsize < 1:
            raise UserError(f"queue size must be >= 1, got {maxsize}.")
        self.maxsize = maxsize
        self.drop = drop
        self.dropped = 0
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Any) -> None:
        with self._cond:
            if self._closed:
                raise Closed
            while len(self._items) >= self.maxsize:
                if self.drop:
                    self._items.popleft()
                    self.dropped += 1
                else:
                    self._cond.wait()
                    if self._closed:
                        raise Closed
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; raises `Closed` once closed and drained, `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    raise Closed
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                self._cond.wait(left)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------------- sources
def _fit(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """RGB uint8, centre-cropped to the aspect ratio of `size` (H, W) and resized to it."""
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=2)
    frame = frame[..., :3]
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    if size is None or frame.shape[:2] == tuple(size):
        return np.ascontiguousarray(frame)
    from PIL import Image

    h, w = frame.shape[:2]
    th, tw = size
    scale = max(th / h, tw / w)
    ch, cw = round(th / scale), round(tw / scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    image = Image.fromarray(frame[top:top + ch, left:left + cw]).resize((tw, th), Image.BILINEAR)
    return np.asarray(image)


@dataclass
class Source:
    """An iterator of uint8 HxWx3 frames, its nominal frame rate, and whether it is live (drop when behind)."""

    frames: Iterator[np.ndarray]
    fps: float = 30.0
    live: bool = False
    length: int | None = None


def _folder_frames(paths: list[Path], size) -> Iterator[np.ndarray]:
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            yield _fit(np.asarray(image.convert("RGB")), size)


def _video_frames(path: str, size, name: str) -> tuple[Iterator[np.ndarray], float]:
    try:
        import imageio.v3 as iio

        meta = {}
        try:
            meta = iio.immeta(path)
        except Exception:  # noqa: BLE001 - metadata is optional
            pass
        fps = float(meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else 30.0))
        iterator = iio.imiter(path)
        first = next(iterator)  # fail here, not in the reader thread, if no plugin can read it

        def gen():
            yield _fit(first, size)
            for frame in iterator:
                yield _fit(frame, size)

        return gen(), fps
    except ImportError:
        pass
    except StopIteration:
        raise UserError(f"source {name!r}: the video has no frames.") from None
    except Exception as err:  # noqa: BLE001 - try OpenCV before giving up
        imageio_error = err
    else:  # pragma: no cover
        imageio_error = None
    try:
        import cv2
    except ImportError:
        raise UserError(
            f"source {name!r}: cannot read this video ({type(imageio_error).__name__}: {imageio_error}); "
            "install imageio-ffmpeg or opencv-python."
        ) from None
    return _cv2_frames(cv2.VideoCapture(path), size, name)


def _cv2_frames(cap, size, name) -> tuple[Iterator[np.ndarray], float]:
    import cv2

    if not cap.isOpened():
        raise UserError(f"source {name!r}: OpenCV could not open it.")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0

    def gen():
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    return
                yield _fit(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size)
        finally:
            cap.release()

    return gen(), float(fps)


def open_source(spec: str, size: tuple[int, int] | None = None) -> Source:
    """'frames/' (a folder of images), 'clip.mp4' (a video), 'webcam' or 'webcam:N' (OpenCV), 'screen' (mss)."""
    if spec == "webcam" or spec.startswith("webcam:"):
        try:
            import cv2
        except ImportError:
            raise UserError(f"source {spec!r} needs OpenCV: pip install opencv-python.") from None
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        frames, fps = _cv2_frames(cv2.VideoCapture(index), size, spec)
        return Source(frames, fps, live=True)
    if spec == "screen":
        try:
            import mss
        except ImportError:
            raise UserError(f"source {spec!r} needs mss: pip install mss.") from None

        def grab():
            with mss.mss() as shot:
                monitor = shot.monitors[1]
                while True:
                    yield _fit(np.asarray(shot.grab(monitor))[..., 2::-1], size)

        return Source(grab(), 30.0, live=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"source {spec!r}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return Source(_folder_frames(files, size), 30.0, live=False, length=len(files))
    if not path.exists():
        raise UserError(f"source {spec!r}: no such file or folder (or use webcam, webcam:N, screen).")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return Source(_folder_frames([path], size), 30.0, live=False, length=1)
    frames, fps = _video_frames(str(path), size, spec)
    return Source(frames, fps, live=False)


# ----------------------------------------------------------------------------------------------------- sinks
class FolderSink:
    """Writes frame_000000.png, frame_000001.png, ... into a folder."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(frame).save(self.folder / f"frame_{self.count:06d}.png")
        self.count += 1

    def close(self) -> None:
        pass


class VideoSink:
    """A video file through imageio (ffmpeg for mp4 & co., pillow for gif)."""

    def __init__(self, path: str, fps: float):
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise UserError(f"sink {path!r}: writing video needs imageio (pip install imageio imageio-ffmpeg).") from None
        self.path = path
        kwargs: dict[str, Any] = {"fps": fps}
        if path.lower().endswith(".gif"):
            kwargs = {"duration": 1000.0 / fps, "loop": 0}
        else:
            kwargs["macro_block_size"] = 8
        try:
            self._writer = imageio.get_writer(path, **kwargs)
        except Exception as err:  # noqa: BLE001 - missing backend or unknown format
            raise UserError(f"sink {path!r}: cannot write this video format ({err}); install imageio-ffmpeg, or write "
                            "to a folder.") from None
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)
        self.count += 1

    def close(self) -> None:
        self._writer.close()


def open_sink(spec: str, fps: float = 30.0):
    """A video file if `spec` has a video extension, else a folder of PNGs."""
    if Path(spec).suffix.lower() in VIDEO_EXTENSIONS:
        parent = Path(spec).expanduser().resolve().parent
        if not parent.is_dir():
            raise UserError(f"sink {spec!r}: folder {parent} does not exist.")
        return VideoSink(spec, fps)
    if Path(spec).suffix and Path(spec).suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"sink {spec!r}: give a video file ({', '.join(VIDEO_EXTENSIONS)}) or a folder, not an image.")
    return FolderSink(spec)


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class RunStats:
    """What `run` did: frames read and written, dropped (live sources) and skipped (similarity filter)."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    skipped: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames_out / self.seconds if self.seconds > 0 else 0.0


class _Transfer:
    """Pinned double buffers for uint8 frames to and from the GPU (plain tensors on the CPU)."""

    def __init__(self, shape, device):
        import torch

        self.cuda = device.type == "cuda"
        self.slot = 0
        pin = self.cuda
        self.host_in = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.host_out = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]

    def upload(self, batch: np.ndarray):
        import torch

        buf = self.host_in[self.slot]
        if self.events[self.slot] is not None:
            self.events[self.slot].synchronize()  # the copy that last read this buffer is done
        buf.copy_(torch.from_numpy(batch))
        return buf

    def download(self, out) -> tuple[Any, Any]:
        buf = self.host_out[self.slot]
        buf.copy_(out, non_blocking=self.cuda)
        event = self.events[self.slot]
        if event is not None:
            event.record()
        self.slot ^= 1
        return buf, event


def _read(source: Source, in_q: FrameQueue, stats: RunStats, stop: threading.Event, max_frames: int | None) -> None:
    """Reader thread: the source's frames into `in_q` until it ends, `stop` is set or `max_frames` are read.

    A failure is recorded, not raised: the main thread reports it after the frames already read are written.
    """
    try:
        for i, frame in enumerate(source.frames):
            if stop.is_set() or (max_frames is not None and i >= max_frames):
                break
            in_q.put(frame)
            stats.frames_in += 1
    except Closed:
        pass
    except Exception as err:  # noqa: BLE001 - reported by the main thread
        stats.errors.append(f"reading frames failed: {type(err).__name__}: {err}")
    finally:
        in_q.close()


def _write(sink: Any, out_q: FrameQueue, stats: RunStats, stop: threading.Event) -> None:
    """Writer thread: frames from `out_q` into `sink`; a failing sink stops the run (nothing more can be kept)."""
    try:
        while True:
            sink.write(out_q.get())
    except Closed:
        pass
    except Exception as err:  # noqa: BLE001 - reported by the main thread
        stats.errors.append(f"writing frames failed: {type(err).__name__}: {err}")
        stop.set()


def _thread(target: Callable, *args: Any) -> threading.Thread:
    """A started daemon thread: a stuck source or sink must not keep the process alive."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _next_batch(in_q: FrameQueue, size: int) -> list | None:
    """`size` frames from `in_q`, the last repeated if the source ends mid-batch; None once it has ended."""
    batch: list = []
    try:
        while len(batch) < size:
            batch.append(in_q.get())
    except Closed:
        if not batch:
            return None
    return batch + [batch[-1]] * (size - len(batch))


class _Loop:
    """The GPU side of `run`: one step in flight while the previous step's frames go to the writer.

    With `lag` (aligned runs), the first `lag` steps' outputs are warm-up and dropped, and `finish` pushes the
    last frame through `lag` more steps, so output frame i is input frame i.
    """

    def __init__(self, stream: Any, out_q: FrameQueue, stats: RunStats, bar: Any, lag: int):
        self.stream, self.out_q, self.stats, self.bar, self.lag = stream, out_q, stats, bar, lag
        self.size = stream.frame_buffer_size
        self.transfer = _Transfer((self.size, stream.height, stream.width, 3), stream.device)
        self.pending: list[tuple[Any, Any]] = []  # (host buffer, event) of the steps not yet emitted
        self.to_discard = lag * self.size
        self.keep = 1 << 62  # until the source ends, keep everything
        self.last: np.ndarray | None = None
        self.start = time.perf_counter()

    def step(self, batch: list) -> None:
        """One stream step on `batch`; its output is copied back asynchronously and emitted later."""
        out = self.stream(self.transfer.upload(np.stack(batch)))
        self.pending.append(self.transfer.download(out))

    def emit(self) -> None:
        """The oldest pending step's frames to the writer, less warm-up outputs and the padding after the end."""
        buf, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        frames = buf.numpy()
        for i in range(self.size):
            if self.to_discard > 0:
                self.to_discard -= 1
                continue
            if self.stats.frames_out >= self.keep:
                return
            self.out_q.put(frames[i].copy())
            self.stats.frames_out += 1
            if self.bar is not None:
                self.bar.update(1)
        if self.bar is not None:
            fps = self.stats.frames_out / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(fps=f"{fps:.1f}", refresh=False)

    def feed(self, in_q: FrameQueue, stop: threading.Event) -> None:
        """Step every batch the reader delivers until the source ends, a thread fails or the writer stops."""
        while not stop.is_set():
            batch = _next_batch(in_q, self.size)
            if batch is None:
                break
            self.last = batch[-1]
            self.step(batch)
            if len(self.pending) > 1:
                self.emit()
            if self.stats.errors:
                break

    def finish(self) -> None:
        """The source has ended: no padding frames in the output; flush the `lag` steps still in flight."""
        self.keep = self.stats.frames_in
        if self.last is not None and self.lag and not self.stats.errors:
            for _ in range(self.lag):  # push the last frame through the k-1 steps still in flight
                self.step([self.last] * self.size)
                self.emit()
        while self.pending:
            self.emit()


def _progress_bar(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", dynamic_ncols=True, leave=True)


def run(stream: Any, source: Source, sink: Any, *, queue_size: int = 4, drop: bool | None = None,
        align: bool | None = None, progress: bool = True, max_frames: int | None = None) -> RunStats:
    """Run `source` through `stream` into `sink`; returns counts and the output frame rate.

    align (default: for non-live sources): drop the k-1 warm-up outputs at the start and flush the buffer with
    the last frame at the end, so output frame i is the stylised input frame i.
    """
    align = source.live is False if align is None else align
    drop = source.live if drop is None else drop
    in_q = FrameQueue(queue_size, drop=drop)
    out_q = FrameQueue(max(queue_size, 2 * stream.frame_buffer_size), drop=False)
    stats, stop = RunStats(), threading.Event()
    threads = [_thread(_read, source, in_q, stats, stop, max_frames), _thread(_write, sink, out_q, stats, stop)]
    bar = _progress_bar(source.length) if progress else None
    loop = _Loop(stream, out_q, stats, bar, lag=stream.steps - 1 if align else 0)
    try:
        loop.feed(in_q, stop)
        loop.finish()
    finally:
        stop.set()
        in_q.close()
        out_q.close()
        for thread in threads:
            thread.join(timeout=30)
        sink.close()
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - loop.start
    stats.dropped = in_q.dropped
    stats.skipped = stream.stats()["skipped"]
    if stats.errors:
        raise UserError(stats.errors[0])
    return stats
