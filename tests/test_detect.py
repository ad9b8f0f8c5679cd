"""Detection pre/postprocessing against independent oracles: supervision's IoU and NMS, OpenCV's
NMSBoxes, a brute-force NMS, hand-computed letterbox arithmetic and synthetic YOLOv5/YOLOv8 outputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from operators.detect import (
    Detections,
    DetectPostprocess,
    DetectPreprocess,
    LetterboxInfo,
    ObjectDetector,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    letterbox,
    nms,
    postprocess_yolo,
    yolo_layout,
)
from operators.errors import BadInput
from operators.model_repository import LoadedModel, ModelConfig
from operators.session import TensorSpec

LABELS = ["person", "car", "dog"]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _random_boxes(n: int, rng: np.random.Generator, extent: float = 100.0) -> np.ndarray:
    """`(n, 4)` xyxy boxes clustered in a small area so that many overlap."""
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(5, extent / 2, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _brute_force_nms(boxes, scores, thr, class_ids=None):
    """Textbook greedy NMS, one pair at a time."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
        return iw * ih / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= thr or (class_ids is not None and class_ids[i] != class_ids[k]) for k in kept):
            kept.append(i)
    return kept


# ------------------------------------------------------------------------------------ letterbox
def test_center_letterbox_halves_640x480_and_pads_40_rows_of_114_above_and_below():
    img = _image(480, 640)
    out, info = letterbox(img, 320, "center")
    assert out.shape == (320, 320, 3)
    assert (out[:40] == 114).all() and (out[280:] == 114).all()
    np.testing.assert_array_equal(out[40:280], cv2.resize(img, (320, 240), interpolation=cv2.INTER_LINEAR))
    assert info == LetterboxInfo(0.5, 0.5, 0.0, 40.0, 640, 480)


def test_center_letterbox_puts_the_odd_padding_pixel_at_the_bottom():
    # 100 wide x 61 high into 64: scale 0.64 -> 64 x round(39.04) = 39 rows, 25 rows of padding = 12 + 13
    out, info = letterbox(_image(61, 100), 64, "center")
    assert out.shape == (64, 64, 3)
    assert (out[:12] == 114).all() and (out[51:] == 114).all()
    assert not (out[12] == 114).all()
    assert (info.pad_x, info.pad_y, info.scale_x, info.scale_y) == (0.0, 12.0, 0.64, 39 / 61)


def test_center_letterbox_upscales_small_images_and_pads_left_and_right():
    img = _image(40, 20)
    out, info = letterbox(img, (80, 80), "center")
    assert (out[:, :20] == 114).all() and (out[:, 60:] == 114).all()
    np.testing.assert_array_equal(out[:, 20:60], cv2.resize(img, (40, 80), interpolation=cv2.INTER_LINEAR))
    assert (info.scale_x, info.scale_y, info.pad_x, info.pad_y) == (2.0, 2.0, 20.0, 0.0)


def test_top_left_letterbox_pads_right_and_bottom_with_zeros_to_a_square_then_resizes():
    img = _image(300, 451)
    out, info = letterbox(img, 320, "top_left")
    square = np.zeros((451, 451, 3), np.uint8)
    square[:300, :451] = img
    np.testing.assert_array_equal(out, cv2.resize(square, (320, 320), interpolation=cv2.INTER_LINEAR))
    assert info == LetterboxInfo(320 / 451, 320 / 451, 0.0, 0.0, 451, 300)


def test_top_left_letterbox_of_a_tall_image_leaves_the_right_side_black():
    out, _ = letterbox(_image(400, 200), 100, "top_left")
    assert (out[:, 51:] == 0).all()


def test_letterbox_pad_value_overrides_the_mode_default():
    out, _ = letterbox(_image(10, 20), 20, "center", pad_value=7)
    assert (out[:5] == 7).all()


def test_letterbox_rejects_unknown_modes():
    with pytest.raises(ValueError, match="letterbox mode"):
        letterbox(_image(4, 4), 8, "stretch")


