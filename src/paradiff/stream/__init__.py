"""Real-time streaming (StreamDiffusion): `StreamPipeline` for frame-by-frame img2img/txt2img on one GPU.

`paradiff.stream.io` feeds it from video files, image folders or a webcam through bounded queues, and
`paradiff.stream.web` serves a browser demo.
"""

from paradiff.stream.pipeline import StreamPipeline

__all__ = ["StreamPipeline"]
