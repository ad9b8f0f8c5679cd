"""The toxicity model (alt-profanity-check converted to ONNX) served through TextClassifier agrees with
the package's own `profanity_check.predict_prob` (oracle) on generated sentences."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from operators.errors import BadInput
from operators.model_repository import ModelRepository
from operators.text import TextClassifier

pc = pytest.importorskip("profanity_check.profanity_check")

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL_DIR = MODELS / "toxicity" / "1"
NON_ASCII = ["café", "naïve", "Zoë", "façade", "Привет", "мир", "сука", "БЛЯТЬ", "東京", "你好", "タワー", "🎉", "🤬",
             "👍🏽", "❤️", "İstanbul", "FUCKİNG", "ΣΚΑΤΑΣ", "straße", "ﬁne", "Ｆｕｃｋ", "Jose\u0301", "नमस्ते", "مرحبا", "Łódź"]
SEPARATORS = [" ", " ", " ", " ", ", ", "! ", "? ", "... ", " - ", "'", "\n", "\t", "_", "@", "#", "", "2"]


@pytest.fixture(scope="session")
def toxicity() -> TextClassifier:
    if not (MODEL_DIR / "model.onnx").is_file():
        spec = importlib.util.spec_from_file_location("toxicity_recipe", MODELS / "recipes" / "toxicity.py")
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        recipe.build(MODEL_DIR)
    return TextClassifier(ModelRepository(MODELS).load("toxicity", providers=("cpu",), intra_op_threads=1))


def _sentences(n: int, seed: int = 0) -> list[str]:
    """Random mixes of vocabulary words (a third of them profane), non-ASCII words, digits, punctuation
    and casing; every 40th sentence is empty."""
    rng = np.random.default_rng(seed)
    vocab = sorted(pc.vectorizer.vocabulary_)
    profane = [w for w, p in zip(vocab, pc.predict_prob(vocab), strict=True) if p > 0.8]
    cases = [str.lower, str.upper, str.title, str]
    sentences = []
    for i in range(n):
        if i % 40 == 0:
            sentences.append("")
            continue
        words = []
        for _ in range(int(rng.integers(1, 16))):
            pool = rng.choice(4, p=[0.5, 0.25, 0.15, 0.1])
            word = (vocab, profane, NON_ASCII, ["b1tch", "123", "x", "a", "f*ck", "s h i t"])[pool]
            words.append(cases[rng.integers(0, 4)](str(word[rng.integers(0, len(word))])))
        sentences.append("".join(w + SEPARATORS[rng.integers(0, len(SEPARATORS))] for w in words))
    return sentences


def test_onnx_model_agrees_with_the_package_on_generated_sentences(toxicity):
    sentences = _sentences(3000)
    got = np.concatenate([
        [r.as_dict()["toxic"] for r in toxicity.run_batch([toxicity.preprocess(s) for s in sentences[i : i + 64]])]
        for i in range(0, len(sentences), 64)
    ])
    expected = pc.predict_prob(sentences)
    assert 0.2 < np.mean(expected > 0.5) < 0.8  # both classes well represented
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_scores_are_probabilities_of_clean_and_toxic(toxicity):
    clean, toxic = toxicity.run_batch([toxicity.preprocess("have a lovely day"), toxicity.preprocess("fuck you")])
    assert clean.labels == ("clean", "toxic")
    assert clean.label == "clean" and toxic.label == "toxic"
    assert sum(toxic.scores) == pytest.approx(1.0, abs=1e-6)


def test_dotted_capital_i_scores_like_the_package(toxicity):
    """Python lowercases İ to 'i̇' (i + combining dot), which splits the word for the vectorizer."""
    texts = ["FUCKİNG", "İdiot", "SHİT happens"]
    got = [r.scores[1] for r in toxicity.run_batch([toxicity.preprocess(t) for t in texts])]
    np.testing.assert_allclose(got, pc.predict_prob(texts), atol=1e-5)


def test_onnx_lowercasing_alone_differs_on_dotted_capital_i(toxicity):
    """Why the config lowercases before the session: ONNX's C-locale lowering maps İ to plain i."""
    session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = session.run(["probabilities"], {"text": np.array([["FUCKİNG"]], dtype=object)})[0][0, 1]
    assert abs(raw - pc.predict_prob(["FUCKİNG"])[0]) > 0.5


@pytest.mark.parametrize("value", [None, b"fuck", 7, "x" * 10_001])
def test_non_strings_and_long_text_are_bad_input(toxicity, value):
    with pytest.raises(BadInput):
        toxicity.preprocess(value)


def test_config_records_the_installed_package():
    source = yaml.safe_load((MODEL_DIR / "config.yaml").read_text())["source"]
    meta = metadata.metadata(source["package"])
    assert source["version"] == metadata.version(source["package"])
    assert f"License :: OSI Approved :: {source['licence']} License" in meta.get_all("Classifier")