@pytest.mark.parametrize("mode", ["center", "top_left"])
def test_letterbox_info_maps_model_boxes_back_to_original_pixels(mode):
    _, info = letterbox(_image(300, 451), 320, mode)
    original = np.array([[10.0, 20.0, 200.0, 290.0], [0.0, 0.0, 451.0, 300.0]])
    s = 320 / 451  # both modes: the longer side (451) becomes 320
    pad_y = (320 - round(300 * s)) // 2 if mode == "center" else 0  # 213 rows of image, 107 padding
    model = original * s + np.array([0, pad_y, 0, pad_y])
    # center rounds the resized height (212.86 -> 213), so its y scale differs from s by < 0.1 %
    np.testing.assert_allclose(info.to_original(model), original, atol=0.2 if mode == "center" else 1e-3)


# ------------------------------------------------------------------------------- box geometry
def test_cxcywh_to_xyxy():
    np.testing.assert_array_equal(cxcywh_to_xyxy(np.array([[10.0, 20.0, 4.0, 6.0]])), [[8.0, 17.0, 12.0, 23.0]])


def test_clip_boxes_clamps_every_edge_to_the_frame():
    boxes = np.array([[-5.0, -3.0, 50.0, 40.0], [90.0, 70.0, 130.0, 95.0]], np.float32)
    np.testing.assert_array_equal(clip_boxes(boxes, 100, 80), [[0, 0, 50, 40], [90, 70, 100, 80]])


def test_box_iou_equals_supervision_on_random_boxes():
    rng = np.random.default_rng(1)
    a, b = _random_boxes(40, rng), _random_boxes(25, rng)
    np.testing.assert_allclose(box_iou(a, b), sv.box_iou_batch(a, b), atol=1e-6)


def test_box_iou_of_zero_area_boxes_is_zero_not_nan():
    boxes = np.array([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 0.0], [0.0, 0.0, 10.0, 10.0]])
    iou = box_iou(boxes, boxes)
    assert np.isfinite(iou).all()
    np.testing.assert_array_equal(iou, np.diag([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(iou, sv.box_iou_batch(boxes, boxes))


# ------------------------------------------------------------------------------------------ NMS
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_class_agnostic_nms_equals_supervision(seed, thr):
    rng = np.random.default_rng(seed)
    boxes, scores = _random_boxes(120, rng), rng.permutation(120) / 120 + 0.001  # distinct scores
    kept = nms(boxes, scores, thr)
    expected = sv.box_non_max_suppression(np.c_[boxes, scores], iou_threshold=thr)
    assert set(kept.tolist()) == set(np.flatnonzero(expected).tolist())
    assert np.all(np.diff(scores[kept]) < 0)  # best first


@pytest.mark.parametrize("seed", [3, 4])
def test_class_aware_nms_equals_supervision(seed):
    rng = np.random.default_rng(seed)
    boxes, scores = _random_boxes(150, rng), rng.permutation(150) / 150 + 0.001
    class_ids = rng.integers(0, 3, 150)
    kept = nms(boxes, scores, 0.45, class_ids=class_ids)
    expected = sv.box_non_max_suppression(np.c_[boxes, scores, class_ids], iou_threshold=0.45)
    assert set(kept.tolist()) == set(np.flatnonzero(expected).tolist())


def test_class_aware_nms_equals_brute_force_in_order():
    rng = np.random.default_rng(5)
    boxes, scores = _random_boxes(80, rng), rng.permutation(80) / 80 + 0.001
    class_ids = rng.integers(0, 2, 80)
    assert nms(boxes, scores, 0.5, class_ids=class_ids).tolist() == _brute_force_nms(boxes, scores, 0.5, class_ids)


def test_class_agnostic_nms_equals_opencv_nmsboxes_as_nudenet_calls_it():
    rng = np.random.default_rng(6)
    boxes, scores = _random_boxes(100, rng), rng.uniform(0.3, 1.0, 100)
    xywh = np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]
    expected = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.25, 0.45)
    assert nms(boxes, scores, 0.45).tolist() == np.asarray(expected).reshape(-1).tolist()


def test_nms_with_all_boxes_of_one_class_equals_class_agnostic_nms():
    rng = np.random.default_rng(7)
    boxes, scores = _random_boxes(60, rng), rng.uniform(size=60)
    assert nms(boxes, scores, 0.5, class_ids=np.full(60, 2)).tolist() == nms(boxes, scores, 0.5).tolist()


def test_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5]], float)
    assert nms(boxes, np.array([0.9, 0.8]), 0.5, class_ids=np.array([0, 1])).tolist() == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0]


