"""Video writing and frame sampling (PyAV), checked against PyAV's own decoding and the frames written."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from operators.video import sample_frames, write_video

FPS = 10
N_FRAMES = 30
H, W = 64, 96


def _frame(i: int) -> np.ndarray:
    """Smooth waves moving a few pixels per frame: no hard edges for the codec to blur, and each
    frame differs clearly from its neighbours, so a decoded frame can be matched to its source."""
    y, x = np.mgrid[0:H, 0:W]
    r = 128 + 100 * np.sin(2 * np.pi * (x + 5 * i) / W)
    g = 128 + 100 * np.cos(2 * np.pi * (y + 3 * i) / H)
    b = 60.0 + x
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [_frame(i) for i in range(N_FRAMES)]


@pytest.fixture(scope="module")
def video(tmp_path_factory, frames) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=FPS)


def _reference_decode(path: Path) -> list[tuple[float, np.ndarray]]:
    """All frames as PyAV decodes them (single-threaded, no sampling)."""
    with av.open(str(path)) as container:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def _closest_written(rgb: np.ndarray, frames: list[np.ndarray]) -> int:
    return int(np.argmin([np.abs(rgb.astype(np.int16) - f.astype(np.int16)).mean() for f in frames]))


def test_all_frames_are_decoded_in_order_with_their_timestamps(video):
    decoded = list(sample_frames(video))
    reference = _reference_decode(video)
    assert len(decoded) == len(reference) == N_FRAMES
    assert [d.index for d in decoded] == list(range(N_FRAMES))
    np.testing.assert_allclose([d.pts for d in decoded], [t for t, _ in reference], atol=1e-9)
    np.testing.assert_allclose([d.pts for d in decoded], np.arange(N_FRAMES) / FPS, atol=1e-3)


def test_decoded_frames_equal_pyav_reference_decoding(video):
    for decoded, (_, ref) in zip(sample_frames(video), _reference_decode(video), strict=True):
        assert decoded.rgb.shape == (H, W, 3)
        assert decoded.rgb.dtype == np.uint8
        assert np.array_equal(decoded.rgb, ref)


def test_decoded_content_is_close_to_what_was_written(video, frames):
    for decoded in sample_frames(video):
        diff = np.abs(decoded.rgb.astype(np.int16) - frames[decoded.index].astype(np.int16)).mean()
        # mpeg4 at the encoder's default bit rate: the key frame is near-exact, later frames drift
        assert diff < (4.0 if decoded.index == 0 else 15.0), (decoded.index, diff)
        assert _closest_written(decoded.rgb, frames) == decoded.index


def test_every_n_yields_indices_0_n_2n(video, frames):
    decoded = list(sample_frames(video, every=4))
    assert [d.index for d in decoded] == list(range(0, N_FRAMES, 4))
    assert all(_closest_written(d.rgb, frames) == d.index for d in decoded)


def test_every_one_yields_all_frames(video):
    assert [d.index for d in sample_frames(video, every=1)] == list(range(N_FRAMES))


def test_fps_sampling_of_10fps_video_at_2fps(video, frames):
    decoded = list(sample_frames(video, fps=2))
    duration = N_FRAMES / FPS
    assert abs(len(decoded) - 2 * duration) <= 1  # ~2 frames per second of video
    pts = [d.pts for d in decoded]
    assert pts[0] == pytest.approx(0.0)
    assert all(b > a for a, b in zip(pts, pts[1:], strict=False))
    np.testing.assert_allclose(np.diff(pts), 0.5, atol=0.05)
    assert all(_closest_written(d.rgb, frames) == d.index for d in decoded)


def test_fps_at_or_above_the_video_rate_keeps_every_frame(video):
    assert len(list(sample_frames(video, fps=FPS))) == N_FRAMES
    assert len(list(sample_frames(video, fps=100))) == N_FRAMES


def test_max_frames_stops_early(video):
    assert [d.index for d in sample_frames(video, max_frames=5)] == [0, 1, 2, 3, 4]
    assert [d.index for d in sample_frames(video, every=3, max_frames=4)] == [0, 3, 6, 9]
    assert len(list(sample_frames(video, fps=2, max_frames=2))) == 2


def test_fps_and_every_together_raise_value_error(video):
    with pytest.raises(ValueError):
        list(sample_frames(video, fps=2, every=3))


@pytest.mark.parametrize("kwargs", [{"fps": 0}, {"fps": -1.0}, {"every": 0}])
def test_non_positive_sampling_raises_value_error(video, kwargs):
    with pytest.raises(ValueError):
        list(sample_frames(video, **kwargs))


def test_fps_sampling_restarts_its_grid_after_a_gap(tmp_path):
    # frames at 0.0..0.4 s, then a jump to 2.0..2.9 s (a recording pause)
    path = tmp_path / "gap.mp4"
    times = [i / FPS for i in range(5)] + [2.0 + i / FPS for i in range(10)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.height, stream.width, stream.pix_fmt = H, W, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(_frame(i), format="rgb24")
            frame.pts, frame.time_base = round(t * FPS), Fraction(1, FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    reference = [t for t, _ in _reference_decode(path)]
    np.testing.assert_allclose(reference, times, atol=1e-3)  # the gap really is in the file

    pts = [d.pts for d in sample_frames(path, fps=2)]
    # no two samples closer than 1/fps, and no frame left more than 1/fps after the last sample
    assert all(b - a >= 0.5 - 1e-3 for a, b in zip(pts, pts[1:], strict=False))
    for t in reference:
        assert any(0 <= t - p < 0.5 + 1e-3 for p in pts), t
    # after the gap the grid starts at the first frame, not at the stale 0.5 s mark
    assert pts == pytest.approx([0.0, 2.0, 2.5], abs=1e-3)


def test_write_video_with_no_frames_makes_no_stream(tmp_path):
    path = write_video(tmp_path / "empty.mp4", [], fps=FPS)
    assert path == tmp_path / "empty.mp4"
