"""Leave-one-word-out for text: each whitespace-separated word of the text (as the user wrote it,
punctuation attached) is masked out in turn, its tokens hidden from attention; its importance is
the drop in the target class's probability. Words past the model's token limit were never read
and have no importance."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Span:
    start: int  # character offsets into the original text
    end: int
    tokens: tuple[int, ...]  # positions in the encoded sequence (empty: truncated away)


def word_spans(text: str, encoding: Encoding) -> list[Span]:
    """The text's words, each with the positions of the tokens that came from it."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    tokens: list[list[int]] = [[] for _ in words]
    w = 0
    for position, ((start, end), special) in enumerate(
            zip(encoding.offsets, encoding.special_tokens_mask, strict=True)):
        if special or end <= start:
            continue
        while w < len(words) and words[w][1] <= start:
            w += 1
        if w < len(words) and words[w][0] <= start:
            tokens[w].append(position)
    return [Span(a, b, tuple(t)) for (a, b), t in zip(words, tokens, strict=True)]


def perturb(ids: np.ndarray, spans: list[Span], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L], spans) → (ids, attention mask) [1 + read words, L]: the text, then one row per
    word the model read with that word's tokens replaced by padding and masked out. A row keeps
    its last token attended if nothing else would be (a model must attend to something)."""
    read = [s for s in spans if s.tokens]
    out_ids = np.repeat(ids[None], 1 + len(read), axis=0)
    out_mask = np.ones_like(out_ids)
    for row, span in enumerate(read, start=1):
        hidden = list(span.tokens)
        out_ids[row, hidden] = pad_id
        out_mask[row, hidden] = 0
        if not out_mask[row].any():
            out_mask[row, hidden[-1]] = 1
    return out_ids, out_mask


def importances(target_scores: np.ndarray, spans: list[Span]) -> list[float | None]:
    """target_scores [1 + read words] → one importance per span, None for words never read."""
    drops = iter((target_scores[0] - target_scores[1:]).tolist())
    return [next(drops) if s.tokens else None for s in spans]
