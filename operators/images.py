"""Image bytes <-> RGB arrays, with the checks that keep a worker alive on hostile input.

Arrays are `(H, W, 3) uint8` in RGB order everywhere in inferstream; conversion to a model's own
colour order happens in that model's preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from operators.errors import BadInput

ENCODINGS = ("jpeg", "png", "raw")


@dataclass(frozen=True)
class ImageLimits:
    """Dimensions beyond these are refused before any pixel is decoded (decompression bombs)."""

    max_side: int = 8192
    max_pixels: int = 40_000_000


def encode_image(rgb: np.ndarray, encoding: str = "jpeg", jpeg_quality: int = 90) -> bytes:
    """RGB `(H, W, 3) uint8` -> bytes in `encoding` (jpeg, png, or raw = the pixels row by row)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    if encoding == "raw":
        return np.ascontiguousarray(rgb).tobytes()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    elif encoding == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
    if not ok:
        raise ValueError(f"OpenCV could not encode the image as {encoding}")
    return buf.tobytes()


def check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise BadInput("bad_dimensions", f"image dimensions must be positive, got {width}x{height}")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise BadInput(
            "image_too_large",
            f"{width}x{height} exceeds the limits (side <= {limits.max_side}, pixels <= {limits.max_pixels})",
        )


def _header_dimensions(data: bytes, encoding: str) -> tuple[int, int] | None:
    """Width and height read from the PNG/JPEG header without decoding pixels (None if not found)."""
    if encoding == "png" and len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if encoding == "jpeg" and data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte before a marker (legal; libjpeg skips it)
                i += 1
                continue
            seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: frame header
                return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
            if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
                return None
            i += 2 + seg_len
    return None


@dataclass(frozen=True)
class SourceImage:
    """The pixels of a `width` x `height` image, decoded at that size or smaller (libjpeg's DCT
    scaling): `rgb` is `(h, w, 3) uint8` RGB with `h <= height`, `w <= width`. Operators read the
    pixels and report geometry (boxes) in the original's pixels."""

    rgb: np.ndarray
    width: int
    height: int


def pixels_of(image: np.ndarray | SourceImage) -> tuple[np.ndarray, int, int]:
    """(pixels, original width, original height) of an array or a SourceImage."""
    if isinstance(image, SourceImage):
        return image.rgb, image.width, image.height
    height, width = image.shape[:2] if getattr(image, "ndim", 0) >= 2 else (0, 0)
    return image, width, height


# libjpeg decodes straight to 1/2, 1/4 or 1/8 of the size in the DCT domain (measured on 640x480:
# 1.9 ms full, 1.3 ms at 1/2 with OpenCV): far less work than decoding everything and resizing.
_REDUCED_FLAGS = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}


def reduction_for(limit: float) -> int:
    """The largest libjpeg scale denominator (8, 4, 2, else 1) not above `limit`.

    >>> reduction_for(3.7), reduction_for(1.99), reduction_for(100)
    (2, 1, 8)
    """
    return next((d for d in (8, 4, 2) if d <= limit), 1)


def decode_image(
    data: bytes,
    encoding: str = "jpeg",
    width: int | None = None,
    height: int | None = None,
    limits: ImageLimits = ImageLimits(),
) -> np.ndarray:
    """Bytes -> RGB `(H, W, 3) uint8`. Raises `BadInput` with a reason code on anything unusable.

    `width`/`height` are what the producer declared; raw frames need them, encoded frames are checked
    against them when given.
    """
    return decode_source(data, encoding, width, height, limits).rgb


def decode_source(
    data: bytes,
    encoding: str = "jpeg",
    width: int | None = None,
    height: int | None = None,
    limits: ImageLimits = ImageLimits(),
    reduction_limit: Callable[[int, int], float] | None = None,
) -> SourceImage:
    """Like `decode_image`, but a JPEG is decoded at 1/2, 1/4 or 1/8 scale when
    `reduction_limit(width, height)` (how many times smaller the models that read it can take it)
    allows; the result keeps the original size for geometry."""
    if not data:
        raise BadInput("empty_image", "the record value is empty")
    if encoding not in ENCODINGS:
        raise BadInput("unknown_encoding", f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    if width is not None and height is not None:
        check_dimensions(width, height, limits)
    if encoding == "raw":
        if width is None or height is None:
            raise BadInput("missing_header", "raw frames need width and height headers")
        expected = width * height * 3
        if len(data) != expected:
            raise BadInput("size_mismatch", f"raw rgb24 {width}x{height} needs {expected} bytes, got {len(data)}")
        return SourceImage(np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy(), width, height)

    declared = _header_dimensions(data, encoding)
    if declared is None:  # OpenCV decodes whatever format it recognises: never pixels whose size is unread
        raise BadInput("image_decode_failed", f"{len(data)} bytes are not a {encoding} image with a readable size header")
    check_dimensions(*declared, limits)  # refuse bombs before allocating their pixels
    factor = 1
    if encoding == "jpeg" and reduction_limit is not None:
        factor = reduction_for(reduction_limit(*declared))
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS.get(factor, cv2.IMREAD_COLOR))
    if bgr is None:
        raise BadInput("image_decode_failed", f"{len(data)} bytes are not a decodable {encoding} image")
    if encoding == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        # libjpeg fills a truncated scan with grey and only warns; a cut-off frame is not a frame.
        raise BadInput("image_truncated", f"{encoding} data ends before its end-of-image marker")
    h, w = bgr.shape[:2]
    if factor > 1:
        w, h = declared  # the size of the image, not of its reduced decode
    if width is not None and height is not None and (w, h) != (width, height):
        raise BadInput("size_mismatch", f"headers say {width}x{height} but the image is {w}x{h}")
    return SourceImage(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), w, h)
