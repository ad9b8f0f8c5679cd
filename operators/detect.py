"""Object detection: letterbox -> (session) -> decode YOLO output -> threshold -> NMS -> boxes in frame pixels.

Box formats used here, named wherever an array is declared:
- `cxcywh`: centre x, centre y, width, height (what YOLO heads emit, in model-input pixels);
- `xyxy`: left, top, right, bottom, with right/bottom exclusive-style edges (area = (x2-x1)*(y2-y1)).
Every result leaves this module as `Detections`, xyxy in the pixels of the original frame.

Two YOLO output layouts are decoded:
- YOLOv5 `(batch, boxes, 5 + classes)`: cx, cy, w, h, objectness, class scores; score = objectness * class score;
- YOLOv8 `(batch, 4 + classes, boxes)`: cx, cy, w, h, class scores; no objectness.
Each box gets its single best class (ties: lower class id), as ultralytics and NudeNet do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from operators.errors import BadInput
from operators.images import SourceImage, pixels_of

LETTERBOX_MODES = ("center", "top_left")
LAYOUTS = ("v5", "v8", "auto")
_DEFAULT_PAD = {"center": 114, "top_left": 0}  # ultralytics pads grey, NudeNet pads black


# ------------------------------------------------------------------------------------ letterbox
@dataclass(frozen=True)
class LetterboxInfo:
    """Where a frame went in the model input: `model_px = original_px * scale + pad` per axis.

    `pad_x`/`pad_y` are the left/top padding in model pixels; `width`/`height` the original frame's.
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int
    height: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """`(N, 4)` xyxy in model-input pixels -> `(N, 4)` float32 xyxy in original pixels (not clipped)."""
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], np.float64)
        pad = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float64)
        return ((np.asarray(boxes, np.float64) - pad) / scale).astype(np.float32)


def _target_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(height), int(width)


def letterbox(
    rgb: np.ndarray, size: int | tuple[int, int], mode: str = "center", pad_value: int | None = None
) -> tuple[np.ndarray, LetterboxInfo]:
    """Fit an `(H, W, 3) uint8` image into a `size` (int or `(height, width)`) model input, aspect kept.

    - `center` (ultralytics `LetterBox`): scale by `min(th/H, tw/W)`, resize (bilinear), pad both
      sides evenly with `pad_value` (default 114);
    - `top_left` (NudeNet): pad right/bottom with `pad_value` (default 0) to a `max(H, W)` square,
      then resize the square (bilinear) to `size`.

    Returns the `(th, tw, 3) uint8` image and the `LetterboxInfo` that maps boxes back.

    >>> img, info = letterbox(np.zeros((480, 640, 3), np.uint8), 320, "center")
    >>> img.shape, info.scale_x, info.pad_y
    ((320, 320, 3), 0.5, 40.0)
    """
    if mode not in LETTERBOX_MODES:
        raise ValueError(f"letterbox mode must be one of {LETTERBOX_MODES}, not {mode!r}")
    th, tw = _target_size(size)
    h, w = rgb.shape[:2]
    fill = _DEFAULT_PAD[mode] if pad_value is None else int(pad_value)
    if mode == "top_left":
        side = max(h, w)
        square = cv2.copyMakeBorder(rgb, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT, value=(fill, fill, fill))
        out = cv2.resize(square, (tw, th), interpolation=cv2.INTER_LINEAR) if (side, side) != (th, tw) else square
        return out, LetterboxInfo(tw / side, th / side, 0.0, 0.0, w, h)
    r = min(th / h, tw / w)
    new_w, new_h = max(1, round(w * r)), max(1, round(h * r))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_w, new_h) != (w, h) else rgb
    dw, dh = (tw - new_w) / 2, (th - new_h) / 2
    # ultralytics' rounding: an odd padding puts the extra pixel bottom/right
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    out = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(fill, fill, fill))
    return out, LetterboxInfo(new_w / w, new_h / h, float(left), float(top), w, h)


# --------------------------------------------------------------------------------- box geometry
def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """`(..., 4)` cxcywh -> `(..., 4)` xyxy, same dtype."""
    cx, cy, w, h = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """`(N, 4)` xyxy -> `(N, 4)` xyxy with x in `[0, width]` and y in `[0, height]` (a new array)."""
    return np.clip(boxes, 0, np.array([width, height, width, height], dtype=boxes.dtype))


