"""Episode videos (MP4, H.264 through PyAV)."""

from __future__ import annotations

from collections.abc import Sequence

import av
import numpy as np


def write_video(path: str, frames: Sequence[np.ndarray], fps: int = 20) -> None:
    """Write (H, W, 3) uint8 frames; sizes are padded to even numbers as H.264 requires."""
    height, width = frames[0].shape[:2]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            padded = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
