"""Video helpers on PyAV: write frames as an mp4, read back the frame nearest a timestamp.

LeRobot datasets store camera streams as mp4 files shared by many episodes; a reader asks for
"the frame of this stream at t seconds". `decode_frame` seeks to the keyframe at or before t and
decodes forward, so the cost of one random access is bounded by the GOP length, which is why
`encode_video` writes short GOPs by default. Open containers are kept in a small per-process
cache: DataLoader workers are forked, and a demuxer inherited from the parent must not be shared.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.optional import require

# Tried in order when no codec is named: h264 decodes everywhere; AV1 is what LeRobot writes.
PREFERRED_CODECS: tuple[str, ...] = ("libx264", "libsvtav1", "libaom-av1", "mpeg4")

# Open containers kept per process; each holds a file descriptor and decoder state.
MAX_OPEN_CONTAINERS = 8

_containers: OrderedDict[str, Any] = OrderedDict()
_containers_pid: int | None = None


def _import_av() -> Any:
    return require("av", extra="video", purpose="reading or writing video (PyAV)")


def available_codec(preferred: tuple[str, ...] = PREFERRED_CODECS) -> str:
    """Return the first codec in `preferred` that this PyAV build can encode with."""
    av = _import_av()
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises different types for "unknown" across versions
            continue
        return name
    raise RuntimeError(f"PyAV {av.__version__} can encode none of the codecs {list(preferred)}")


def encode_video(
    frames: np.ndarray,
    path: Path,
    fps: int,
    codec: str | None = None,
    gop: int = 2,
    crf: int | None = None,
) -> None:
    """Write RGB frames [T, H, W, 3] uint8 to `path` as a yuv420p video at `fps`.

    `codec` defaults to the first available of PREFERRED_CODECS. `gop` is the keyframe interval:
    small values make random access cheap (LeRobot uses 2). `crf` sets the quality where the codec
    supports it (lower is better; None keeps the codec default). Frame i gets timestamp i / fps.
    """
    av = _import_av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be a [T, H, W, 3] uint8 array, "
            f"got shape {frames.shape} dtype {frames.dtype}"
        )
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("frames is empty: a video needs at least one frame")
    if h % 2 or w % 2:
        raise ValueError(f"frame size {h}x{w} must be even in both dimensions for yuv420p")
    if fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    codec = codec or available_codec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    options = {"g": str(gop)}
    if crf is not None:
        options["crf"] = str(crf)
    time_base = Fraction(1, fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = options
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts, frame.time_base = i, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def _open(path: Path) -> Any:
    """Return a cached open container for `path`, reopening after a fork."""
    global _containers_pid
    pid = os.getpid()
    if _containers_pid != pid:
        # Containers inherited from the parent share its file offsets: drop them, don't close them.
        _containers.clear()
        _containers_pid = pid
    key = str(Path(path).resolve())
    container = _containers.get(key)
    if container is not None:
        _containers.move_to_end(key)
        return container
    if not Path(path).is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    av = _import_av()
    container = av.open(key, mode="r")
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    _containers[key] = container
    while len(_containers) > MAX_OPEN_CONTAINERS:
        _, oldest = _containers.popitem(last=False)
        oldest.close()
    return container


def close_all() -> None:
    """Close every container this process has cached (tests; end of an epoch)."""
    while _containers:
        _, container = _containers.popitem()
        container.close()


def decode_frame(path: Path, timestamp_s: float, tolerance_s: float | None = None) -> np.ndarray:
    """Return the frame of `path` whose timestamp is nearest `timestamp_s`, as [H, W, 3] uint8 RGB.

    Seeks to the keyframe at or before the timestamp and decodes forward. With `tolerance_s`
    set, a nearest frame farther than that from the request is an error (it means the dataset's
    timestamps and its video disagree) instead of a silently wrong frame.
    """
    if not np.isfinite(timestamp_s) or timestamp_s < 0:
        raise ValueError(f"timestamp_s must be a finite number >= 0, got {timestamp_s}")
    container = _open(path)
    try:
        best = _nearest_frame(container, float(timestamp_s))
    except Exception:
        # A demuxer in an unknown state after an error must not serve the next request.
        _containers.pop(str(Path(path).resolve()), None)
        container.close()
        raise
    if best is None:
        raise ValueError(f"{path}: no frame could be decoded (empty or corrupt video)")
    frame_time, frame = best
    if tolerance_s is not None and abs(frame_time - timestamp_s) > tolerance_s:
        raise ValueError(
            f"{path}: nearest frame to t={timestamp_s:.6f}s is at {frame_time:.6f}s, "
            f"farther than tolerance_s={tolerance_s}"
        )
    return frame.to_ndarray(format="rgb24")


def _nearest_frame(container: Any, t: float) -> tuple[float, Any] | None:
    stream = container.streams.video[0]
    time_base = stream.time_base
    # Timestamps are absolute stream times (pts * time_base), as LeRobot's own reader compares them.
    target = max(0, int(t / time_base))
    container.seek(target, stream=stream, backward=True, any_frame=False)
    previous: tuple[float, Any] | None = None
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        frame_time = float(frame.pts * time_base)
        if frame_time >= t:
            if previous is not None and t - previous[0] < frame_time - t:
                return previous
            return frame_time, frame
        previous = (frame_time, frame)
    return previous  # t lies past the last frame: the last frame is the nearest


def video_info(path: Path) -> dict[str, Any]:
    """Codec, size, frame rate, frame count and duration of the first video stream of `path`."""
    stream = _open(path).streams.video[0]
    rate = stream.average_rate
    duration = stream.duration * stream.time_base if stream.duration is not None else None
    return {
        "codec": stream.codec_context.name,
        "width": stream.codec_context.width,
        "height": stream.codec_context.height,
        "fps": float(rate) if rate else None,
        "frames": int(stream.frames),
        "duration_s": float(duration) if duration is not None else None,
    }
