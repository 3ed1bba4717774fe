"""PyAV video helpers: encode, decode by timestamp, nearest-frame choice, fork-safe cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="video tests need PyAV (pip install 'steadyvla[video]')")

from steadyvla.data import video  # noqa: E402

FPS = 10
T, H, W = 20, 48, 64


def _frames() -> np.ndarray:
    """Smooth gradients (no wrap-around edges) shifting with the index, so frames differ."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((T, H, W, 3), np.uint8)
    for i in range(T):
        out[i, ..., 0] = x / W * 150 + i * 2
        out[i, ..., 1] = y / H * 150 + i * 5
        out[i, ..., 2] = 40 + i * 9
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    frames = _frames()
    path = tmp_path_factory.mktemp("video") / "cam.mp4"
    video.encode_video(frames, path, fps=FPS)
    yield path, frames
    video.close_all()


def _nearest_index(decoded: np.ndarray, frames: np.ndarray) -> int:
    return int(np.argmax([_psnr(decoded, f) for f in frames]))


def test_decode_every_frame_by_timestamp(encoded: tuple[Path, np.ndarray]) -> None:
    path, frames = encoded
    for i in range(T):
        got = video.decode_frame(path, i / FPS)
        assert got.shape == (H, W, 3) and got.dtype == np.uint8
        assert _psnr(got, frames[i]) > 30, f"frame {i}"
        assert _nearest_index(got, frames) == i


def test_random_order_and_nearest_timestamp(encoded: tuple[Path, np.ndarray]) -> None:
    path, frames = encoded
    rng = np.random.default_rng(0)
    for i in rng.permutation(T):
        # Off-grid requests resolve to the nearest frame on either side.
        jitter = rng.uniform(-0.4, 0.4) / FPS
        t = max(0.0, i / FPS + jitter)
        got = video.decode_frame(path, t)
        assert _nearest_index(got, frames) == i, f"t={t:.4f} should give frame {i}"


def test_past_the_end_and_tolerance(encoded: tuple[Path, np.ndarray]) -> None:
    path, frames = encoded
    last = video.decode_frame(path, 100.0)
    assert _nearest_index(last, frames) == T - 1
    with pytest.raises(ValueError, match="tolerance_s"):
        video.decode_frame(path, 0.14, tolerance_s=1e-3)
    video.decode_frame(path, 0.1 + 1e-5, tolerance_s=1e-3)
    with pytest.raises(ValueError, match="timestamp_s"):
        video.decode_frame(path, -1.0)


def test_info_and_cache_bounded(encoded: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = encoded
    info = video.video_info(path)
    assert (info["width"], info["height"], info["frames"]) == (W, H, T)
    assert info["fps"] == pytest.approx(FPS)
    small = np.zeros((2, 16, 16, 3), np.uint8)
    for k in range(video.MAX_OPEN_CONTAINERS + 3):
        p = tmp_path / f"v{k}.mp4"
        video.encode_video(small, p, fps=FPS)
        video.decode_frame(p, 0.0)
    assert len(video._containers) <= video.MAX_OPEN_CONTAINERS


def test_encode_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        video.encode_video(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "x.mp4", fps=FPS)
    with pytest.raises(ValueError, match="even"):
        video.encode_video(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "x.mp4", fps=FPS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video.decode_frame(tmp_path / "missing.mp4", 0.0)


def test_av1_like_lerobot_writes(tmp_path: Path) -> None:
    try:
        codec = video.available_codec(("libsvtav1", "libaom-av1"))
    except RuntimeError:
        pytest.skip("this PyAV build has no AV1 encoder")
    frames = _frames()
    path = tmp_path / "av1.mp4"
    video.encode_video(frames, path, fps=FPS, codec=codec)
    for i in (0, 7, T - 1):
        got = video.decode_frame(path, i / FPS)
        assert _psnr(got, frames[i]) > 30 and _nearest_index(got, frames) == i


def test_cache_reopens_after_fork(encoded: tuple[Path, np.ndarray], monkeypatch) -> None:
    path, frames = encoded
    video.decode_frame(path, 0.0)
    inherited = dict(video._containers)
    monkeypatch.setattr(video, "_containers_pid", -1)  # as if this were a forked worker
    got = video.decode_frame(path, 0.5)
    assert _nearest_index(got, frames) == 5
    assert all(
        video._containers[k] is not c for k, c in inherited.items() if k in video._containers
    )
    for c in inherited.values():  # the "parent's" containers were dropped, not closed: close here
        c.close()
