"""Quantization's evaluate stage, by task: what a new version is calibrated on, what it is judged on,
and how its results are compared with the FP32 version's (each task entry of operators/tasks.py names
its `Evaluation`).

Calibration and held-out inputs for an image model are the scikit-image sample photos, with
deterministic augmentations, through the model's own preprocessing (the operator that serves it);
the held-out photos are never calibrated on. A CTR model gets valid feature rows from its own tables,
a NER model real texts (`NER_TEXTS`, hand-written posts); other models seeded random inputs shaped
from the model's inputs unless the caller passes real ones.

Accuracy is judged by what the task's operator returns, FP32 against the new version on the same inputs:
- classify: top-1 agreement (`compare_outputs`);
- detect: detections matched greedily by IoU >= 0.5 and label, F1 (`compare_detections`);
- ner: exact (type, start, end) entity agreement, F1 (`compare_entities`);
- ctr: click probabilities, max abs difference and Spearman correlation (`compare_click_probabilities`);
- anything else: max abs difference of raw outputs relative to their scale (`compare_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from operators.model_repository import LoadedModel
from operators.session import TensorSpec

# Photos split once: calibration never sees a held-out photo. Grey ones are stacked to RGB.
CALIBRATION_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "moon",
                      "grass", "gravel", "clock", "page", "colorwheel", "cell")
HELD_OUT_PHOTOS = ("chelsea", "coffee", "coins", "brick", "text", "retina")
HELD_OUT_COUNT = 48  # held-out images or random rows
CTR_PAIRS = 2000  # held-out (user, item) pairs for a CTR model
# Hand-written posts with and without personal data, the kind of text a NER model serves.
NER_TEXTS = (
    "Huge thanks to Priya Raman at Barclays for sorting out my mortgage today",
    "Lost my wallet near Union Square, San Francisco. If found call 415-555-0187",
    "email me at jon.baker@example.com or ask Maria Lopez at Acme Corp in Berlin",
    "my passport number is X1234567, flying to Toronto with Air Canada tomorrow",
    "anyone know if the DMV in Sacramento is open saturdays? need to renew before my trip",
    "Dr. Ahmed Khan from St Mary's Hospital called about the results, ring back on 020 7946 0958",
    "great game last night, the Lakers really pulled it off in the fourth quarter",
    "Send the invoice to accounts@northwind-traders.co.uk before Friday please",
    "moving from Lyon to Montreal next month, any tips for finding a flat near McGill?",
    "just had the best ramen of my life, no regrets",
    "Contact Sofia Rossi (sofia.rossi@mail.it, +39 06 6982 1234) for the Rome office keys",
    "Meeting with Kenji Watanabe from Sony at the Tokyo office on Tuesday at 10",
    "my IBAN is DE89 3704 0044 0532 0130 00, please pay the deposit there",
    "the weather in Oslo is brutal this week, stay warm everyone",
    "Ask for Liam O'Connor at the Dublin branch of Allied Irish Banks",
    "Order 55123 shipped to 221B Baker Street, London NW1 6XE",
)

Feeds = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------- inputs
def sample_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as RGB `(H, W, 3) uint8`."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One deterministic variant of an RGB `(H, W, 3) uint8` photo: a random crop (50-100% of each
    side), maybe mirrored, with brightness/contrast jitter."""
    h, w = rgb.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = rgb[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    gain, offset = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
    return np.ascontiguousarray(np.clip(out.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8))


def photo_set(names: Sequence[str], count: int, seed: int) -> list[np.ndarray]:
    """`count` RGB images: each photo once, then augmented variants of them in turn (seeded)."""
    photos = [sample_photo(n) for n in names]
    rng = np.random.default_rng(seed)
    images = photos[:count]
    while len(images) < count:
        images.append(augment(photos[len(images) % len(photos)], rng))
    return images


def synthetic_samples(specs: Sequence[TensorSpec], n: int, seed: int, free_dim: int = 16) -> Feeds:
    """Seeded inputs shaped like `specs` (n rows; other unknown axes `free_dim`): normal floats,
    token ids in [0, 100), ones for masks. Real inputs (`held_out=`) are better for text models."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = (n, *(d if isinstance(d, int) else free_dim for d in s.shape[1:]))
        if np.issubdtype(s.dtype, np.floating):
            feeds[s.name] = rng.normal(size=shape).astype(s.dtype)
        elif "mask" in s.name:
            feeds[s.name] = np.ones(shape, s.dtype)
        elif np.issubdtype(s.dtype, np.integer):
            feeds[s.name] = rng.integers(0, 100, size=shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            feeds[s.name] = np.ones(shape, np.bool_)
        else:
            raise ValueError(f"cannot make synthetic {s.dtype} input {s.name!r}: pass calibration= and held_out=")
    return feeds


def as_samples(given: Any, specs: Sequence[TensorSpec]) -> Feeds:
    """An array (single-input models), a {name: array} dict, or a sequence of such dicts -> {name: (N, ...)}."""
    if isinstance(given, np.ndarray):
        if len(specs) != 1:
            raise ValueError(f"the model has {len(specs)} inputs: pass a dict of arrays, not one array")
        return {specs[0].name: given}
    if isinstance(given, Mapping):
        return {k: np.asarray(v) for k, v in given.items()}
    batches = list(given)
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def batches(samples: Feeds, batch: int) -> list[Feeds]:
    n = len(next(iter(samples.values())))
    return [{k: v[i : i + batch] for k, v in samples.items()} for i in range(0, n, batch)]


def fit_batch(samples: Feeds, batch: int) -> Feeds:
    """Exactly `batch` rows, cycling through the samples."""
    n = len(next(iter(samples.values())))
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in samples.items()}



# ------------------------------------------------------------------------------------ comparing
def run_all(session: Any, samples: Feeds, batch: int) -> dict[str, np.ndarray]:
    parts = [session.run(b) for b in batches(samples, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], classify: bool,
                    softmax: bool) -> dict[str, Any]:
    """Accuracy change of `candidate` against `reference` on the same inputs.

    Classifier (first output, `(N, C)` scores): top-1 agreement (overall, and where the reference is
    at least 50% sure), how often the reference top-1 stays in the top 5, max/mean probability
    difference; `drop` = the fraction of inputs whose top-1 class changed. Otherwise, over float outputs: max/mean
    absolute difference; `drop` = max absolute difference relative to the largest reference value,
    so one bound means the same for any output scale.
    """
    if classify:
        from operators.classify import softmax as softmax_fn

        name = next(iter(reference))
        ref, cand = reference[name].astype(np.float64), candidate[name].astype(np.float64)
        if softmax:
            ref, cand = softmax_fn(ref), softmax_fn(cand)
        top1 = ref.argmax(axis=1)
        same = top1 == cand.argmax(axis=1)
        confident = ref.max(axis=1) >= 0.5  # flips among these matter; the rest are near-ties
        in_top5 = (np.argsort(-cand, axis=1)[:, :5] == top1[:, None]).any(axis=1)
        diff = np.abs(ref - cand)
        return {"metric": "top1_disagreement", "count": len(ref), "top1_agreement": float(same.mean()),
                "top1_agreement_confident": float(same[confident].mean()) if confident.any() else None,
                "confident_count": int(confident.sum()), "top1_in_top5": float(in_top5.mean()),
                "max_prob_diff": float(diff.max()), "mean_prob_diff": float(diff.mean()), "drop": float(1.0 - same.mean())}
    max_diff, mean_diffs, scale = 0.0, [], 0.0
    for name, ref in reference.items():
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        diff = np.abs(ref.astype(np.float64) - candidate[name].astype(np.float64))
        max_diff, scale = max(max_diff, float(diff.max())), max(scale, float(np.abs(ref).max()))
        mean_diffs.append(float(diff.mean()))
    return {"metric": "relative_max_abs_diff", "count": len(next(iter(reference.values()))),
            "max_abs_diff": max_diff, "mean_abs_diff": float(np.mean(mean_diffs)) if mean_diffs else 0.0,
            "drop": max_diff / scale if scale else max_diff}


def _agreement(matched: int, n_reference: int, n_candidate: int) -> dict[str, float]:
    """Precision/recall/F1 of the candidate's results against the reference's; nothing on either side = 1."""
    return {"precision": matched / n_candidate if n_candidate else 1.0,
            "recall": matched / n_reference if n_reference else 1.0,
            "f1": 2 * matched / (n_reference + n_candidate) if n_reference + n_candidate else 1.0}


def match_detections(reference: Any, candidate: Any, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of two `Detections` of one image: (reference index, candidate index,
    IoU) pairs with the same class and IoU >= `iou_threshold`, highest IoU first."""
    from operators.detect import box_iou

    if not len(reference) or not len(candidate):
        return []
    iou = box_iou(np.asarray(reference.boxes, np.float64), np.asarray(candidate.boxes, np.float64))
    iou = np.where(np.asarray(reference.class_ids)[:, None] == np.asarray(candidate.class_ids)[None, :], iou, -1.0)
    pairs = np.argwhere(iou >= iou_threshold)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_ref, used_cand, matches = set(), set(), []
    for r, c in pairs.tolist():
        if r not in used_ref and c not in used_cand:
            used_ref.add(r)
            used_cand.add(c)
            matches.append((r, c, float(iou[r, c])))
    return matches


def compare_detections(reference: Sequence[Any], candidate: Sequence[Any], iou_threshold: float = 0.5) -> dict[str, Any]:
    """Detection model: per image, the candidate's `Detections` matched to the reference's
    (`match_detections`). Precision/recall/F1 of candidate against reference detections over all images,
    mean IoU of the matches, max score difference of matched pairs; `drop` = 1 - F1."""
    matched, ious, score_diffs = 0, [], [0.0]
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c, iou in match_detections(ref, cand, iou_threshold):
            matched += 1
            ious.append(iou)
            score_diffs.append(abs(float(ref.scores[r]) - float(cand.scores[c])))
    n_ref, n_cand = sum(len(d) for d in reference), sum(len(d) for d in candidate)
    scores = _agreement(matched, n_ref, n_cand)
    return {"metric": "detection_f1_vs_fp32", "count": len(reference), "iou_threshold": iou_threshold,
            "reference_detections": n_ref, "candidate_detections": n_cand, "matched": matched, **scores,
            "mean_iou": float(np.mean(ious)) if ious else None, "max_score_diff": max(score_diffs),
            "drop": 1.0 - scores["f1"]}


def compare_entities(reference: Sequence[Iterable[Any]], candidate: Sequence[Iterable[Any]]) -> dict[str, Any]:
    """NER model: per text, the candidate's entities against the reference's by exact (type, start,
    end); precision/recall/F1 over all texts, the share of texts with identical entities; `drop` = 1 - F1."""
    matched = n_ref = n_cand = same_texts = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref_spans, cand_spans = {(e.type, e.start, e.end) for e in ref}, {(e.type, e.start, e.end) for e in cand}
        matched += len(ref_spans & cand_spans)
        n_ref, n_cand = n_ref + len(ref_spans), n_cand + len(cand_spans)
        same_texts += ref_spans == cand_spans
    scores = _agreement(matched, n_ref, n_cand)
    return {"metric": "entity_f1_vs_fp32", "count": len(reference), "reference_entities": n_ref,
            "candidate_entities": n_cand, "matched": matched, **scores,
            "identical_texts": same_texts / len(reference) if len(reference) else 1.0, "drop": 1.0 - scores["f1"]}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 for two equal constant vectors."""
    ra, rb = _average_ranks(np.asarray(a).reshape(-1)), _average_ranks(np.asarray(b).reshape(-1))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_click_probabilities(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """CTR model: click probabilities of the same pairs. Max/mean absolute difference and the Spearman
    rank correlation of the scores (ranking is what they are used for); `drop` = max abs difference."""
    ref, cand = np.asarray(reference, np.float64).reshape(-1), np.asarray(candidate, np.float64).reshape(-1)
    diff = np.abs(ref - cand)
    return {"metric": "max_abs_click_probability_diff", "count": len(ref), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "spearman": spearman(ref, cand), "drop": float(diff.max())}



def ctr_samples(ranker: Any, count: int, seed: int) -> Feeds:
    """`count` valid (user, item) pairs from a CTR model's own feature tables (ranker:
    operators.ranking.CandidateRanker), built by `ctr_inputs` like served requests: known users and
    items, their categories and popularity buckets, hours 0..23, recent-history buckets 0..4."""
    from operators.ranking import ctr_inputs

    rng = np.random.default_rng(seed)
    window = rng.integers(0, ranker.recent_window + 1, count)
    return ctr_inputs(rng.integers(0, len(ranker.users), count), rng.integers(0, len(ranker.items), count),
                      rng.integers(0, 24, count), rng.integers(0, window + 1), window,
                      ranker.item_categories, ranker.item_popularity_bucket)




# ------------------------------------------------------------------------------------ by task
@dataclass(frozen=True)
class Samples:
    """Inputs of one evaluation step: the session's feeds (`{input: (N, ...)}`: what calibration and the
    throughput run use), where they came from, and the raw inputs (images, texts) when accuracy is
    judged through the operator."""

    feeds: Feeds
    source: str
    inputs: Sequence[Any] = ()

    @property
    def count(self) -> int:
        return len(self.inputs) if self.inputs else len(next(iter(self.feeds.values())))


class OutputEvaluation:
    """Any model: seeded random inputs shaped like its inputs (or the caller's tensors); accuracy is
    the max abs difference of the raw outputs relative to their scale."""

    held_out_count = HELD_OUT_COUNT

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.specs = model.session.inputs

    def calibration(self, given: Any, count: int, seed: int = 1) -> Samples:
        if given is not None:
            return Samples(as_samples(given, self.specs), "given")
        return self._generated(count, seed, CALIBRATION_PHOTOS)

    def held_out(self, given: Any, count: int | None, batch: int, seed: int = 2) -> Samples:
        if given is not None:
            return Samples(as_samples(given, self.specs), "given")
        return self._generated(count or self.held_out_count, seed, HELD_OUT_PHOTOS)

    def _generated(self, count: int, seed: int, photos: Sequence[str]) -> Samples:
        return Samples(synthetic_samples(self.specs, count, seed), f"seeded random inputs (seed {seed})")

    def accuracy(self, candidate: LoadedModel, held: Samples, batch: int) -> dict[str, Any]:
        return compare_outputs(run_all(self.model.session, held.feeds, batch), run_all(candidate.session, held.feeds, batch),
                               classify=False, softmax=False)


class ClassifierEvaluation(OutputEvaluation):
    """Image classifier: sample photos through its own preprocessing; accuracy = top-1 agreement."""

    def _generated(self, count: int, seed: int, photos: Sequence[str]) -> Samples:
        to_tensor = self.tensor_of()
        return Samples({self.specs[0].name: np.stack([to_tensor(img) for img in photo_set(photos, count, seed)])},
                       f"scikit-image sample photos {', '.join(photos)} + augmentations (seed {seed})")

    def tensor_of(self) -> Callable[[np.ndarray], np.ndarray]:
        """RGB image -> the model's input tensor, by the operator that serves the model."""
        from operators.classify import ImageClassifier

        return ImageClassifier(self.model).preprocess

    def accuracy(self, candidate: LoadedModel, held: Samples, batch: int) -> dict[str, Any]:
        return compare_outputs(run_all(self.model.session, held.feeds, batch), run_all(candidate.session, held.feeds, batch),
                               classify=True, softmax=bool(self.model.config.postprocess.get("softmax", True)))


class DetectorEvaluation(ClassifierEvaluation):
    """Detector: the detector's own outputs are compared, so held-out samples keep their images
    (given ones are RGB images); accuracy = detection F1 against FP32."""

    def tensor_of(self) -> Callable[[np.ndarray], np.ndarray]:
        from operators.detect import ObjectDetector

        detector = ObjectDetector(self.model)
        return lambda rgb: detector.preprocess(rgb)[0]  # the letterbox record is not a session input

    def held_out(self, given: Any, count: int | None, batch: int, seed: int = 2) -> Samples:
        images = list(given) if given is not None else photo_set(HELD_OUT_PHOTOS, count or self.held_out_count, seed)
        to_tensor = self.tensor_of()
        source = "given images" if given is not None else \
            f"scikit-image sample photos {', '.join(HELD_OUT_PHOTOS)} + augmentations (seed {seed})"
        return Samples({self.specs[0].name: np.stack([to_tensor(img) for img in images])}, source, images)

    def accuracy(self, candidate: LoadedModel, held: Samples, batch: int) -> dict[str, Any]:
        return compare_detections(_detections(self.model, held.inputs, batch), _detections(candidate, held.inputs, batch))


def _detections(model: LoadedModel, images: Sequence[np.ndarray], batch: int) -> list[Any]:
    """`Detections` of each RGB image by the model's ObjectDetector, `batch` images per call."""
    from operators.detect import ObjectDetector

    detector = ObjectDetector(model)
    items = [detector.preprocess(img) for img in images]
    return [d for i in range(0, len(items), batch) for d in detector.run_batch(items[i : i + batch])]


class EntityEvaluation(OutputEvaluation):
    """NER model: real texts (given ones are texts) through its tokenizer; accuracy = entity F1."""

    def held_out(self, given: Any, count: int | None, batch: int, seed: int = 2) -> Samples:
        from operators.ner import TokenClassifier
        from operators.tokens import pad_batch

        texts = list(given) if given is not None else list(NER_TEXTS)[:count]
        tagger = TokenClassifier(self.model)
        tokenized = [tagger.preprocess(t) for t in texts]
        feeds = pad_batch(tokenized[:batch], tagger.tokenizer.pad_id, tagger.tokenizer.pad_type_id).feeds(self.specs)
        return Samples(feeds, f"{len(texts)} " + ("given texts" if given is not None else "hand-written texts"), tokenized)

    def accuracy(self, candidate: LoadedModel, held: Samples, batch: int) -> dict[str, Any]:
        from operators.ner import TokenClassifier

        return compare_entities(TokenClassifier(self.model).run_batch(list(held.inputs)),
                                TokenClassifier(candidate).run_batch(list(held.inputs)))


class ClickEvaluation(OutputEvaluation):
    """CTR model: valid rows of its own feature tables; accuracy = click probability differences."""

    held_out_count = CTR_PAIRS

    def _generated(self, count: int, seed: int, photos: Sequence[str]) -> Samples:
        return Samples(ctr_samples(_ranker(self.model), count, seed),
                       f"{count} valid (user, item) rows from the model's feature tables (seed {seed})")

    def accuracy(self, candidate: LoadedModel, held: Samples, batch: int) -> dict[str, Any]:
        return compare_click_probabilities(_ranker(self.model).score(held.feeds), _ranker(candidate).score(held.feeds))


def _ranker(model: LoadedModel) -> Any:
    from operators.ranking import CandidateRanker

    return CandidateRanker(model)


def with_session(model: LoadedModel, session: Any) -> LoadedModel:
    """The same config, labels and tables with another session: the operators run it as served."""
    return replace(model, session=session)
