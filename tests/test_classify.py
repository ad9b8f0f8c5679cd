"""Classification preprocessing/postprocessing against independent oracles, and the real
EfficientNet-Lite0 on scikit-image sample photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.special
from skimage import data as skdata

from operators.classify import (
    ImageClassifier,
    ImagePreprocess,
    preprocess_image,
    resize_for_model,
    softmax,
    top_k,
)
from operators.model_repository import ModelRepository

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


def _center_crop_oracle(rgb: np.ndarray, size: int, crop_ratio: float) -> np.ndarray:
    """The documented transform, written out: one scale factor that brings the shorter side to
    size/crop_ratio (aspect kept), then the central size x size square."""
    h, w = rgb.shape[:2]
    factor = (size / crop_ratio) / min(h, w)
    new_h, new_w = round(h * factor), round(w * factor)
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# -------------------------------------------------------------------------------- configuration
def test_from_config_accepts_size_as_int_and_as_pair():
    assert (ImagePreprocess.from_config({"size": 64}).height, ImagePreprocess.from_config({"size": 64}).width) == (64, 64)
    pre = ImagePreprocess.from_config({"size": [48, 80], "mean": [1, 2, 3], "std": [4, 5, 6]})
    assert (pre.height, pre.width) == (48, 80)
    assert pre.mean == (1.0, 2.0, 3.0)
    assert pre.std == (4.0, 5.0, 6.0)


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="normalise"):
        ImagePreprocess.from_config({"size": 32, "normalise": True})


def test_from_config_rejects_unknown_resize_mode():
    with pytest.raises(ValueError, match="resize"):
        ImagePreprocess.from_config({"resize": "letterbox"})


@pytest.mark.parametrize("cfg", [{"layout": "chw"}, {"color_order": "rgba"}])
def test_from_config_rejects_unknown_layout_or_colour_order(cfg):
    with pytest.raises(ValueError):
        ImagePreprocess.from_config(cfg)


# -------------------------------------------------------------------------------- preprocessing
def test_preprocess_nchw_shape_and_dtype():
    pre = ImagePreprocess(height=40, width=56, resize="stretch")
    x = preprocess_image(_random_image(100, 70), pre)
    assert x.shape == (3, 40, 56)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]


def test_preprocess_nhwc_shape_and_dtype():
    pre = ImagePreprocess(height=40, width=56, resize="stretch", layout="nhwc")
    x = preprocess_image(_random_image(100, 70), pre)
    assert x.shape == (40, 56, 3)
    assert x.dtype == np.float32


def test_normalisation_equals_numpy_math_per_channel():
    rgb = _random_image(32, 32, seed=3)  # already the model size: resizing keeps the pixels
    mean, std = (10.0, 120.0, 200.0), (50.0, 2.0, 255.0)
    pre = ImagePreprocess(height=32, width=32, resize="stretch", mean=mean, std=std)
    x = preprocess_image(rgb, pre)
    expected = (rgb.astype(np.float64) - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_normalisation_applies_to_resized_pixels():
    rgb = _random_image(64, 96, seed=5)
    pre = ImagePreprocess(height=32, width=48, resize="stretch", mean=(100.0, 0.0, 50.0), std=(2.0, 1.0, 4.0),
                          layout="nhwc")
    x = preprocess_image(rgb, pre)
    resized = resize_for_model(rgb, pre)
    np.testing.assert_allclose(x, (resized.astype(np.float64) - [100.0, 0.0, 50.0]) / [2.0, 1.0, 4.0], atol=1e-6)


def test_bgr_reverses_channels_before_normalising():
    rgb = _random_image(16, 16, seed=9)
    mean, std = (1.0, 2.0, 3.0), (10.0, 20.0, 30.0)
    pre = ImagePreprocess(height=16, width=16, resize="stretch", mean=mean, std=std, color_order="bgr")
    x = preprocess_image(rgb, pre)
    for c in range(3):  # model channel c holds image channel 2-c, normalised with mean/std[c]
        np.testing.assert_allclose(x[c], (rgb[..., 2 - c].astype(np.float64) - mean[c]) / std[c], atol=1e-6)


def test_stretch_downscale_by_two_is_the_2x2_block_mean():
    rgb = _random_image(64, 80, seed=11)
    pre = ImagePreprocess(height=32, width=40, resize="stretch")
    resized = resize_for_model(rgb, pre)
    blocks = rgb.astype(np.float64).reshape(32, 2, 40, 2, 3).mean(axis=(1, 3))
    assert resized.shape == (32, 40, 3)
    assert np.abs(resized.astype(np.float64) - blocks).max() <= 0.5 + 1e-9


_CROP_CASES = {
    "landscape-downscale": (lambda: skdata.chelsea(), 224),
    "portrait-downscale": (lambda: np.ascontiguousarray(skdata.chelsea().transpose(1, 0, 2)), 224),
    "upscale": (lambda: _random_image(40, 60, seed=2), 64),
    "square": (lambda: _random_image(224, 224, seed=2), 224),
    "odd-size": (lambda: _random_image(123, 77, seed=2), 33),
}


@pytest.mark.parametrize("case", list(_CROP_CASES))
def test_center_crop_equals_resize_shorter_side_then_central_slice(case):
    make, size = _CROP_CASES[case]
    rgb = make()
    pre = ImagePreprocess(height=size, width=size, resize="center_crop", crop_ratio=0.875)
    got = resize_for_model(rgb, pre)
    assert got.shape == (size, size, 3)
    assert np.array_equal(got, _center_crop_oracle(rgb, size, 0.875))


def test_center_crop_keeps_the_centre_of_the_image():
    # a white square in the middle of a black image stays centred after center_crop
    rgb = np.zeros((200, 400, 3), np.uint8)
    rgb[80:120, 180:220] = 255
    pre = ImagePreprocess(height=100, width=100, resize="center_crop", crop_ratio=1.0)
    out = resize_for_model(rgb, pre).astype(np.float64).mean(axis=2)
    ys, xs = np.nonzero(out > 127)
    assert abs(ys.mean() - 49.5) < 1 and abs(xs.mean() - 49.5) < 1
    assert 18 * 18 <= len(ys) <= 22 * 22  # the 40 px square scaled by 1/2 -> about 20x20


# ------------------------------------------------------------------------------ postprocessing
def test_softmax_equals_scipy():
    logits = np.random.default_rng(0).normal(scale=5, size=(6, 11)).astype(np.float32)
    np.testing.assert_allclose(softmax(logits), scipy.special.softmax(logits, axis=-1), rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 999.0, -1000.0], [-5e4, -5e4, -5e4]])
    got = softmax(logits)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, scipy.special.softmax(logits, axis=-1), rtol=1e-12)


def _brute_force_top_k(probs: np.ndarray, k: int) -> list[list[int]]:
    return [sorted(range(len(row)), key=lambda c: (-row[c], c))[:k] for row in probs]


def test_top_k_equals_brute_force_sort():
    logits = np.random.default_rng(4).normal(size=(5, 20))
    labels = [f"l{i}" for i in range(20)]
    result = top_k(logits, labels, k=6)
    probs = scipy.special.softmax(logits, axis=-1)
    expected = _brute_force_top_k(probs, 6)
    assert [r.class_ids for r in result] == expected
    for r, row, ids in zip(result, probs, expected, strict=True):
        assert r.labels == [labels[i] for i in ids]
        np.testing.assert_allclose(r.scores, row[ids], rtol=1e-6)


def test_top_k_breaks_ties_by_lower_class_id():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    for apply_softmax in (True, False):
        result = top_k(logits, [], k=4, apply_softmax=apply_softmax)
        assert [r.class_ids for r in result] == _brute_force_top_k(logits, 4)
        assert result[0].class_ids == [1, 3, 4, 2]
        assert result[1].class_ids == [0, 1, 2, 3]


def test_top_k_without_softmax_returns_raw_scores_and_clamps_k():
    scores = np.array([[0.2, 0.5, 0.3]])
    (r,) = top_k(scores, ["a", "b", "c"], k=10, apply_softmax=False)
    assert r.class_ids == [1, 2, 0]
    assert r.labels == ["b", "c", "a"]
    assert r.scores == pytest.approx([0.5, 0.3, 0.2])


def test_top_k_uses_class_id_when_label_is_missing():
    (r,) = top_k(np.array([[0.0, 9.0]]), ["only-one"], k=2)
    assert r.labels == ["1", "only-one"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_top_k_refuses_non_finite_scores(bad):
    scores = np.zeros((3, 4))
    scores[2, 1] = bad
    with pytest.raises(FloatingPointError, match=r"\[2\]"):
        top_k(scores, [], k=2)


def test_top_k_refuses_non_2d_scores():
    with pytest.raises(ValueError):
        top_k(np.zeros(4), [], k=2)


# ------------------------------------------------------------------------- real EfficientNet-Lite0
@pytest.fixture(scope="module")
def efficientnet() -> ImageClassifier:
    model = ModelRepository(REPO_MODELS).load("efficientnet-lite0", providers=("cpu",))
    return ImageClassifier(model)


def test_efficientnet_classifies_chelsea_as_a_cat(efficientnet):
    (result,) = efficientnet.run_batch([efficientnet.preprocess(skdata.chelsea())])
    assert 281 <= result.class_ids[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert len(result.class_ids) == 5  # top_k from the model config
    assert result.scores == sorted(result.scores, reverse=True)


def test_efficientnet_classifies_coffee_as_espresso(efficientnet):
    (result,) = efficientnet.run_batch([efficientnet.preprocess(skdata.coffee())])
    assert result.class_ids[0] == 967
    assert result.labels[0] == efficientnet.model.labels[967]


def test_efficientnet_batch_of_two_equals_two_single_runs(efficientnet):
    tensors = [efficientnet.preprocess(skdata.chelsea()), efficientnet.preprocess(skdata.coffee())]
    batched = efficientnet.run_batch(tensors)
    singles = [efficientnet.run_batch([t])[0] for t in tensors]
    for b, s in zip(batched, singles, strict=True):
        assert b.class_ids == s.class_ids
        assert np.allclose(b.scores, s.scores, rtol=1e-4, atol=1e-5)
    session, name = efficientnet.model.session, efficientnet.input_name
    logits_batch = session.run({name: np.stack(tensors)})["logits"]
    logits_single = np.concatenate([session.run({name: t[None]})["logits"] for t in tensors])
    assert np.allclose(logits_batch, logits_single, rtol=1e-4, atol=1e-4)
