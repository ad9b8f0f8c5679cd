"""Token classification (NER): preprocess -> (session) -> postprocess.

The model labels every sub-word token; a word takes the label of its first sub-token (how the model
is trained: the other sub-tokens are -100 in the loss), words are decoded from BIO or BIOES tags into
entities with seqeval's lenient rules (an I- without a B- starts an entity, a type change ends one),
and each entity is a character span of the ORIGINAL string.

With `postprocess.patterns` in the model config, the validated recognizers of operators/pii_patterns.py
run on the same text and their spans are merged with the model's (`merge_entities`): overlapping spans
are resolved by validation first, then score, then length; each entity says which source found it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.classify import softmax
from operators.errors import BadInput
from operators.model_repository import ModelConfigError
from operators.pii_patterns import PatternConfig, PatternMatch, find_pii, resolve
from operators.text import score_output
from operators.tokens import (
    TextTokenizer,
    TokenizedText,
    check_text,
    check_token_inputs,
    preprocess_texts,
    text_model_preprocess,
)

SCHEMES = {"BIO": frozenset("BI"), "BIOES": frozenset("BIES")}
POSTPROCESS_KEYS = {"scheme", "softmax", "output", "patterns"}
SOURCES = ("ner", "pattern")


@dataclass(frozen=True)
class Entity:
    """One entity: `text == original[start:end]`, offsets in characters (Python str positions)."""

    type: str
    text: str
    start: int
    end: int  # exclusive
    score: float  # ner: mean probability of the entity's labelled (first sub-word) tokens; pattern: fixed per rule
    source: str = "ner"  # "ner" (the model) or "pattern" (a recognizer of operators/pii_patterns.py)
    validated: bool = False  # a checksum or format rule confirmed it (pattern entities only)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "text": self.text, "start": self.start, "end": self.end,
                "score": round(self.score, 6), "source": self.source}

    @classmethod
    def from_pattern(cls, m: PatternMatch) -> Entity:
        return cls(m.type, m.text, m.start, m.end, m.score, "pattern", m.validated)


@dataclass(frozen=True)
class Entities:
    """The entities of one text, in text order."""

    entities: tuple[Entity, ...]
    truncated: bool = False  # the model saw only the first max_length tokens

    def __iter__(self) -> Iterator[Entity]:
        return iter(self.entities)

    def __len__(self) -> int:
        return len(self.entities)

    def __getitem__(self, i: int) -> Entity:
        return self.entities[i]

    def as_dict(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.entities]


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PERSON' -> ('B', 'PERSON'); 'O' -> ('O', '')."""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if tag != "O" else ("O", "")


def check_tags(tags: Sequence[str], scheme: str) -> None:
    """Every tag must be O or `<prefix>-<TYPE>` with a prefix of the scheme."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    bad = [t for t in tags if t != "O" and (split_tag(t)[0] not in SCHEMES[scheme] or not split_tag(t)[1])]
    if bad:
        raise ValueError(f"tags not in the {scheme} scheme: {bad}")


def decode_tags(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """BIO or BIOES tags of words -> (type, first word, last word + 1) spans.

    Invalid sequences follow seqeval's `get_entities` (the conlleval rules): an I- or E- that does not
    continue an entity of its type starts one, a change of type ends one, E- and S- end one.

    >>> decode_tags(["B-PER", "I-PER", "O", "I-LOC", "S-ORG", "E-ORG"])
    [('PER', 0, 2), ('LOC', 3, 4), ('ORG', 4, 5), ('ORG', 5, 6)]
    """
    spans: list[tuple[str, int, int]] = []
    start, prev, prev_kind = 0, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = split_tag(tag)
        ends = prev in ("E", "S") or (prev in ("B", "I") and prefix in ("B", "S", "O")) or (prev != "O" and kind != prev_kind)
        starts = (prefix in ("B", "S") or (prev in ("E", "S", "O") and prefix in ("I", "E"))
                  or (prefix != "O" and kind != prev_kind))
        if ends and prev != "O":
            spans.append((prev_kind, start, i))
        if starts:
            start = i
        prev, prev_kind = prefix, kind
    return spans


def aggregate_words(word_ids: np.ndarray, offsets: np.ndarray, label_ids: np.ndarray, probs: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-word tokens -> words, each labelled by its first sub-token.

    word_ids: (T,) int64, -1 for special tokens; offsets: (T, 2) character spans; label_ids: (T,)
    best class per token; probs: (T,) its probability. Returns (W,) label ids, (W,) probabilities and
    (W, 2) character spans from the first sub-token's start to the last one's end, in word order.
    """
    real = np.flatnonzero(word_ids >= 0)
    _, first = np.unique(word_ids[real], return_index=True)
    last = len(real) - 1 - np.unique(word_ids[real][::-1], return_index=True)[1]
    first, last = real[first], real[last]
    return label_ids[first], probs[first], np.stack([offsets[first, 0], offsets[last, 1]], axis=1)


