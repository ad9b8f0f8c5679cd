"""Image bytes <-> RGB arrays, and the BadInput reasons for hostile or broken input."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from operators.errors import BadInput
from operators.images import ImageLimits, decode_image, encode_image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skdata.chelsea()  # (300, 451, 3) uint8 RGB


def _reason(excinfo) -> str:
    return excinfo.value.reason


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR declares width x height (its IDAT holds only one row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 16))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _sof_offset(jpeg: bytes) -> int:
    """Offset of the first SOFn marker, found by walking the JPEG segments independently."""
    i = 2
    while True:
        assert jpeg[i] == 0xFF
        marker = jpeg[i + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            return i
        i += 2 + struct.unpack(">H", jpeg[i + 2 : i + 4])[0]


# ---------------------------------------------------------------------------------- round trips
def test_png_round_trip_is_exact(photo):
    assert np.array_equal(decode_image(encode_image(photo, "png"), "png"), photo)


def test_raw_round_trip_is_exact(photo):
    h, w = photo.shape[:2]
    raw = encode_image(photo, "raw")
    assert len(raw) == h * w * 3
    assert np.array_equal(decode_image(raw, "raw", width=w, height=h), photo)


def test_jpeg_round_trip_is_close(photo):
    decoded = decode_image(encode_image(photo, "jpeg", jpeg_quality=95), "jpeg")
    assert decoded.shape == photo.shape
    assert decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - photo.astype(np.int16)).mean() < 3.0


def test_decoded_channels_are_rgb_not_bgr():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    decoded = decode_image(encode_image(img, "png"), "png")
    assert np.array_equal(decoded, img)
    # and the PNG on the wire is a normal PNG: OpenCV (BGR) reads red in its last channel
    bgr = cv2.imdecode(np.frombuffer(encode_image(img, "png"), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(bgr[..., ::-1], img)


def test_decode_with_matching_header_dimensions_succeeds(photo):
    h, w = photo.shape[:2]
    assert np.array_equal(decode_image(encode_image(photo, "png"), "png", width=w, height=h), photo)


def test_encode_rejects_non_rgb_arrays():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8), "png")
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32), "png")


# ------------------------------------------------------------------------------------ bad input
def test_garbage_bytes_fail_with_image_decode_failed():
    with pytest.raises(BadInput) as excinfo:
        decode_image(b"this is not an image at all" * 4, "jpeg")
    assert _reason(excinfo) == "image_decode_failed"


def test_empty_bytes_fail_with_empty_image():
    with pytest.raises(BadInput) as excinfo:
        decode_image(b"", "png")
    assert _reason(excinfo) == "empty_image"


def test_truncated_jpeg_is_refused(photo):
    jpeg = encode_image(photo, "jpeg")
    with pytest.raises(BadInput) as excinfo:
        decode_image(jpeg[: len(jpeg) // 2], "jpeg")
    assert _reason(excinfo) in ("image_truncated", "image_decode_failed")


def test_jpeg_missing_only_its_end_marker_is_refused(photo):
    jpeg = encode_image(photo, "jpeg")
    assert jpeg.endswith(b"\xff\xd9")
    with pytest.raises(BadInput) as excinfo:
        decode_image(jpeg[:-2], "jpeg")
    assert _reason(excinfo) in ("image_truncated", "image_decode_failed")


def test_header_dimensions_that_differ_from_the_image_fail_with_size_mismatch(photo):
    h, w = photo.shape[:2]
    with pytest.raises(BadInput) as excinfo:
        decode_image(encode_image(photo, "png"), "png", width=w + 1, height=h)
    assert _reason(excinfo) == "size_mismatch"


def test_absurd_header_dimensions_fail_with_image_too_large(photo, monkeypatch):
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded despite absurd headers"))
    with pytest.raises(BadInput) as excinfo:
        decode_image(encode_image(photo, "png"), "png", width=100_000, height=100_000)
    assert _reason(excinfo) == "image_too_large"


def test_raw_with_absurd_headers_fails_before_size_check():
    with pytest.raises(BadInput) as excinfo:
        decode_image(b"\x00" * 12, "raw", width=1_000_000, height=2)
    assert _reason(excinfo) == "image_too_large"


def test_png_whose_ihdr_declares_huge_dimensions_is_refused_without_decoding(monkeypatch):
    bomb = _png_declaring(100_000, 100_000)
    assert len(bomb) < 200
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded a decompression bomb"))
    with pytest.raises(BadInput) as excinfo:
        decode_image(bomb, "png")
    assert _reason(excinfo) == "image_too_large"


def test_png_over_the_pixel_budget_is_refused_with_custom_limits():
    bomb = _png_declaring(300, 300)
    with pytest.raises(BadInput) as excinfo:
        decode_image(bomb, "png", limits=ImageLimits(max_side=8192, max_pixels=300 * 300 - 1))
    assert _reason(excinfo) == "image_too_large"


def test_jpeg_whose_frame_header_declares_huge_dimensions_is_refused(photo, monkeypatch):
    jpeg = bytearray(encode_image(photo, "jpeg"))
    sof = _sof_offset(bytes(jpeg))
    h, w = struct.unpack(">HH", jpeg[sof + 5 : sof + 9])
    assert (w, h) == (photo.shape[1], photo.shape[0])  # the oracle found the real frame header
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded a decompression bomb"))
    with pytest.raises(BadInput) as excinfo:
        decode_image(bytes(jpeg), "jpeg")
    assert _reason(excinfo) == "image_too_large"


def test_raw_with_wrong_byte_count_fails_with_size_mismatch():
    with pytest.raises(BadInput) as excinfo:
        decode_image(b"\x00" * (4 * 4 * 3 - 1), "raw", width=4, height=4)
    assert _reason(excinfo) == "size_mismatch"


def test_raw_without_dimensions_fails_with_missing_header():
    with pytest.raises(BadInput) as excinfo:
        decode_image(b"\x00" * 48, "raw")
    assert _reason(excinfo) == "missing_header"


def test_zero_dimensions_fail_with_bad_dimensions():
    with pytest.raises(BadInput) as excinfo:
        decode_image(b"\x00" * 48, "raw", width=0, height=16)
    assert _reason(excinfo) == "bad_dimensions"


def test_unknown_encoding_fails_with_unknown_encoding(photo):
    with pytest.raises(BadInput) as excinfo:
        decode_image(encode_image(photo, "png"), "webp")
    assert _reason(excinfo) == "unknown_encoding"


def test_bad_input_is_a_value_error_with_reason_and_detail():
    with pytest.raises(ValueError) as excinfo:
        decode_image(b"", "png")
    assert isinstance(excinfo.value, BadInput)
    assert str(excinfo.value).startswith("empty_image: ")
    assert excinfo.value.detail
