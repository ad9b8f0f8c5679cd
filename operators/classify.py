"""Image classification: preprocess -> (session) -> postprocess.

Preprocessing is declared per model (size, resize mode, mean/std, colour order, layout) because a
model is only right with the exact input transform it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from operators.images import SourceImage, pixels_of


@dataclass(frozen=True)
class ImagePreprocess:
    """How one model wants its pixels. `mean`/`std` are in 0..255 units, per channel in `color_order`."""

    height: int = 224
    width: int = 224
    resize: str = "center_crop"  # center_crop: shorter side to size/crop_ratio, then crop; stretch: to size
    crop_ratio: float = 0.875
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    color_order: str = "rgb"
    layout: str = "nchw"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(cfg) - known - {"size"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        args = {k: v for k, v in cfg.items() if k in known}
        if "size" in cfg:
            size = cfg["size"]
            args["height"], args["width"] = (size, size) if isinstance(size, int) else tuple(size)
        for key in ("mean", "std"):
            if key in args:
                args[key] = tuple(float(v) for v in args[key])
        pre = cls(**args)
        if pre.resize not in ("center_crop", "stretch"):
            raise ValueError(f"resize must be center_crop or stretch, not {pre.resize!r}")
        if pre.color_order not in ("rgb", "bgr") or pre.layout not in ("nchw", "nhwc"):
            raise ValueError("color_order must be rgb|bgr and layout nchw|nhwc")
        return pre


def resize_for_model(rgb: np.ndarray, pre: ImagePreprocess) -> np.ndarray:
    """RGB `(H, W, 3) uint8` -> `(pre.height, pre.width, 3) uint8`."""
    if pre.resize == "stretch":
        return cv2.resize(rgb, (pre.width, pre.height), interpolation=cv2.INTER_AREA)
    h, w = rgb.shape[:2]
    scale = max(pre.height, pre.width) / pre.crop_ratio / min(h, w)
    new_w, new_h = max(pre.width, round(w * scale)), max(pre.height, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    top, left = (new_h - pre.height) // 2, (new_w - pre.width) // 2
    return resized[top : top + pre.height, left : left + pre.width]


def preprocess_image(rgb: np.ndarray, pre: ImagePreprocess) -> np.ndarray:
    """RGB `(H, W, 3) uint8` -> float32 tensor `(3, H, W)` (nchw) or `(H, W, 3)` (nhwc), normalised."""
    pixels = resize_for_model(rgb, pre)
    if pre.color_order == "bgr":
        pixels = pixels[..., ::-1]
    x = (pixels.astype(np.float32) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if pre.layout == "nchw" else x)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `(N, C)` logits, stable for large values."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Classification:
    """Top-k classes of one image, best first."""

    class_ids: list[int]
    labels: list[str]
    scores: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> list[dict[str, Any]]:
        return [{"class_id": c, "label": lbl, "score": round(s, 6)} for c, lbl, s in zip(self.class_ids, self.labels, self.scores, strict=True)]


def top_k(scores: np.ndarray, labels: list[str], k: int = 5, apply_softmax: bool = True) -> list[Classification]:
    """`(N, C)` logits or probabilities -> N top-k classifications. Ties keep the lower class id first."""
    if scores.ndim != 2:
        raise ValueError(f"expected (N, C) scores, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores).all(axis=1)).tolist()
        raise FloatingPointError(f"model produced non-finite scores for batch rows {bad}")
    probs = softmax(scores) if apply_softmax else scores
    k = min(k, probs.shape[1])
    # stable argsort on -p: equal scores keep ascending class ids, so results are deterministic
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        Classification(row.tolist(), [labels[i] if i < len(labels) else str(i) for i in row], probs[n, row].astype(float).tolist())
        for n, row in enumerate(order)
    ]


class ImageClassifier:
    """One classification model's three stages. `preprocess` runs per image (in a decode thread),
    `run_batch` runs the session once for many images and postprocesses them together."""

    def __init__(self, model) -> None:  # model: operators.model_repository.LoadedModel
        self.model = model
        self.pre = ImagePreprocess.from_config(model.config.preprocess)
        self.k = int(model.config.postprocess.get("top_k", 5))
        self.apply_softmax = bool(model.config.postprocess.get("softmax", True))
        self.input_name = model.session.inputs[0].name

    def preprocess(self, image: np.ndarray | SourceImage) -> np.ndarray:
        return preprocess_image(pixels_of(image)[0], self.pre)

    def reduction_limit(self, width: int, height: int) -> float:
        """How many times smaller than `width` x `height` an image may be decoded with no detail lost to
        this model: its preprocessing never has to enlarge it."""
        if self.pre.resize == "stretch":
            return min(width / self.pre.width, height / self.pre.height)
        return min(width, height) / (max(self.pre.height, self.pre.width) / self.pre.crop_ratio)

    def run_batch(self, tensors: list[np.ndarray]) -> list[Classification]:
        batch = np.stack(tensors)
        (scores,) = self.model.session.run({self.input_name: batch}).values()
        return top_k(scores, self.model.labels, self.k, self.apply_softmax)
