"""``augment.text``: EDA (Wei & Zou 2019) — synonym replacement, random insertion, random swap
and random deletion over tokens from a data-free NLTK tokenizer.

Values are token lists (``TweetTokenizer``: keeps URLs, contractions and emoticons whole), joined
back with ``TreebankWordDetokenizer``. Synonyms come from WordNet (see ``stages.augment.wordnet``);
without it, synonym replacement is recorded as skipped and random insertion inserts a copy of a
word from the text instead of a synonym.
"""
from __future__ import annotations

from functools import cache, partial
from typing import Any, Callable, NamedTuple

import numpy as np
from pydantic import Field, field_validator

from stages.augment.base import ModalityAugmenter, Op, OpPolicy, check_ops, register_op
from stages.augment.wordnet import DEFAULT_WORDNET_DIR, load_wordnet
from stages.base import StageContext, StageParams
from stages.cleanup.text import stop_words, tokenizer
from stages.registry import register_stage

OPS: dict[str, Op] = {}
op = partial(register_op, OPS)


class EdaPolicy(OpPolicy):
    """EDA's alpha: the op touches ``max(1, int(alpha * n_tokens))`` words."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    alpha: float = Field(0.1, gt=0.0, le=1.0)

    def count(self, tokens: list[str]) -> int:
        return max(1, int(self.alpha * len(tokens)))


class _TextTools(NamedTuple):
    tokenize: Callable[[str], list[str]]       # NLTK's tweet tokenizer
    detokenize: Callable[[list[str]], str]     # NLTK's Treebank detokenizer
    stop_words: frozenset[str]                 # scikit-learn's English list


@cache
def _tools() -> _TextTools:
    """Made on first use: NLTK and scikit-learn take ~1.5 s to import, which a driver that only
    validates this stage's parameters (``resolve_stages``) should not pay."""
    from nltk.tokenize.treebank import TreebankWordDetokenizer

    return _TextTools(tokenizer("tweet"), TreebankWordDetokenizer().detokenize, stop_words("english"))


def tokenize(text: str) -> list[str]:
    return _tools().tokenize(text)


def is_word(token: str) -> bool:
    return token.isalpha() and token.lower() not in _tools().stop_words


# -- synonym replacement ----------------------------------------------------------------------
def _draw_synonym(rng: np.random.Generator, pol: EdaPolicy, tokens: list[str], stage: "TextAugmenter") -> dict | None:
    if stage.wordnet is None:
        return {"skipped": f"wordnet not found at {stage.params.wordnet_dir}"}
    candidates = [i for i, t in enumerate(tokens) if is_word(t) and stage.synonyms(t)]
    if not candidates:
        return None
    chosen = rng.permutation(candidates)[: pol.count(tokens)]
    replacements = []
    for i in sorted(int(c) for c in chosen):
        options = stage.synonyms(tokens[i])
        replacements.append([i, match_case(options[int(rng.integers(len(options)))], tokens[i])])
    return {"replacements": replacements}


@op("synonym", _draw_synonym)
def synonym(tokens: list[str], r: dict) -> list[str]:
    out = list(tokens)
    for i, word in r["replacements"]:
        out[i] = word
    return out


def match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


# -- random insertion -------------------------------------------------------------------------
def _draw_insert(rng: np.random.Generator, pol: EdaPolicy, tokens: list[str], stage: "TextAugmenter") -> dict | None:
    words = [t for t in tokens if is_word(t)]
    if stage.wordnet is not None:
        words = [w for w in words if stage.synonyms(w)]
    if not words:
        return None
    inserts = []
    for j in range(pol.count(tokens)):
        word = words[int(rng.integers(len(words)))]
        if stage.wordnet is not None:
            options = stage.synonyms(word)
            word = options[int(rng.integers(len(options)))]
        inserts.append([int(rng.integers(len(tokens) + j + 1)), word])
    return {"inserts": inserts, "source": "synonym" if stage.wordnet is not None else "copy"}


@op("insert", _draw_insert)
def insert(tokens: list[str], r: dict) -> list[str]:
    out = list(tokens)
    for pos, word in r["inserts"]:
        out.insert(pos, word)
    return out


# -- random swap ------------------------------------------------------------------------------
def _draw_swap(rng: np.random.Generator, pol: EdaPolicy, tokens: list[str], _stage: Any) -> dict | None:
    if len(tokens) < 2:
        return None
    return {"pairs": [[int(a), int(b)] for a, b in rng.integers(len(tokens), size=(pol.count(tokens), 2))]}


@op("swap", _draw_swap)
def swap(tokens: list[str], r: dict) -> list[str]:
    out = list(tokens)
    for a, b in r["pairs"]:
        out[a], out[b] = out[b], out[a]
    return out


# -- random deletion --------------------------------------------------------------------------
class DeletePolicy(OpPolicy):
    p: float = Field(0.3, ge=0.0, le=1.0)
    p_word: float = Field(0.1, gt=0.0, lt=1.0)   # EDA's p_rd: each token deleted with this chance


def _draw_delete(rng: np.random.Generator, pol: DeletePolicy, tokens: list[str], _stage: Any) -> dict | None:
    if len(tokens) < 2:
        return None
    gone = np.flatnonzero(rng.random(len(tokens)) < pol.p_word)
    if len(gone) == len(tokens):  # EDA keeps one word rather than emit an empty text
        gone = np.delete(gone, int(rng.integers(len(gone))))
    return {"indices": [int(i) for i in gone]} if len(gone) else None


@op("delete", _draw_delete)
def delete(tokens: list[str], r: dict) -> list[str]:
    gone = set(r["indices"])
    return [t for i, t in enumerate(tokens) if i not in gone]


# -- the stage --------------------------------------------------------------------------------
class TextAugParams(StageParams):
    ops: list[str] = Field(default_factory=lambda: list(OPS))
    synonym: EdaPolicy = EdaPolicy(p=0.5)
    insert: EdaPolicy = EdaPolicy(p=0.3)
    swap: EdaPolicy = EdaPolicy(p=0.3)
    delete: DeletePolicy = DeletePolicy()
    wordnet_dir: str = DEFAULT_WORDNET_DIR

    @field_validator("ops")
    @classmethod
    def _known(cls, ops: list[str]) -> list[str]:
        return check_ops(ops, OPS)


@register_stage
class TextAugmenter(ModalityAugmenter):
    """EDA on augmented copies; WordNet is loaded once per actor."""

    name = "augment.text"
    version = 1
    modality = "text"
    Params = TextAugParams
    OPS = OPS

    def __init__(self, params: TextAugParams | dict | None = None, context: StageContext | None = None):
        super().__init__(params, context)
        needs_wordnet = {"synonym", "insert"} & set(self.params.ops)
        self.wordnet = load_wordnet(self.params.wordnet_dir) if needs_wordnet else None
        self._synonyms: dict[str, list[str]] = {}

    def synonyms(self, word: str) -> list[str]:
        """Sorted WordNet synonyms of ``word`` (multi-word lemmas joined by spaces), cached."""
        key = word.lower()
        if key not in self._synonyms:
            found = {lemma.name().replace("_", " ") for s in self.wordnet.synsets(key) for lemma in s.lemmas()}
            self._synonyms[key] = sorted(w for w in found if w.lower() != key)
        return self._synonyms[key]

    @classmethod
    def decode(cls, text: str, params: TextAugParams) -> list[str]:
        return tokenize(text)

    @classmethod
    def encode(cls, tokens: list[str], original: str, params: TextAugParams) -> str:
        return _tools().detokenize(tokens)
