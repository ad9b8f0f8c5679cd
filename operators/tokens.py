"""Tokenization for text models: the model's own HF `tokenizer.json`, truncation, per-batch padding
with attention masks, and length bucketing.

A record is tokenized alone (`TextTokenizer.encode`, in a worker thread) and stays unpadded until its
batch is known; a batch is then split into sub-batches of similar length (`length_buckets`) and each
is padded only to its own longest sequence (`pad_batch`). Token offsets and word ids are kept for NER.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from operators.errors import BadInput
from operators.model_repository import ModelConfigError
from operators.session import TensorSpec

DEFAULT_MAX_LENGTH = 512  # when neither the config nor the tokenizer file names one
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_text(value: object, max_chars: int) -> str:
    """A record's text as sent, or BadInput: not a string, longer than `max_chars` characters, or
    not encodable as UTF-8 (lone surrogates from a JSON `\\ud800` escape)."""
    if not isinstance(value, str):
        raise BadInput("not_text", f"expected a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise BadInput("text_too_long", f"{len(value)} characters, the limit is {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput("invalid_text", f"not valid Unicode text: {exc.reason} at character {exc.start}") from exc
    return value


@dataclass(frozen=True)
class TextPreprocess:
    """How one text model wants its input (`preprocess:` in the model's config.yaml)."""

    input: str = "tokens"  # tokens: input_ids/attention_mask from tokenizer.json; strings: string tensor [N, 1]
    tokenizer: str = "tokenizer.json"  # HF tokenizers file, relative to the model directory
    max_length: int | None = None  # tokens incl. special tokens; default: the tokenizer file's, else 512
    truncation: bool = True  # false: a text with more than max_length tokens is BadInput
    max_chars: int = 10_000  # longer texts are BadInput before any work is done
    lowercase: bool = False  # Python str.lower() before the model (strings models trained on lowered text)
    call_cost_tokens: int = 32  # one extra session call costs as much as this many padded tokens

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TextPreprocess:
        known = set(cls.__dataclass_fields__)
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown text preprocessing keys: {sorted(unknown)}")
        pre = cls(**cfg)
        if pre.input not in ("tokens", "strings"):
            raise ValueError(f"preprocess.input must be tokens or strings, not {pre.input!r}")
        if pre.max_length is not None and pre.max_length < 2:
            raise ValueError("preprocess.max_length must be at least 2 (room for the special tokens)")
        if pre.max_chars < 1 or pre.call_cost_tokens < 0:
            raise ValueError("preprocess.max_chars must be >= 1 and call_cost_tokens >= 0")
        return pre


@dataclass(frozen=True, eq=False)
class TokenizedText:
    """One text's tokens, unpadded. Offsets index characters of `text` (Python str positions)."""

    text: str
    ids: np.ndarray  # (T,) int64 token ids, special tokens included
    type_ids: np.ndarray  # (T,) int64 segment ids
    offsets: np.ndarray  # (T, 2) int64 [start, end) character span in `text`; (0, 0) for special tokens
    word_ids: np.ndarray  # (T,) int64 index of the pre-tokenizer word of each token; -1 for special tokens
    truncated: bool = False  # tokens past max_length were dropped

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Padded model inputs for N texts, right-padded to the longest text L of this (sub-)batch."""

    input_ids: np.ndarray  # (N, L) int64, pad id after each sequence
    attention_mask: np.ndarray  # (N, L) int64, 1 for real tokens and 0 for padding
    token_type_ids: np.ndarray  # (N, L) int64, pad type id after each sequence

    def feeds(self, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
        """The tensors a model's inputs name, cast to the dtype each input declares."""
        return {spec.name: getattr(self, spec.name).astype(spec.dtype, copy=False) for spec in inputs}


def pad_batch(texts: Sequence[TokenizedText], pad_id: int, pad_type_id: int = 0) -> TokenBatch:
    """Right-pad N tokenized texts to the longest of them; the mask marks the real tokens."""
    width = max((len(t) for t in texts), default=0)
    ids = np.full((len(texts), width), pad_id, np.int64)
    types = np.full((len(texts), width), pad_type_id, np.int64)
    mask = np.zeros((len(texts), width), np.int64)
    for row, t in enumerate(texts):
        ids[row, : len(t)] = t.ids
        types[row, : len(t)] = t.type_ids
        mask[row, : len(t)] = 1
    return TokenBatch(ids, mask, types)


def length_buckets(lengths: Sequence[int], call_cost_tokens: float = 32) -> list[np.ndarray]:
    """Split a batch into sub-batches of similar length: the partition of the length-sorted batch
    into runs that minimises padded tokens + `call_cost_tokens` per session call (exact, by dynamic
    programming). Returns the original indices of each sub-batch, shortest sub-batch first.

    >>> [b.tolist() for b in length_buckets([5, 60, 6, 58, 7], call_cost_tokens=32)]
    [[0, 2, 4], [3, 1]]
    >>> [b.tolist() for b in length_buckets([5, 60, 6], call_cost_tokens=1000)]
    [[0, 2, 1]]
    """
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    longest = lengths[order]  # sorted: a run [i, j) pads to longest[j - 1]
    best = np.zeros(n + 1)  # best[j]: least cost of the first j texts
    cut = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
        starts = np.arange(j)
        cost = best[:j] + (j - starts) * longest[j - 1] + call_cost_tokens
        cut[j] = int(np.argmin(cost))  # ties go to the earliest start: fewer, larger sub-batches
        best[j] = cost[cut[j]]
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j] : j])
        j = int(cut[j])
    return runs[::-1]


