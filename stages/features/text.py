"""Text encoders ("hashed": weight-free; "hf_text": a transformers model) and the text feature stages."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from stages.features.base import Encoder, EncoderParams, MissingWeights, register_encoder
from stages.features.hf import HFEncoder, HFParams, how_to_provide, load_companion
from stages.features.stage import FeaturePrepStage, FeatureStage
from stages.features.torch_encoder import masked_mean, pad_stack
from stages.registry import register_stage


class HashedParams(EncoderParams):
    word_features: int = Field(512, ge=8)
    char_features: int = Field(512, ge=0)           # 0 turns character n-grams off
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 4)
    sublinear_tf: bool = True                       # 1 + log(tf) instead of raw counts
    lowercase: bool = True


@register_encoder
class HashedTextEncoder(Encoder):
    """Hashed word uni/bigrams + character n-grams, each block L2-normalised; no fitting, no vocabulary."""

    name = "hashed"
    modality = "text"
    Params: ClassVar[type[EncoderParams]] = HashedParams

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        from sklearn.feature_extraction.text import HashingVectorizer   # slow import: only where used

        super().__init__(params, inference=inference)
        p = self.params
        common = dict(alternate_sign=False, norm=None, lowercase=p.lowercase, dtype=np.float32)
        self.vectorizers = [HashingVectorizer(n_features=p.word_features, analyzer="word",
                                              ngram_range=p.word_ngrams, **common)]
        if p.char_features:
            self.vectorizers.append(HashingVectorizer(n_features=p.char_features, analyzer="char_wb",
                                                      ngram_range=p.char_ngrams, **common))

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        return params.word_features + params.char_features

    def encode(self, prepped: list[Any]) -> np.ndarray:
        blocks = []
        for vectorizer in self.vectorizers:
            counts = vectorizer.transform([str(t) for t in prepped]).toarray()
            if self.params.sublinear_tf:
                counts = np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0)
            norms = np.linalg.norm(counts, axis=1, keepdims=True)
            blocks.append(counts / np.maximum(norms, 1e-12))
        return np.hstack(blocks).astype(np.float32)


class HFTextParams(HFParams):
    max_length: int = Field(256, ge=2)
    pooling: Literal["mean", "cls"] = "mean"   # ignored for two-tower models (CLIP): their projection


@register_encoder
class HFTextEncoder(HFEncoder):
    """AutoModel + AutoTokenizer from a local directory; attention-masked mean pooling."""

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
        return hidden[:, 0] if self.params.pooling == "cls" else masked_mean(hidden, mask)


@register_stage
class TextFeaturesPrep(FeaturePrepStage):
    name = "features.text.prep"
    modality = "text"


@register_stage
class TextFeatures(FeatureStage):
    name = "features.text"
    modality = "text"
