"""Decoding JPEGs at reduced scale (libjpeg's DCT scaling) gives the models the same answers as full
decoding: the real EfficientNet-Lite0 and NudeNet models on scikit-image photos, enlarged to camera
sizes, decoded both ways."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from operators.classify import ImageClassifier
from operators.detect import ObjectDetector, box_iou
from operators.images import SourceImage, decode_source, encode_image, reduction_for
from operators.model_repository import ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy

REPO = ModelRepository(Path(__file__).resolve().parent.parent / "models")
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "retina", "immunohistochemistry", "hubble_deep_field"]


def _jpeg(name: str, size: tuple[int, int]) -> bytes:
    return encode_image(cv2.resize(getattr(skdata, name)(), size, interpolation=cv2.INTER_CUBIC), "jpeg")


@pytest.fixture(scope="module")
def classifier() -> ImageClassifier:
    return ImageClassifier(REPO.load("efficientnet-lite0", providers=("cpu",), intra_op_threads=1))


@pytest.fixture(scope="module")
def detector() -> ObjectDetector:
    return ObjectDetector(REPO.load("nudenet-320n", providers=("cpu",), intra_op_threads=1))


@pytest.mark.parametrize("limit, factor", [(1.0, 1), (1.99, 1), (2.0, 2), (3.75, 2), (4.0, 4), (7.9, 4), (8.0, 8), (40.0, 8)])
def test_the_scale_is_the_largest_libjpeg_denominator_within_the_limit(limit, factor):
    assert reduction_for(limit) == factor


def test_a_reduced_decode_keeps_the_original_size_for_geometry():
    jpeg = _jpeg("coffee", (1280, 960))
    image = decode_source(jpeg, "jpeg", 1280, 960, reduction_limit=lambda w, h: 4.5)
    assert isinstance(image, SourceImage)
    assert image.rgb.shape == (240, 320, 3)  # decoded at 1/4
    assert (image.width, image.height) == (1280, 960)
    full = decode_source(jpeg, "jpeg", 1280, 960)
    assert full.rgb.shape == (960, 1280, 3)  # no limit given: full size


def test_the_classifier_never_gets_less_than_its_resize_target(classifier):
    # center_crop: the shorter side goes to 224 / 0.875 = 256 px; 640x480 must stay full size
    assert reduction_for(classifier.reduction_limit(640, 480)) == 1
    assert reduction_for(classifier.reduction_limit(1280, 960)) == 2
    image = decode_source(_jpeg("rocket", (1920, 1080)), reduction_limit=classifier.reduction_limit)
    assert min(image.rgb.shape[:2]) >= 256


@pytest.mark.parametrize("size", [(1280, 960), (2560, 1920)])
def test_classifier_top1_agrees_with_full_decoding_on_every_photo(classifier, size):
    for name in PHOTOS:
        jpeg = _jpeg(name, size)
        reduced = decode_source(jpeg, reduction_limit=classifier.reduction_limit)
        assert reduced.rgb.shape[1] < size[0]  # it really was decoded smaller
        full, small = classifier.run_batch([classifier.preprocess(decode_source(jpeg)), classifier.preprocess(reduced)])
        assert full.class_ids[0] == small.class_ids[0], (name, full.labels[:3], small.labels[:3])


@pytest.mark.parametrize("size", [(1280, 1280), (1600, 1200), (1200, 1600)])
def test_detector_boxes_match_full_decoding_at_iou_0_9_in_original_pixels(detector, size):
    jpeg = _jpeg("astronaut", size)
    reduced = decode_source(jpeg, reduction_limit=detector.reduction_limit)
    assert max(reduced.rgb.shape[:2]) < max(size)
    full, small = detector.run_batch([detector.preprocess(decode_source(jpeg)), detector.preprocess(reduced)])
    assert len(full.boxes) >= 1 and full.labels == small.labels
    iou = box_iou(full.boxes, small.boxes)
    assert np.all(iou.diagonal() >= 0.9), iou
    assert small.boxes[:, 2].max() > reduced.rgb.shape[1]  # in original pixels, beyond the reduced width


def test_one_decode_serves_every_model_at_the_scale_the_most_demanding_allows(classifier, detector):
    policy = Policy.from_dict({"checks": {
        "objects": {"model": "efficientnet-lite0", "input": "image", "labels": ["missile"]},
        "nsfw": {"model": "nudenet-320n", "input": "image", "labels": ["FACE_FEMALE"]}}})
    moderator = Moderator(REPO, policy, providers=("cpu",), intra_op_threads=1)
    assignment = moderator.assign("frame-1", lease=False)
    limit = moderator.reduction_limit(assignment, 2560, 1920)
    assert limit == pytest.approx(min(classifier.reduction_limit(2560, 1920), detector.reduction_limit(2560, 1920)))
    assert reduction_for(limit) == 4  # the classifier allows 7.5, the detector 8: 1/4


def test_the_decode_reduced_setting_turns_it_off():
    from streams.config import Settings
    from streams.moderation import ModerationPipeline

    policy = Policy.from_dict({"checks": {"objects": {"model": "efficientnet-lite0", "input": "image", "labels": ["missile"]}}})
    moderator = Moderator(REPO, policy, providers=("cpu",), intra_op_threads=1)
    assignment = moderator.assign("frame-1", lease=False)
    on = ModerationPipeline(Settings(), moderator)._reduction(assignment)
    assert reduction_for(on(1280, 960)) == 2
    assert ModerationPipeline(Settings().replace(decode_reduced=False), moderator)._reduction(assignment) is None