class TextTokenizer:
    """A model's `tokenizer.json` with our own truncation and padding (the file's are switched off:
    the MiniLM file pads every text to 128 tokens)."""

    def __init__(self, path: str | Path, max_length: int | None = None, truncation: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tokenizer = Tokenizer.from_file(str(self.path))
        padding, limits = self._tokenizer.padding, self._tokenizer.truncation
        self.pad_id = int(padding["pad_id"]) if padding else self._token_id("[PAD]", "<pad>", default=0)
        self.pad_type_id = int(padding["pad_type_id"]) if padding else 0
        self.max_length = int(max_length or (limits or {}).get("max_length") or DEFAULT_MAX_LENGTH)
        self.truncation = truncation
        self._tokenizer.no_padding()
        # Truncation stays on even when it is refused: `overflowing` then tells us the text was too long.
        self._tokenizer.enable_truncation(self.max_length)

    @classmethod
    def for_model(cls, directory: Path, pre: TextPreprocess) -> TextTokenizer:
        return cls(directory / pre.tokenizer, pre.max_length, pre.truncation)

    def _token_id(self, *tokens: str, default: int) -> int:
        found = [self._tokenizer.token_to_id(t) for t in tokens]
        return next((i for i in found if i is not None), default)

    def encode(self, text: str) -> TokenizedText:
        """One text -> its tokens, truncated to max_length (or BadInput when truncation is off)."""
        return self._tokenized(text, self._tokenizer.encode(text))

    def encode_many(self, texts: Sequence[str]) -> list[TokenizedText | BadInput]:
        """Texts -> their tokens in one call of the fast tokenizer (its batch encode runs in Rust,
        outside the GIL); a text refused alone is a BadInput in its place."""
        out: list[TokenizedText | BadInput] = []
        for text, enc in zip(texts, self._tokenizer.encode_batch(list(texts)), strict=True):
            try:
                out.append(self._tokenized(text, enc))
            except BadInput as exc:
                out.append(exc)
        return out

    def _tokenized(self, text: str, enc) -> TokenizedText:
        truncated = bool(enc.overflowing)
        if truncated and not self.truncation:
            raise BadInput("text_too_long", f"more than {self.max_length} tokens")
        return TokenizedText(
            text=text,
            ids=np.asarray(enc.ids, np.int64),
            type_ids=np.asarray(enc.type_ids, np.int64),
            offsets=np.asarray(enc.offsets, np.int64).reshape(-1, 2),
            word_ids=np.asarray([-1 if w is None else w for w in enc.word_ids], np.int64),
            truncated=truncated,
        )

    def batches(self, texts: Sequence[TokenizedText], call_cost_tokens: float = 32) -> Iterator[tuple[np.ndarray, TokenBatch]]:
        """(original indices, padded sub-batch) for each length bucket of `texts`."""
        for indices in length_buckets([len(t) for t in texts], call_cost_tokens):
            yield indices, pad_batch([texts[i] for i in indices], self.pad_id, self.pad_type_id)


def check_token_inputs(inputs: Sequence[TensorSpec], ref: str) -> None:
    """A token model must take only the tensors a TokenBatch has, and input_ids among them."""
    names = [spec.name for spec in inputs]
    unknown = [n for n in names if n not in TOKEN_INPUTS]
    if unknown or "input_ids" not in names:
        raise ModelConfigError(f"{ref}: a token model takes input_ids (+ attention_mask, token_type_ids), not {names}")


def text_model_preprocess(model, task: str, postprocess_keys: set[str] | frozenset[str]) -> TextPreprocess:
    """A text model's validated preprocessing, after refusing postprocess keys its task does not know."""
    cfg = model.config
    try:
        pre = TextPreprocess.from_config(cfg.preprocess)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"{cfg.ref}: {exc}") from exc
    unknown = set(cfg.postprocess) - set(postprocess_keys)
    if unknown:
        raise ModelConfigError(f"{cfg.ref}: unknown {task} postprocess keys {sorted(unknown)}")
    return pre


def preprocess_texts(values: Sequence[object], check: Callable[[object], str],
                     tokenizer: TextTokenizer | None) -> list[str | TokenizedText | BadInput]:
    """A batch of texts -> model items: each text checked (and normalised) by `check`, then all
    tokenised at once when the model reads tokens; a text refused is a BadInput in its place."""
    out: list[Any] = []
    texts: list[str] = []
    where: list[int] = []
    for i, value in enumerate(values):
        try:
            texts.append(check(value))
            where.append(i)
            out.append(None)
        except BadInput as exc:
            out.append(exc)
    items = texts if tokenizer is None else tokenizer.encode_many(texts)
    for i, item in zip(where, items, strict=True):
        out[i] = item
    return out
