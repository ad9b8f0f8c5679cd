"""Toxicity (profanity / offensive language) classifier -> ONNX that takes raw strings.

Model: PyPI `alt-profanity-check` (`profanity_check`), a scikit-learn TfidfVectorizer (15,442 words)
followed by a sigmoid-calibrated LinearSVC. Converted with skl2onnx into one graph: string tensor
`text` [N, 1] -> `label` [N] and `probabilities` [N, 2] (class 0 clean, class 1 toxic).
Nothing is downloaded; the weights are the package's own joblib files.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGE = "alt-profanity-check"
LABELS = ["clean", "toxic"]  # profanity_check: class 1 is "offensive"; predict_prob returns P(class 1)

# Only the C, C.UTF-8 and POSIX locales exist on our machines: the converter's default (en_US.UTF-8)
# makes ONNX Runtime fail at load. The default token pattern becomes ASCII-only `[a-zA-Z0-9_]+` in
# ONNX, which splits non-ASCII words differently from sklearn's `(?u)\b\w\w+\b`: `\p{L}\p{N}` keeps
# them whole (single-character tokens are never in the vocabulary, so `+` vs `\w\w+` does not matter).
TFIDF_OPTIONS = {"locale": "C.UTF-8", "tokenexp": r"[\p{L}\p{N}_]+"}
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

# Sentences the export must score like the package itself (ASCII, profanity, non-ASCII, empty).
CHECK_SENTENCES = [
    "have a lovely day", "you are a fucking idiot", "Shut up, moron!!", "", "café naïve Zoë",
    "привет, как дела", "東京タワー 🎉", "I HATE YOU b1tch", "the quick brown fox jumps over the lazy dog",
]


def package_source() -> dict[str, str]:
    """Name, version and licence of the installed package, from its metadata."""
    meta = metadata.metadata(PACKAGE)
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence:
        licence = next((c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")), "")
    return {"package": PACKAGE, "version": metadata.version(PACKAGE), "licence": licence,
            "scikit_learn": metadata.version("scikit-learn")}


def build(out_dir: Path) -> dict:
    import onnxruntime as ort
    from profanity_check import profanity_check as pc
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import Pipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline([("tfidf", pc.vectorizer), ("clf", pc.model)])
    onx = convert_sklearn(
        pipe, initial_types=[("text", StringTensorType([None, 1]))],
        options={TfidfVectorizer: TFIDF_OPTIONS, CalibratedClassifierCV: {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    onnx_path = out_dir / "model.onnx"
    onnx_path.write_bytes(onx.SerializeToString())
    (out_dir / "labels.json").write_text(json.dumps(LABELS))

    # The export must agree with the package it came from.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"text": np.array(CHECK_SENTENCES, dtype=object).reshape(-1, 1)})[0][:, 1]
    expected = pc.predict_prob(CHECK_SENTENCES)
    diff = float(np.abs(got - expected).max())
    if diff > 1e-5:
        raise RuntimeError(f"ONNX export differs from profanity_check.predict_prob by {diff}")
    return {"max_abs_diff_vs_package": diff, "bytes": onnx_path.stat().st_size,
            "vocabulary": len(pc.vectorizer.vocabulary_), **package_source()}
