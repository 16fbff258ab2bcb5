"""Text → token ids and attention masks, with the model's own `tokenizer.json` (HF `tokenizers`).

Sequences come back unpadded: the batcher pads each batch only to its own longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.errors import InvalidInput


class TextEncoder:
    def __init__(self, tokenizer_file: Path, max_tokens: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.max_tokens = max_tokens

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

    @classmethod
    def for_inputs(cls, encoder: TextEncoder, inputs: dict[str, str], max_chars: int) -> TextModel:
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
        return cls(encoder, ids, mask, token_type, pad_id, max_chars, dtypes)

    @property
    def vocab_size(self) -> int:
        return self.encoder.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.encoder.encode(texts, max_chars=self.max_chars)

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
