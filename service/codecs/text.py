"""Text → token ids and attention masks, with the model's own `tokenizer.json` (HF `tokenizers`).

Sequences come back unpadded: the batcher pads each batch only to its own longest row.
"""

from __future__ import annotations

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