def test_nms_max_detections_keeps_the_best_k_of_the_full_result():
    rng = np.random.default_rng(8)
    boxes, scores = _random_boxes(100, rng), rng.uniform(size=100)
    assert nms(boxes, scores, 0.5, max_detections=3).tolist() == nms(boxes, scores, 0.5)[:3].tolist()


def test_nms_breaks_score_ties_by_lower_index():
    boxes = np.array([[0, 0, 10, 10]] * 3, float)
    assert nms(boxes, np.array([0.5, 0.7, 0.7]), 0.5).tolist() == [1]


def test_nms_zero_area_boxes_neither_suppress_nor_are_suppressed():
    boxes = np.array([[5, 5, 5, 5], [0, 0, 10, 10], [5, 5, 5, 5], [2, 2, 8, 2]], float)
    assert nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), 0.1).tolist() == [0, 1, 2, 3]


def test_nms_of_no_boxes_is_an_empty_index_array():
    kept = nms(np.zeros((0, 4)), np.zeros(0), 0.5)
    assert kept.shape == (0,) and kept.dtype == np.int64


# ------------------------------------------------------------------------------- YOLO decoding
def _v8_output(rows, num_classes: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """(1, 4 + C, n): `rows` = [(cx, cy, w, h, class_id, score)] in model pixels, then low-score noise."""
    rng = np.random.default_rng(seed)
    preds = np.zeros((n, 4 + num_classes), np.float32)
    preds[:, :2] = rng.uniform(0, 320, (n, 2))
    preds[:, 2:4] = rng.uniform(5, 50, (n, 2))
    preds[:, 4:] = rng.uniform(0, 0.1, (n, num_classes))
    for i, (cx, cy, w, h, c, s) in enumerate(rows):
        preds[i, :4] = cx, cy, w, h
        preds[i, 4 + c] = s
    return preds.T[None]


def _v5_output(rows, num_classes: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """(1, n, 5 + C): `rows` = [(cx, cy, w, h, objectness, class_id, class_score)], then low-score noise."""
    rng = np.random.default_rng(seed)
    preds = np.zeros((n, 5 + num_classes), np.float32)
    preds[:, :2] = rng.uniform(0, 320, (n, 2))
    preds[:, 2:4] = rng.uniform(5, 50, (n, 2))
    preds[:, 4] = rng.uniform(0, 0.3, n)
    preds[:, 5:] = rng.uniform(0, 0.3, (n, num_classes))
    for i, (cx, cy, w, h, obj, c, s) in enumerate(rows):
        preds[i, :5] = cx, cy, w, h, obj
        preds[i, 5 + c] = s
    return preds[None]


CENTER_640x480 = LetterboxInfo(0.5, 0.5, 0.0, 40.0, 640, 480)  # letterbox(640x480 frame, 320, "center")
TOP_LEFT_451x300 = LetterboxInfo(320 / 451, 320 / 451, 0.0, 0.0, 451, 300)  # letterbox(451x300, 320, "top_left")


def test_v8_output_decodes_to_original_pixels_through_a_center_letterbox():
    # frame box [100, 50, 300, 250] -> model: x * 0.5, y * 0.5 + 40 = [50, 65, 150, 165] -> cxcywh (100, 115, 100, 100)
    out = _v8_output([(100, 115, 100, 100, 2, 0.9)], 3)
    (det,) = postprocess_yolo(out, [CENTER_640x480], DetectPostprocess(layout="v8"), LABELS)
    assert det.labels == ["dog"] and det.class_ids.tolist() == [2]
    np.testing.assert_allclose(det.scores, [0.9])
    np.testing.assert_allclose(det.boxes, [[100, 50, 300, 250]], atol=1e-3)
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (1, 4)


def test_v8_output_decodes_to_original_pixels_through_a_top_left_letterbox():
    # frame box [45.1, 30, 225.5, 270.6] -> model: * 320/451 = [32, 21.286, 160, 192] -> cxcywh (96, 106.643, 128, 170.714)
    out = _v8_output([(96, 106.643, 128, 170.714, 0, 0.8)], 3)
    (det,) = postprocess_yolo(out, [TOP_LEFT_451x300], DetectPostprocess(layout="v8"), LABELS)
    np.testing.assert_allclose(det.boxes, [[45.1, 30, 225.5, 270.6]], atol=1e-2)


def test_v5_score_is_objectness_times_class_score():
    # frame box [200, 100, 400, 300] -> model [100, 90, 200, 190] -> cxcywh (150, 140, 100, 100)
    rows = [(150, 140, 100, 100, 0.9, 1, 0.8), (40, 250, 30, 30, 0.2, 0, 0.99)]  # 2nd: 0.198 < 0.25
    (det,) = postprocess_yolo(_v5_output(rows, 3), [CENTER_640x480], DetectPostprocess(layout="v5"), LABELS)
    assert det.labels == ["car"]
    np.testing.assert_allclose(det.scores, [0.72], rtol=1e-6)
    np.testing.assert_allclose(det.boxes, [[200, 100, 400, 300]], atol=1e-3)


def test_v5_and_v8_layouts_of_the_same_predictions_give_the_same_detections():
    rows = [(100, 115, 100, 100, 2, 0.9), (200, 200, 40, 60, 0, 0.6), (205, 205, 40, 60, 1, 0.5)]
    v8 = _v8_output(rows, 3, seed=9)
    v5 = np.concatenate([v8[0, :4].T, np.ones((64, 1), np.float32), v8[0, 4:].T], axis=1)[None]
    (a,) = postprocess_yolo(v8, [CENTER_640x480], DetectPostprocess(), LABELS)
    (b,) = postprocess_yolo(v5, [CENTER_640x480], DetectPostprocess(), LABELS)
    assert len(a) == 3 and a.labels == b.labels
    np.testing.assert_allclose(a.boxes, b.boxes)


def test_auto_layout_reads_the_shape_and_class_count():
    assert yolo_layout((1, 25200, 85), 80) == "v5"
    assert yolo_layout((1, 84, 8400), 80) == "v8"
    assert yolo_layout((2, 22, 2100), None) == "v8"  # no labels: the long axis holds the boxes
    assert yolo_layout((2, 2100, 23), None) == "v5"
    with pytest.raises(ValueError, match="neither"):
        yolo_layout((1, 84, 8400), 3)
    with pytest.raises(ValueError, match="not v5"):
        yolo_layout((1, 84, 8400), 80, "v5")


def test_no_boxes_above_the_threshold_gives_empty_detections():
    (det,) = postprocess_yolo(_v8_output([], 3), [CENTER_640x480], DetectPostprocess(), LABELS)
    assert len(det) == 0 and det.as_dict() == []
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.class_ids.shape == (0,)


def test_the_threshold_is_strict():
    (det,) = postprocess_yolo(_v8_output([(100, 100, 20, 20, 0, 0.5)], 3), [CENTER_640x480],
                              DetectPostprocess(conf_threshold=0.5), LABELS)
    assert len(det) == 0


def test_boxes_crossing_the_frame_border_are_clipped_to_it():
    # model cxcywh (10, 50, 40, 40) -> model xyxy [-10, 30, 30, 70] -> frame [-20, -20, 60, 60] -> clipped [0, 0, 60, 60]
    # model (310, 270, 40, 40) -> [290, 250, 330, 290] -> frame [580, 420, 660, 500] -> clipped [580, 420, 640, 480]
    out = _v8_output([(10, 50, 40, 40, 0, 0.9), (310, 270, 40, 40, 1, 0.8)], 3)
    (det,) = postprocess_yolo(out, [CENTER_640x480], DetectPostprocess(), LABELS)
    np.testing.assert_allclose(det.boxes, [[0, 0, 60, 60], [580, 420, 640, 480]], atol=1e-3)


def test_a_box_wholly_in_the_padding_is_dropped():
    out = _v8_output([(160, 15, 40, 20, 0, 0.9)], 3)  # model rows 5..25, the frame starts at row 40
    (det,) = postprocess_yolo(out, [CENTER_640x480], DetectPostprocess(), LABELS)
    assert len(det) == 0


def test_class_agnostic_option_suppresses_across_classes():
    rows = [(100, 100, 40, 40, 0, 0.9), (101, 100, 40, 40, 1, 0.8)]
    (aware,) = postprocess_yolo(_v8_output(rows, 3), [CENTER_640x480], DetectPostprocess(), LABELS)
    (agnostic,) = postprocess_yolo(_v8_output(rows, 3), [CENTER_640x480], DetectPostprocess(class_agnostic=True), LABELS)
    assert aware.labels == ["person", "car"] and agnostic.labels == ["person"]


def test_max_detections_keeps_the_best_scoring():
    rows = [(40 * i + 20, 100, 20, 20, 0, 0.3 + 0.1 * i) for i in range(6)]
    (det,) = postprocess_yolo(_v8_output(rows, 3), [CENTER_640x480], DetectPostprocess(max_detections=2), LABELS)
    np.testing.assert_allclose(det.scores, [0.8, 0.7], rtol=1e-6)


def test_without_labels_classes_are_named_by_number():
    (det,) = postprocess_yolo(_v8_output([(100, 100, 20, 20, 2, 0.9)], 3), [CENTER_640x480], DetectPostprocess(), [])
    assert det.labels == ["2"]


def test_a_label_count_that_does_not_fit_the_output_is_refused():
    with pytest.raises(ValueError, match="not v8 with 1 classes"):
        postprocess_yolo(_v8_output([], 3), [CENTER_640x480], DetectPostprocess(layout="v8"), ["person"])


def test_non_finite_outputs_are_refused_naming_the_batch_row():
    out = np.concatenate([_v8_output([], 3), _v8_output([], 3)])
    out[1, 5, 7] = np.nan
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        postprocess_yolo(out, [CENTER_640x480] * 2, DetectPostprocess(), LABELS)


def test_as_dict_is_json_friendly_xyxy():
    det = Detections(np.array([[1.234, 2, 3, 4]], np.float32), np.array([0.5], np.float32), np.array([1]), ["car"])
    assert json.loads(json.dumps(det.as_dict())) == [{"label": "car", "class_id": 1, "score": 0.5, "box": [1.23, 2.0, 3.0, 4.0]}]


# ----------------------------------------------------------------------------- configuration
def test_preprocess_config_reads_size_mode_scale_and_colour_order():
    pre = DetectPreprocess.from_config({"size": [256, 320], "letterbox": "top_left", "scale": 0.5, "color_order": "bgr"})
    assert (pre.height, pre.width, pre.letterbox, pre.scale, pre.color_order) == (256, 320, "top_left", 0.5, "bgr")


@pytest.mark.parametrize("cfg", [{"mean": [0, 0, 0]}, {"letterbox": "stretch"}, {"color_order": "hsv"}])
def test_preprocess_config_rejects_unknown_keys_and_values(cfg):
    with pytest.raises(ValueError):
        DetectPreprocess.from_config(cfg)


@pytest.mark.parametrize("cfg", [{"nms": 0.5}, {"layout": "v7"}, {"conf_threshold": 1.5}, {"max_detections": 0}])
def test_postprocess_config_rejects_unknown_keys_and_values(cfg):
    with pytest.raises(ValueError):
        DetectPostprocess.from_config(cfg)


# ------------------------------------------------------------------------------------ operator
class _FakeSession:
    """Stands in for OnnxSession: returns a prepared raw output and records the batch it was given."""

    def __init__(self, output: np.ndarray) -> None:
        self.inputs = [TensorSpec("images", np.dtype(np.float32), ("batch", 3, 320, 320))]
        self.outputs = [TensorSpec("output0", np.dtype(np.float32), ("batch", 7, "boxes"))]
        self.output = output
        self.fed: list[np.ndarray] = []

    def run(self, feeds):
        self.fed.append(feeds["images"])
        return {"output0": self.output}


def _detector(output: np.ndarray, preprocess: dict, postprocess: dict | None = None) -> ObjectDetector:
    cfg = ModelConfig("fake", "1", "detect", Path("."), preprocess=preprocess, postprocess=postprocess or {})
    return ObjectDetector(LoadedModel(cfg, _FakeSession(output), LABELS))


def test_preprocess_gives_a_scaled_nchw_float_tensor_and_its_letterbox():
    img = _image(480, 640)
    tensor, info = _detector(np.zeros((1, 7, 10)), {"size": 320}).preprocess(img)
    expected, expected_info = letterbox(img, 320, "center")
    assert tensor.shape == (3, 320, 320) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    np.testing.assert_allclose(tensor, expected.transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert info == expected_info


def test_preprocess_bgr_reverses_the_channels():
    img = _image(320, 320)
    tensor, _ = _detector(np.zeros((1, 7, 10)), {"size": 320, "color_order": "bgr", "scale": 1.0}).preprocess(img)
    np.testing.assert_array_equal(tensor, img[..., ::-1].transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8), b"jpeg"])
def test_preprocess_refuses_anything_but_an_rgb_uint8_array(bad):
    with pytest.raises(BadInput):
        _detector(np.zeros((1, 7, 10)), {"size": 320}).preprocess(bad)


def test_detector_refuses_a_size_that_differs_from_the_model_input():
    with pytest.raises(ValueError, match="320x320"):
        _detector(np.zeros((1, 7, 10)), {"size": 640})


def test_detector_refuses_labels_that_do_not_fit_a_declared_output_at_load():
    # the fake session declares 7 = 4 + 3 attributes per box: two labels cannot be a v8 head of it
    cfg = ModelConfig("fake", "1", "detect", Path("."), preprocess={"size": 320}, postprocess={"layout": "v8"})
    with pytest.raises(ValueError, match="2 labels do not fit"):
        ObjectDetector(LoadedModel(cfg, _FakeSession(np.zeros((1, 6, 10))), ["a", "b"]))


def test_a_batch_of_mixed_image_sizes_maps_each_box_to_its_own_frame():
    # the same model-space box (cxcywh 160, 160, 64, 64 -> xyxy [128, 128, 192, 192]) in three letterboxed frames:
    #   640x480 center:   x / 0.5, (y - 40) / 0.5        -> [256, 176, 384, 304]
    #   200x400 center:   scale 0.8, pad_x 80: (x-80)/0.8 -> [60, 160, 140, 240]
    #   100x50 center:    scale 3.2, pad_y 80: x / 3.2, (y - 80) / 3.2 -> [40, 15, 60, 35]
    one = _v8_output([(160, 160, 64, 64, 1, 0.9)], 3)[0]
    detector = _detector(np.stack([one, one, one]), {"size": 320}, {"layout": "v8"})
    items = [detector.preprocess(_image(h, w)) for h, w in [(480, 640), (400, 200), (50, 100)]]
    results = detector.run_batch(items)
    assert detector.model.session.fed[0].shape == (3, 3, 320, 320)
    expected = [[256, 176, 384, 304], [60, 160, 140, 240], [40, 15, 60, 35]]
    for det, box in zip(results, expected, strict=True):
        assert det.labels == ["car"]
        np.testing.assert_allclose(det.boxes, [box], atol=1e-3)
