"""Text encoders ("hashed": weight-free; "hf_text": a transformers model) and the text feature stages."""
from __future__ import annotations

import re
from functools import partial
from typing import Any, ClassVar, Literal

import mmh3
import numpy as np
from pydantic import Field

from stages.features.base import Encoder, EncoderParams, MissingWeights, SequenceParams, register_encoder
from stages.features.hf import HFEncoder, HFSequenceParams, how_to_provide, load_companion
from stages.features.stage import FeaturePrepStage, FeatureStage
from stages.features.torch_encoder import masked_mean, pad_stack
from stages.registry import register_stage


class HashedParams(SequenceParams):
    word_features: int = Field(512, ge=8)
    char_features: int = Field(512, ge=0)           # 0 turns character n-grams off
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 4)
    sublinear_tf: bool = True                       # 1 + log(tf) instead of raw counts
    lowercase: bool = True
    token_dim: int = Field(32, ge=4, le=512)        # with ``sequence``: each word as a hashed +-1 vector this wide

    ADDED_LATER: ClassVar[frozenset[str]] = SequenceParams.ADDED_LATER | {"token_dim"}


_WORD = re.compile(r"(?u)\b\w\w+\b")   # scikit-learn's default token pattern
_SPACES = re.compile(r"\s\s+")


def word_ngrams(text: str, ngrams: tuple[int, int]) -> list[str]:
    """Word n-grams exactly as scikit-learn's ``analyzer="word"`` makes them."""
    words = _WORD.findall(text)
    lo, hi = ngrams
    grams = list(words) if lo == 1 else []
    for n in range(max(lo, 2), min(hi, len(words)) + 1):
        grams.extend(" ".join(words[k:k + n]) for k in range(len(words) - n + 1))
    return grams


def char_wb_ngrams(text: str, ngrams: tuple[int, int]) -> list[str]:
    """Character n-grams inside space-padded words, exactly as scikit-learn's ``analyzer="char_wb"``
    (a word shorter than an n-gram counts once, whole)."""
    lo, hi = ngrams
    grams = []
    for word in _SPACES.sub(" ", text).split():
        word = f" {word} "
        for n in range(lo, hi + 1):
            grams.extend(word[k:k + n] for k in range(max(1, len(word) - n + 1)))
            if len(word) <= n:
                break
    return grams


@register_encoder
class HashedTextEncoder(Encoder):
    """Hashed word uni/bigrams + character n-grams, each block L2-normalised; no fitting, no vocabulary.

    The same counts as scikit-learn's ``HashingVectorizer(alternate_sign=False, norm=None)``
    (MurmurHash3 from ``mmh3``; tests/stages/test_features.py compares them), without importing
    scikit-learn: that import (scipy.stats, scipy.optimize) costs ~1.8 s of CPU in every actor."""

    name = "hashed"
    modality = "text"
    Params: ClassVar[type[EncoderParams]] = HashedParams

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        super().__init__(params, inference=inference)
        p = self.params
        self.analyzers = [(partial(word_ngrams, ngrams=p.word_ngrams), p.word_features)]
        if p.char_features:
            self.analyzers.append((partial(char_wb_ngrams, ngrams=p.char_ngrams), p.char_features))

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        return params.word_features + params.char_features

    @classmethod
    def sequence_dim(cls, params: EncoderParams) -> int:
        return params.token_dim

    def encode_sequence(self, prepped: list[Any]) -> list[np.ndarray]:
        """The first ``sequence`` words in order, each a fixed pseudo-random +-1 / sqrt(token_dim)
        vector drawn from its MurmurHash3 (a hashed vocabulary: no fitting, same word same vector)."""
        d = self.params.token_dim
        out = []
        for text in prepped:
            words = _WORD.findall(str(text).lower() if self.params.lowercase else str(text))[: self.params.sequence]
            if not words:
                out.append(np.zeros((0, d), np.float32))
                continue
            bits = np.array([[mmh3.hash(w, seed) for seed in range(0, d, 32)] for w in words], np.int64).reshape(-1)
            signs = ((bits.astype(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(len(words), -1)[:, :d]
            out.append(((signs * 2.0 - 1.0) / np.sqrt(d)).astype(np.float32))
        return out

    def counts(self, texts: list[str], analyzer, n_features: int) -> np.ndarray:
        """Occurrences of each hashed n-gram: a (len(texts), n_features) float32 matrix."""
        grams = [analyzer(text) for text in texts]
        flat = [gram for doc in grams for gram in doc]
        hashes = np.fromiter(map(mmh3.hash, flat), np.int64, len(flat))
        rows = np.repeat(np.arange(len(texts)), [len(doc) for doc in grams])
        cells = rows * n_features + np.abs(hashes) % n_features
        return np.bincount(cells, minlength=len(texts) * n_features).reshape(len(texts), n_features).astype(np.float32)

    def encode(self, prepped: list[Any]) -> np.ndarray:
        texts = [str(t).lower() if self.params.lowercase else str(t) for t in prepped]
        blocks = []
        for analyzer, n_features in self.analyzers:
            counts = self.counts(texts, analyzer, n_features)
            if self.params.sublinear_tf:
                counts = np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0)
            norms = np.linalg.norm(counts, axis=1, keepdims=True)
            blocks.append(counts / np.maximum(norms, 1e-12))
        return np.hstack(blocks).astype(np.float32)


class HFTextParams(HFSequenceParams):
    max_length: int = Field(256, ge=2)
    pooling: Literal["mean", "cls"] = "mean"   # ignored for two-tower models (CLIP): their projection


@register_encoder
class HFTextEncoder(HFEncoder):
    """AutoModel + AutoTokenizer from a local directory; attention-masked mean pooling. ``sequence: N``
    also stores the first N tokens' last hidden states."""

    name = "hf_text"
    modality = "text"
    Params: ClassVar[type[EncoderParams]] = HFTextParams

    def load_companions(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = load_companion(AutoTokenizer.from_pretrained, self.model_dir, "tokenizer", "text")
        # Without tokenizer files transformers builds one of special tokens only: every word would be [UNK].
        if len(self.tokenizer) <= len(self.tokenizer.all_special_tokens):
            raise MissingWeights(f"no tokenizer in {self.model_dir.resolve()} (no vocabulary file); {how_to_provide('text')}")

    def preprocess(self, values: list[Any]) -> list[Any]:
        """Token ids per text, truncated, unpadded: padding happens per sub-batch in ``forward``."""
        ids = self.tokenizer([str(v) for v in values], truncation=True, max_length=self.params.max_length)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]

    def forward(self, prepped: list[Any]) -> Any:
        # Right padding with a mask: positions and attention of real tokens do not depend on the batch.
        ids, mask = pad_stack(prepped, value=self.tokenizer.pad_token_id or 0)
        ids, mask = self.to_device(ids), self.to_device(mask)
        if self.dual:
            return self.tower_features(input_ids=ids, attention_mask=mask)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        self.keep_frames(prepped, hidden, mask)
        return hidden[:, 0] if self.params.pooling == "cls" else masked_mean(hidden, mask)


@register_stage
class TextFeaturesPrep(FeaturePrepStage):
    name = "features.text.prep"
    modality = "text"


@register_stage
class TextFeatures(FeatureStage):
    name = "features.text"
    modality = "text"