def box_area(boxes: np.ndarray) -> np.ndarray:
    """`(N, 4)` xyxy -> `(N,)` areas; inverted boxes count as zero area."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU: `(N, 4)` xyxy and `(M, 4)` xyxy -> `(N, M)` float64 in [0, 1].

    Computed in float64 by broadcasting; a pair whose union is empty (two zero-area boxes) has IoU 0.

    >>> box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 0, 3, 2], [5, 5, 6, 6]]))
    array([[0.33333333, 0.        ]])
    """
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float = 0.45,
    class_ids: np.ndarray | None = None,
    max_detections: int | None = None,
) -> np.ndarray:
    """Greedy non-maximum suppression. Returns the kept indices `(K,)` int64, best score first.

    `boxes` `(N, 4)` xyxy, `scores` `(N,)`. A box is suppressed by a kept, higher-scoring box when
    their IoU is > `iou_threshold` and, if `class_ids` `(N,)` is given, they share a class
    (class-aware); `class_ids=None` is class-agnostic (like `cv2.dnn.NMSBoxes`). Equal scores keep
    the lower index first. Each greedy step compares the kept box with all remaining ones at once.

    >>> nms(np.array([[0, 0, 4, 4], [0, 0, 4, 4.5], [10, 10, 12, 12]]), np.array([0.8, 0.9, 0.3]), 0.5)
    array([1, 2])
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if len(boxes) != len(scores) or (class_ids is not None and len(class_ids) != len(scores)):
        raise ValueError(f"nms needs as many scores and class ids as boxes, got {len(boxes)} boxes, {len(scores)} scores")
    limit = len(boxes) if max_detections is None else max(0, int(max_detections))
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlapping = box_iou(boxes[best], boxes[rest])[0] > iou_threshold
        if class_ids is not None:
            overlapping &= class_ids[rest] == class_ids[best]
        order = rest[~overlapping]
    return np.asarray(keep, dtype=np.int64)


# ------------------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class Detections:
    """Detections in one frame, best score first.

    boxes: `(N, 4)` float32 xyxy in original-frame pixels, clipped to the frame;
    scores: `(N,)` float32; class_ids: `(N,)` int64; labels: N class names.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    labels: list[str]

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [])

    def __len__(self) -> int:
        return len(self.scores)

    def as_dict(self) -> list[dict[str, Any]]:
        """JSON-friendly: `[{"label", "class_id", "score", "box": [x1, y1, x2, y2]}]`, pixels rounded to 0.01."""
        return [
            {"label": label, "class_id": int(c), "score": round(float(s), 6), "box": [round(float(v), 2) for v in box]}
            for box, s, c, label in zip(self.boxes, self.scores, self.class_ids, self.labels, strict=True)
        ]


# ------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class DetectPreprocess:
    """How a detector wants its pixels: letterboxed to `height`x`width`, times `scale`, in `color_order`, NCHW."""

    height: int = 640
    width: int = 640
    letterbox: str = "center"
    pad_value: int | None = None  # None: the mode's default (center 114, top_left 0)
    scale: float = 1 / 255
    color_order: str = "rgb"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> DetectPreprocess:
        known = set(cls.__dataclass_fields__) - {"height", "width"} | {"size"}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown detection preprocessing keys: {sorted(unknown)}")
        args = {k: v for k, v in cfg.items() if k != "size"}
        if "size" in cfg:
            args["height"], args["width"] = _target_size(cfg["size"])
        if "scale" in args:
            args["scale"] = float(args["scale"])
        pre = cls(**args)
        if pre.letterbox not in LETTERBOX_MODES:
            raise ValueError(f"letterbox must be one of {LETTERBOX_MODES}, not {pre.letterbox!r}")
        if pre.color_order not in ("rgb", "bgr"):
            raise ValueError(f"color_order must be rgb or bgr, not {pre.color_order!r}")
        return pre


@dataclass(frozen=True)
class DetectPostprocess:
    """Decoding and filtering: output `layout`, score > `conf_threshold`, NMS at IoU > `iou_threshold`."""

    layout: str = "auto"
    conf_threshold: float = 0.25
    iou_threshold: float = 0.45
    class_agnostic: bool = False
    max_detections: int = 300

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> DetectPostprocess:
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown detection postprocessing keys: {sorted(unknown)}")
        post = cls(**cfg)
        if post.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {post.layout!r}")
        if not (0 <= post.conf_threshold <= 1 and 0 <= post.iou_threshold <= 1) or post.max_detections < 1:
            raise ValueError("conf_threshold and iou_threshold must be in [0, 1] and max_detections >= 1")
        return post