def _end_of_cluster(text: str, end: int) -> int:
    """Move `end` past combining marks that follow it: the tokenizer strips accents and vowel signs
    (NFD "José", Hindi "नमस्ते", "❤️"), so its offsets can stop before them."""
    while end < len(text) and unicodedata.category(text[end]).startswith("M"):
        end += 1
    return end


def entities_from_words(text: str, tags: Sequence[str], probs: np.ndarray, spans: np.ndarray) -> list[Entity]:
    """Word tags (W,), their probabilities (W,) and character spans (W, 2) -> entities of `text`."""
    found = []
    for kind, first, stop in decode_tags(tags):
        start, end = int(spans[first, 0]), _end_of_cluster(text, int(spans[stop - 1, 1]))
        found.append(Entity(kind, text[start:end], start, end, float(np.mean(probs[first:stop]))))
    return found


def merge_entities(model: Sequence[Entity], patterns: Sequence[PatternMatch],
                   model_types: frozenset[str] | None = None) -> list[Entity]:
    """One entity list from the model's entities (only those of `model_types`, if given) and the
    recognizers' matches: of overlapping spans the validated one wins, then the higher score, then the
    longer; the result is disjoint and in text order.

    >>> ner = [Entity("PHONE", "4111 1111", 5, 14, 0.97), Entity("PERSON", "Ann", 30, 33, 0.99)]
    >>> card = PatternMatch("CARD", "4111 1111 1111 1111", 5, 24, 1.0, True, "card_visa")
    >>> [(e.type, e.source) for e in merge_entities(ner, [card])]
    [('CARD', 'pattern'), ('PERSON', 'ner')]
    """
    kept = [t for e in model if (model_types is None or e.type in model_types) and (t := _trimmed(e)) is not None]
    return resolve([*kept, *(Entity.from_pattern(m) for m in patterns)])


_EDGE_PUNCTUATION = " \t\n,.;:!?()[]{}\"'"
# Closed classes of words that are never entities in the annotation conventions (models/recipes/pii_ner.py):
# a title stands outside its PERSON span; card networks, form and ID abbreviations and time zones name no
# person, organisation or place, however the model reads them.
_TITLE = re.compile(r"(?:mr|mrs|ms|mx|miss|dr|prof|sir|frau|herr|hr|mme|mlle|madame|monsieur|sr|sra|srta|"
                    r"señor|señora|sig|sig\.ra|signor|signora|dott|dhr|mevr|meneer|mevrouw)\.?(?:\s+|$)", re.IGNORECASE)
NOT_ENTITIES = frozenset({
    "visa", "mastercard", "amex", "maestro", "girocard", "ec-karte", "carte bleue", "unionpay", "jcb",
    "dob", "d.o.b.", "pin", "sku", "otp", "2fa", "cvv", "cvc", "iban", "bic", "swift", "imei", "vat", "iva", "mwst",
    "tva", "dl", "id", "ssn", "sin", "tfn", "pps", "ppsn", "bsn", "ahv", "avs", "nino", "dni", "nie", "nif",
    "nir", "eta", "asap", "fyi", "tbd", "faq", "pdf",
    "et", "utc", "gmt", "cet", "cest", "est", "edt", "cst", "cdt", "mst", "mdt", "pst", "pdt", "bst", "aest",
})


def _trimmed(e: Entity) -> Entity | None:
    """The entity without the punctuation the model tagged at its edges ("Market St," -> "Market St") and,
    for a PERSON, without leading titles ("Frau Schulze" -> "Schulze"), or None when what is left cannot
    be a name: no letter ("1930", "17.4.1"), a single character (a case mark tagged without its word), a
    title alone, or a word of NOT_ENTITIES ("DOB", "amex", "ET")."""
    lead = len(e.text) - len(e.text.lstrip(_EDGE_PUNCTUATION))
    text = e.text.strip(_EDGE_PUNCTUATION)
    while e.type == "PERSON" and (title := _TITLE.match(text)):
        lead, text = lead + title.end(), text[title.end() :]
    if len(text) < 2 or not any(c.isalpha() for c in text) or text.lower() in NOT_ENTITIES:
        return None
    start = e.start + lead
    return Entity(e.type, text, start, start + len(text), e.score, e.source, e.validated)


