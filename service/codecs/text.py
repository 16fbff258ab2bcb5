"""Text → token ids and attention masks, with the model's own `tokenizer.json` (HF `tokenizers`).

Sequences come back unpadded: the batcher pads each batch only to its own longest row.

A text longer than the model's window is read whole as overlapping windows (`TextEncoder.windows`):
each window is the tokenizer's own special tokens around `max_tokens` minus those of content, the
windows start every `stride` content tokens and the last one ends with the text, so every window
is full and every token is read. The task endpoint computes each window as a row and combines the
windows' answers as the mean of their logits (`aggregate`): `training/quality.py` measured that
choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.errors import InvalidInput, PayloadTooLarge, ServiceError

# Content tokens between the starts of two windows, as a share of a window's content (a model's
# `[text] window_stride`): half by default, so every token after the first half-window is read
# twice, once with context on either side.
WINDOW_STRIDE = 0.5


class TextEncoder:
    def __init__(self, tokenizer_file: Path, max_tokens: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.max_tokens = max_tokens
        self.whole = Tokenizer.from_file(str(tokenizer_file))  # the same tokenizer, no truncation
        self.whole.no_padding()
        self.whole.no_truncation()

    def windows(self, text: str, *, max_tokens: int, stride: float = WINDOW_STRIDE) -> np.ndarray:
        """The whole text as [windows, tokens] int64 ids; one row when it fits the model's window.

        Raises PayloadTooLarge when the text has more than `max_tokens` tokens.
        """
        enc = self.whole.encode(text)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if len(ids) > max_tokens:
            raise PayloadTooLarge(f"{len(ids):,} tokens; the limit is {max_tokens:,}")
        if len(ids) <= self.max_tokens:
            return ids[None]
        special = np.asarray(enc.special_tokens_mask, dtype=bool)
        head = int(np.argmin(special)) if not special.all() else len(ids)  # leading specials ([CLS])
        tail = int(np.argmin(special[::-1])) if not special.all() else 0  # trailing ones ([SEP])
        prefix, content, suffix = ids[:head], ids[head:len(ids) - tail], ids[len(ids) - tail:]
        width = self.max_tokens - len(prefix) - len(suffix)
        step = max(1, int(width * stride))
        starts = [*range(0, len(content) - width, step), len(content) - width]
        return np.stack([np.concatenate((prefix, content[s:s + width], suffix)) for s in starts])

    def encode(self, texts: list[str], *, max_chars: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return one (input_ids int64, attention_mask int64) pair of 1-D arrays per text."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput(f"text {i} is empty or not a string")
            if len(text) > max_chars:
                raise InvalidInput(f"text {i} has {len(text)} characters; the limit is {max_chars}")
        out = []
        for enc in self.tokenizer.encode_batch(texts):
            ids = np.asarray(enc.ids, dtype=np.int64)
            out.append((ids, np.ones_like(ids)))
        return out


@dataclass(frozen=True)
class TextModel:
    """A text model's tokenizer plus which graph input is which (found by name: `*mask*` is the
    attention mask, `*type*` the token types, the other one the ids)."""

    encoder: TextEncoder
    ids: str
    mask: str | None
    token_type: str | None
    pad_id: int
    max_chars: int
    dtypes: dict[str, np.dtype]
    stride: float = WINDOW_STRIDE  # between the starts of two windows of a long text (`windows`)

    @classmethod
    def for_inputs(cls, encoder: TextEncoder, inputs: dict[str, str], max_chars: int,
                   stride: float = WINDOW_STRIDE) -> TextModel:
        """`inputs` maps each graph input name to its numpy dtype name."""
        names = list(inputs)
        mask = next((n for n in names if "mask" in n), None)
        token_type = next((n for n in names if "type" in n and n != mask), None)
        ids = next((n for n in names if n not in (mask, token_type)), names[0])
        pad_id = 0
        for token in ("[PAD]", "<pad>", "<PAD>", "[pad]"):
            tid = encoder.tokenizer.token_to_id(token)
            if tid is not None:
                pad_id = tid
                break
        dtypes = {n: np.dtype(d) for n, d in inputs.items()}
        return cls(encoder, ids, mask, token_type, pad_id, max_chars, dtypes, stride)

    @property
    def vocab_size(self) -> int:
        return self.encoder.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.encoder.encode(texts, max_chars=self.max_chars)

    def windows(self, texts: list[str], *, max_tokens: int) -> list[np.ndarray | ServiceError]:
        """Each text as its [windows, tokens] ids (`TextEncoder.windows`), or the error that refuses
        it, named by its index, so a caller may still answer the others."""
        out: list[np.ndarray | ServiceError] = []
        for i, text in enumerate(texts):
            try:
                if not isinstance(text, str) or not text.strip():
                    raise InvalidInput("empty or not a string")
                if len(text) > self.max_chars:
                    raise PayloadTooLarge(f"{len(text):,} characters; the limit is {self.max_chars:,}")
                out.append(self.encoder.windows(text, max_tokens=max_tokens, stride=self.stride))
            except ServiceError as e:
                out.append(type(e)(f"text {i}: {e.message}"))
        return out

    def window_feeds(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """[windows, tokens] ids as the model's input tensors (every window is unpadded)."""
        return self.feeds([(row, np.ones_like(row)) for row in windows])

    def feeds(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Stack encoded texts into [n, longest] tensors named and typed as the model's inputs."""
        longest = max(len(ids) for ids, _ in pairs)
        ids = np.full((len(pairs), longest), self.pad_id, dtype=self.dtypes[self.ids])
        mask = np.zeros((len(pairs), longest), dtype=self.dtypes.get(self.mask or "", np.int64))
        for row, (i, m) in enumerate(pairs):
            ids[row, :len(i)] = i
            mask[row, :len(m)] = m
        out = {self.ids: ids}
        if self.mask is not None:
            out[self.mask] = mask
        if self.token_type is not None:
            out[self.token_type] = np.zeros_like(ids, dtype=self.dtypes[self.token_type])
        return out


def aggregate(probabilities: np.ndarray) -> np.ndarray:
    """One text's answer from its windows' [windows, classes] probabilities: the softmax of the
    windows' mean log-probabilities, which is the softmax of their mean logits at the graph's own
    temperature (each window's log-normaliser cancels). Measured against the mean of probabilities,
    the first or the last window on whole NYT editorials (`training/quality.py`); one window is
    returned as it is."""
    if len(probabilities) == 1:
        return probabilities[0]
    mean = np.log(np.maximum(probabilities.astype(np.float64), 1e-30)).mean(axis=0)
    e = np.exp(mean - mean.max())
    return (e / e.sum()).astype(probabilities.dtype)