# ---------------------------------------------------------------------------- YOLO decoding
def yolo_layout(shape: tuple[int, ...], num_classes: int | None = None, layout: str = "auto") -> str:
    """The layout ("v5" or "v8") of a raw output of `shape` `(batch, a, b)`.

    `auto` matches the class count when it is known (v5: `b == 5 + classes`, v8: `a == 4 + classes`),
    otherwise, or when both match, takes the longer axis as the boxes axis.
    """
    if len(shape) != 3:
        raise ValueError(f"a YOLO output is (batch, a, b), got shape {tuple(shape)}")
    _, a, b = shape
    if layout in ("v5", "v8"):
        attrs = b if layout == "v5" else a
        needed = (5 if layout == "v5" else 4) + (num_classes or 1)
        if attrs < needed or (num_classes and attrs != needed):
            raise ValueError(f"output {tuple(shape)} is not {layout} with {num_classes or 'some'} classes")
        return layout
    if layout != "auto":
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if num_classes:
        v5, v8 = b == 5 + num_classes, a == 4 + num_classes
        if v5 != v8:
            return "v5" if v5 else "v8"
        if not v5:
            raise ValueError(f"output {tuple(shape)} fits neither v5 (b = 5 + {num_classes}) nor v8 (a = 4 + {num_classes})")
    return "v8" if a < b else "v5"