class TokenClassifier:
    """One NER model's three stages. `preprocess` tokenizes one text (in a worker thread) and raises
    BadInput; `run_batch` runs the session once per length bucket and decodes entities."""

    def __init__(self, model) -> None:  # model: operators.model_repository.LoadedModel
        self.model = model
        cfg = model.config
        self.pre = text_model_preprocess(model, "ner", POSTPROCESS_KEYS)
        if self.pre.input != "tokens" or self.pre.lowercase:
            raise ModelConfigError(f"{cfg.ref}: a ner model reads tokens of the original text")
        self.scheme = str(cfg.postprocess.get("scheme", "BIO")).upper()
        self.apply_softmax = bool(cfg.postprocess.get("softmax", True))
        self.output = score_output(model, cfg.postprocess)
        self.tags = list(model.labels)
        if not self.tags and (cfg.directory / "labels.json").is_file():
            self.tags = [str(t) for t in json.loads((cfg.directory / "labels.json").read_text())]
        try:
            check_tags(self.tags, self.scheme)
        except ValueError as exc:
            raise ModelConfigError(f"{cfg.ref}: {exc}") from exc
        spec = next(o for o in model.session.outputs if o.name == self.output)
        num_labels = spec.shape[-1] if len(spec.shape) == 3 else None
        if not self.tags or (isinstance(num_labels, int) and num_labels != len(self.tags)):
            raise ModelConfigError(f"{cfg.ref}: {len(self.tags)} tags in labels.json but the model outputs {num_labels}")
        check_token_inputs(model.session.inputs, cfg.ref)
        self.tokenizer = TextTokenizer.for_model(cfg.directory, self.pre)
        patterns = cfg.postprocess.get("patterns")
        self.patterns: PatternConfig | None = None
        self.model_types: frozenset[str] | None = None
        if patterns is not None:
            try:
                patterns = dict(patterns)
                model_types = patterns.pop("model_types", None)
                self.patterns = PatternConfig.from_dict(patterns)
            except (TypeError, ValueError) as exc:
                raise ModelConfigError(f"{cfg.ref}: postprocess.patterns: {exc}") from exc
            if model_types is not None:
                self.model_types = frozenset(map(str, model_types))
                tag_types = {split_tag(t)[1] for t in self.tags} - {""}
                if self.model_types - tag_types:
                    raise ModelConfigError(f"{cfg.ref}: postprocess.patterns.model_types "
                                           f"{sorted(self.model_types - tag_types)} are not labels of the model")

    def preprocess(self, text: object) -> TokenizedText:
        return self.tokenizer.encode(check_text(text, self.pre.max_chars))

    def preprocess_many(self, texts: list[object]) -> list[TokenizedText | BadInput]:
        """`preprocess` of a batch: one tokenizer call for all; a refused text is a BadInput in its place."""
        return preprocess_texts(texts, lambda text: check_text(text, self.pre.max_chars), self.tokenizer)

    def run_batch(self, items: list[TokenizedText]) -> list[Entities]:
        results: list[Entities | None] = [None] * len(items)
        for indices, batch in self.tokenizer.batches(items, self.pre.call_cost_tokens):
            logits = self.model.session.run(batch.feeds(self.model.session.inputs), [self.output])[self.output]
            if logits.shape[:2] != batch.input_ids.shape or logits.shape[2] != len(self.tags):
                raise ValueError(f"{self.model.ref}: expected {(*batch.input_ids.shape, len(self.tags))} logits, got {logits.shape}")
            if not np.all(np.isfinite(logits)):
                raise FloatingPointError("model produced non-finite token scores")
            probs = softmax(logits.astype(np.float64)) if self.apply_softmax else logits.astype(np.float64)
            label_ids = probs.argmax(axis=-1)  # (n, L)
            best = np.take_along_axis(probs, label_ids[..., None], axis=-1)[..., 0]
            for row, i in enumerate(indices):
                results[i] = self._entities(items[i], label_ids[row, : len(items[i])], best[row, : len(items[i])])
        return results

    def _entities(self, item: TokenizedText, label_ids: np.ndarray, probs: np.ndarray) -> Entities:
        word_labels, word_probs, spans = aggregate_words(item.word_ids, item.offsets, label_ids, probs)
        tags = [self.tags[k] for k in word_labels]
        found = entities_from_words(item.text, tags, word_probs, spans)
        if self.patterns is not None:
            found = merge_entities(found, find_pii(item.text, self.patterns), self.model_types)
        return Entities(tuple(found), item.truncated)