def decode_yolo(output: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw YOLO output -> boxes `(B, N, 4)` xyxy in model-input pixels and class scores `(B, N, C)`.

    v5 `(B, N, 5 + C)`: class scores are objectness * class probability; v8 `(B, 4 + C, N)`: as given.
    """
    if layout == "v8":
        preds = output.transpose(0, 2, 1)
        return cxcywh_to_xyxy(preds[..., :4]), preds[..., 4:]
    if layout == "v5":
        return cxcywh_to_xyxy(output[..., :4]), output[..., 5:] * output[..., 4:5]
    raise ValueError(f"decode_yolo needs layout v5 or v8, not {layout!r}")


def select_detections(
    boxes: np.ndarray, class_scores: np.ndarray, info: LetterboxInfo, post: DetectPostprocess, labels: list[str]
) -> Detections:
    """One image: boxes `(N, 4)` xyxy in model-input pixels and class scores `(N, C)` -> `Detections`.

    Best class per box, score > conf_threshold, boxes mapped to the original frame and clipped,
    zero-area boxes dropped (they lie wholly in the padding), then NMS and max_detections.
    NMS runs on the clipped frame boxes, as NudeNet does (IoU is unchanged by the uniform letterbox scale).
    """
    scores = class_scores.max(axis=1)
    candidates = np.flatnonzero(scores > post.conf_threshold)
    if candidates.size == 0:
        return Detections.empty()
    class_ids = class_scores[candidates].argmax(axis=1).astype(np.int64)
    scores = scores[candidates].astype(np.float32)
    frame_boxes = clip_boxes(info.to_original(boxes[candidates]), info.width, info.height)
    visible = box_area(frame_boxes) > 0
    frame_boxes, scores, class_ids = frame_boxes[visible], scores[visible], class_ids[visible]
    keep = nms(frame_boxes, scores, post.iou_threshold, None if post.class_agnostic else class_ids, post.max_detections)
    ids = class_ids[keep]
    names = [labels[i] if i < len(labels) else str(i) for i in ids.tolist()]
    return Detections(frame_boxes[keep], scores[keep], ids, names)


def postprocess_yolo(
    output: np.ndarray, infos: list[LetterboxInfo], post: DetectPostprocess, labels: list[str]
) -> list[Detections]:
    """A batch's raw YOLO output `(B, ...)` and each image's `LetterboxInfo` -> B `Detections`."""
    if output.shape[0] != len(infos):
        raise ValueError(f"output has {output.shape[0]} images but {len(infos)} letterbox infos were given")
    if not np.all(np.isfinite(output)):
        bad = np.flatnonzero(~np.isfinite(output.reshape(len(infos), -1)).all(axis=1)).tolist()
        raise FloatingPointError(f"model produced non-finite outputs for batch rows {bad}")
    layout = yolo_layout(output.shape, len(labels) or None, post.layout)
    boxes, class_scores = decode_yolo(output, layout)
    return [select_detections(b, s, info, post, labels) for b, s, info in zip(boxes, class_scores, infos, strict=True)]


# ------------------------------------------------------------------------------------ operator
class ObjectDetector:
    """One YOLO-family detection model's three stages. `preprocess` runs per image (in a decode thread),
    `run_batch` runs the session once for a batch of images of any original sizes."""

    def __init__(self, model) -> None:  # model: operators.model_repository.LoadedModel
        self.model = model
        self.pre = DetectPreprocess.from_config(model.config.preprocess)
        self.post = DetectPostprocess.from_config(model.config.postprocess)
        self.labels = list(model.labels)
        self.input_name = model.session.inputs[0].name
        declared = model.session.inputs[0].shape[2:]
        if len(declared) == 2 and all(isinstance(d, int) for d in declared) and tuple(declared) != (self.pre.height, self.pre.width):
            raise ValueError(f"{model.ref}: preprocess size {self.pre.height}x{self.pre.width} but the model input is {declared[0]}x{declared[1]}")
        outputs = getattr(model.session, "outputs", None)
        if outputs and self.labels:
            self._check_output(tuple(outputs[0].shape))

    def _check_output(self, shape: tuple) -> None:
        """A label count that does not fit the declared output fails at load, not on the first batch."""
        if len(shape) != 3:
            return
        static = [d if isinstance(d, int) else None for d in shape]
        attrs_axis = {"v5": 2, "v8": 1}.get(self.post.layout)
        if (attrs_axis and static[attrs_axis]) or (static[1] and static[2]):
            try:  # a dynamic boxes axis stands in as a large count; only the attribute axis is checked then
                yolo_layout((1, static[1] or 1 << 20, static[2] or 1 << 20), len(self.labels), self.post.layout)
            except ValueError as exc:
                raise ValueError(f"{self.model.ref}: {len(self.labels)} labels do not fit the model output: {exc}") from exc

    def reduction_limit(self, width: int, height: int) -> float:
        """How many times smaller than `width` x `height` an image may be decoded with no detail lost to
        this model: the letterbox never has to enlarge it."""
        if self.pre.letterbox == "top_left":
            return max(width, height) / max(self.pre.height, self.pre.width)
        return max(height / self.pre.height, width / self.pre.width)

    def preprocess(self, image: np.ndarray | SourceImage) -> tuple[np.ndarray, LetterboxInfo]:
        """RGB `(H, W, 3) uint8` (or a SourceImage, maybe decoded smaller) -> float32 `(3, height, width)`
        tensor and the `LetterboxInfo` that maps boxes back to the original image's pixels."""
        rgb, width, height = pixels_of(image)
        tensor, info = self._preprocess_pixels(rgb)
        if (width, height) != (info.width, info.height):  # decoded at a reduced scale
            info = LetterboxInfo(info.scale_x * info.width / width, info.scale_y * info.height / height,
                                 info.pad_x, info.pad_y, width, height)
        return tensor, info

    def _preprocess_pixels(self, rgb: np.ndarray) -> tuple[np.ndarray, LetterboxInfo]:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            raise BadInput("bad_image_array", f"expected an (H, W, 3) uint8 RGB array, got {shape} {getattr(rgb, 'dtype', type(rgb).__name__)}")
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise BadInput("bad_dimensions", f"image dimensions must be positive, got {rgb.shape[1]}x{rgb.shape[0]}")
        pixels, info = letterbox(rgb, (self.pre.height, self.pre.width), self.pre.letterbox, self.pre.pad_value)
        if self.pre.color_order == "bgr":
            pixels = pixels[..., ::-1]
        tensor = pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(self.pre.scale)
        return np.ascontiguousarray(tensor), info

    def run_batch(self, items: list[tuple[np.ndarray, LetterboxInfo]]) -> list[Detections]:
        batch = np.stack([tensor for tensor, _ in items])
        output = next(iter(self.model.session.run({self.input_name: batch}).values()))
        return postprocess_yolo(output, [info for _, info in items], self.post, self.labels)
