"""``cleanup.text``: crawled text or HTML -> normalised plain text, with length and language filters."""
from __future__ import annotations

import functools
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

from lxml import etree
from lxml import html as lxml_html
from lxml_html_clean import Cleaner
from pydantic import Field, model_validator

from stages.base import Cleaned, ModalityCleaner, Reject, StageParams
from stages.registry import register_stage

_WORDS = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")


def tokenizer(name: str) -> Callable[[str], list[str]]:
    """``regexp``: words (with inner hyphens / apostrophes) and punctuation, one ``re.findall``;
    ``treebank`` / ``tweet``: NLTK's tokenizers that need no downloaded data (punkt cannot be
    fetched here). NLTK is imported only when asked for: importing it costs ~1.2 s per actor."""
    if name == "regexp":
        return _WORDS.findall
    from nltk.tokenize import TreebankWordTokenizer, TweetTokenizer

    return {"treebank": TreebankWordTokenizer, "tweet": TweetTokenizer}[name]().tokenize


def stop_words(name: str) -> frozenset[str]:
    """scikit-learn's English list (NLTK's stopwords corpus cannot be downloaded here); imported
    only when asked for: scikit-learn costs about a second to import."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return {"english": frozenset(ENGLISH_STOP_WORDS)}[name]


_HTML_MARKUP = re.compile(  # a tag, a comment, a doctype or an entity
    r"<(?:/?[a-zA-Z][\w:-]*(?:\s[^<>]*)?/?|!--.*?--|!doctype[^<>]*)>|&(?:#\d+|#x[\da-fA-F]+|[a-zA-Z]\w{1,9});",
    re.S | re.I,
)
_HTML_PAGE = re.compile(r"<(?:!doctype\s+html|html|body|head)[\s>]", re.I)
_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85\x0b\x0c]")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_XML_INVALID = re.compile("[\x00-\x08\x0e-\x1f\ufffe\uffff]")   # lxml refuses these in any string
_KEEP_FORMAT = {"\u200c", "\u200d"}  # ZWNJ / ZWJ carry meaning in several scripts and emoji
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
    "pre", "section", "table", "td", "th", "tr", "ul",
}
_CLEANER = Cleaner(
    scripts=True, javascript=True, comments=True, style=True, inline_style=True, links=True, meta=True,
    processing_instructions=True, embedded=True, frames=True, forms=False, annoying_tags=False,
    page_structure=False, remove_unknown_tags=False, safe_attrs_only=False,
    kill_tags=["noscript", "template", "title", "svg", "math"],
)


class TextParams(StageParams):
    max_raw_chars: int = Field(5_000_000, gt=0)          # checked before any parsing: text_too_large
    html: Literal["auto", "always", "never"] = "auto"   # auto: strip markup only when some is found
    extract_main: bool = True                            # whole pages: trafilatura main-content extraction
    extract_fallback: bool = False                       # also trafilatura's fallback extractors: ~3x the time per page
    unicode_form: Literal["NFKC", "NFC", "none"] = "NFKC"
    keep_newlines: bool = True                           # False: every whitespace run becomes one space
    lowercase: bool = False
    tokenizer: Literal["regexp", "treebank", "tweet"] = "regexp"
    remove_stopwords: bool = False
    stopwords: Literal["english"] = "english"
    output: Literal["text", "tokens"] = "text"          # tokens: the kept tokens joined by spaces
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(100_000, gt=0)
    min_tokens: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, gt=0)
    languages: list[str] = Field(default_factory=list)  # ISO 639-1 codes to keep; empty: no filter
    language_min_prob: float = Field(0.0, ge=0.0, le=1.0)
    language_sample_chars: int = Field(5000, gt=0)       # detect on this prefix: cost stays bounded

    @model_validator(mode="after")
    def _consistent(self) -> "TextParams":
        if self.remove_stopwords and self.output != "tokens":
            raise ValueError("remove_stopwords needs output: tokens (stop words are removed from the token list)")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars must be >= min_chars")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError("max_tokens must be >= min_tokens")
        return self


@functools.cache
def reuse_justext_stoplist() -> None:
    """trafilatura's justext fallback passes the same stop list on every page: a tuple of 154k
    words (every language's). justext's ``define_stoplist`` caches its frozenset with ``lru_cache``,
    whose key is that tuple: hashing and comparing 154k strings costs 3 ms per HTML page, 70 % of
    this stage's time on the demo's crawled pages. The same tuple object gives the same set: keep
    the last one by identity (the output is unchanged; tested)."""
    import justext.core

    make = justext.core.define_stoplist
    last: list = [None, None]   # [stop list given, frozenset made of it]

    def define_stoplist(stoplist):
        if stoplist is not last[0]:   # a tuple or frozenset (lru_cache needs it hashable): immutable
            last[:] = [stoplist, make(stoplist)]
        return last[1]

    define_stoplist.original = make
    justext.core.define_stoplist = define_stoplist


@dataclass
class Extracted:
    """Plain text out of a raw value, and how it was obtained (none / fragment / page / page_fallback)."""

    text: str
    method: str


def looks_like_html(text: str) -> bool:
    return _HTML_MARKUP.search(text) is not None


def strip_tags(markup: str) -> str:
    """Markup -> text without scripts, styles or comments; block elements become line breaks."""
    try:
        root = lxml_html.fromstring(markup.encode("utf-8"), parser=lxml_html.HTMLParser(encoding="utf-8"))
        root = _CLEANER.clean_html(root)
    except (etree.ParserError, etree.XMLSyntaxError, ValueError):
        return ""  # nothing parseable, e.g. markup with no element at all
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.lower() in _BLOCK_TAGS:
            el.text = "\n" + (el.text or "")
            el.tail = "\n" + (el.tail or "")
    return root.text_content()


def extract_text(raw: str, mode: str, extract_main: bool, fallback: bool = False) -> Extracted:
    """HTML handling: main-content extraction for whole pages, a tag strip for fragments.
    ``fallback``: when trafilatura's own extraction finds little, also run readability and jusText."""
    if mode == "never" or (mode == "auto" and not looks_like_html(raw)):
        return Extracted(raw, "none")
    if extract_main and _HTML_PAGE.search(raw):
        import trafilatura   # here: its import (lxml cleaners, justext, courlan) is for the actors that see pages

        main = trafilatura.extract(raw, include_comments=False, include_tables=True, favor_precision=True,
                                   fast=not fallback)
        if main and main.strip():
            return Extracted(main, "page")
        return Extracted(strip_tags(raw), "page_fallback")
    return Extracted(strip_tags(raw), "fragment")


def _keep_char(ch: str) -> bool:
    return ch in "\n\t" or ch in _KEEP_FORMAT or unicodedata.category(ch) not in _DROP_CATEGORIES


def normalise(text: str, form: str = "NFKC", keep_newlines: bool = True) -> str:
    """Unicode normal form, control / format / unassigned characters removed, whitespace collapsed."""
    text = _NEWLINES.sub("\n", text)
    if form != "none":
        text = unicodedata.normalize(form, text)
    if not text.isprintable():
        text = "".join(filter(_keep_char, text))
    if not keep_newlines:
        return " ".join(text.split())
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


@functools.lru_cache(maxsize=1)
def language_identifier() -> Any:
    """py3langid's identifier (its model ships in the wheel), loaded once per process."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise ImportError(
            "cleanup.text `languages` needs the py3langid package (pip install py3langid==0.4.0); "
            "leave `languages` empty to disable the language filter"
        ) from exc
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter:
    """Keeps texts whose detected language is allowed (and detected with enough confidence)."""

    def __init__(self, languages: list[str], min_prob: float, sample_chars: int):
        self.identifier = language_identifier()
        unknown = sorted(set(languages) - set(self.identifier.labels))
        if unknown:
            raise ValueError(f"cleanup.text: unknown language codes {unknown}; use ISO 639-1 codes such as en, de, fr")
        self.languages = set(languages)
        self.min_prob = min_prob
        self.sample_chars = sample_chars

    def check(self, text: str) -> dict[str, Any]:
        lang, prob = self.identifier.classify(text[: self.sample_chars])
        prob = float(prob)
        if lang not in self.languages or prob < self.min_prob:
            raise Reject("text_language", f"detected {lang} (p={prob:.2f}); allowed {sorted(self.languages)}")
        return {"language": lang, "language_prob": round(prob, 4)}


@register_stage
class TextCleaner(ModalityCleaner):
    """Crawled text or HTML -> clean text; rejects empty, too short / long / large, wrong language."""

    name = "cleanup.text"
    version = 1
    modality = "text"
    Params = TextParams
    reasons: ClassVar[dict[str, str]] = {
        "text_corrupt": "the value is not a string (or utf-8 bytes)",
        "text_too_large": "raw value longer than max_raw_chars; checked before any parsing",
        "text_empty": "nothing left after HTML stripping and normalisation",
        "text_too_short": "fewer than min_chars characters or min_tokens tokens",
        "text_too_long": "more than max_chars characters or max_tokens tokens",
        "text_language": "detected language not in languages, or its probability below language_min_prob",
    }

    def __init__(self, params: TextParams | dict | None = None, context=None):
        super().__init__(params, context)
        if self.params.extract_main:
            import trafilatura  # noqa: F401 (loaded with the stage, not on its first page)
        p: TextParams = self.params
        # Junk input is expected here and recorded as rejects; trafilatura would log each as an ERROR.
        logging.getLogger("trafilatura").setLevel(logging.CRITICAL)
        if p.extract_main and p.extract_fallback:
            reuse_justext_stoplist()
        self.tokenize = tokenizer(p.tokenizer)
        self.stop_words = stop_words(p.stopwords) if p.remove_stopwords else frozenset()
        self.language = None
        if p.languages:
            self.language = LanguageFilter(p.languages, p.language_min_prob, p.language_sample_chars)

    def clean(self, value: Any) -> Cleaned:
        p: TextParams = self.params
        if not isinstance(value, (str, bytes, bytearray)):
            raise Reject("text_corrupt", f"expected a string, got {type(value).__name__}")
        if len(value) > p.max_raw_chars:  # bytes: at least one per character, so this never under-counts
            raise Reject("text_too_large", f"{len(value)} raw characters > max_raw_chars {p.max_raw_chars}")
        if not isinstance(value, str):
            value = bytes(value).decode("utf-8", errors="replace")
        value = value.encode("utf-8", errors="ignore").decode("utf-8")  # lone surrogates out
        value = _XML_INVALID.sub("", _NEWLINES.sub("\n", value))        # before any parser sees it
        extracted = extract_text(value, p.html, p.extract_main, p.extract_fallback)
        text = normalise(extracted.text, p.unicode_form, p.keep_newlines)
        if p.lowercase:
            text = text.lower()
        tokens = self.tokenize(text)
        if self.stop_words:
            tokens = [t for t in tokens if t.lower() not in self.stop_words]
        if p.output == "tokens":
            text = " ".join(tokens)
        self._check_bounds(text, len(tokens))
        meta: dict[str, Any] = {"n_chars": len(text), "n_tokens": len(tokens), "html": extracted.method}
        if self.language is not None:
            meta.update(self.language.check(text))
        return Cleaned(text, meta)

    def _check_bounds(self, text: str, n_tokens: int) -> None:
        p: TextParams = self.params
        if not text:
            raise Reject("text_empty", "no text left after cleaning")
        if len(text) < p.min_chars:
            raise Reject("text_too_short", f"{len(text)} characters < min_chars {p.min_chars}")
        if n_tokens < p.min_tokens:
            raise Reject("text_too_short", f"{n_tokens} tokens < min_tokens {p.min_tokens}")
        if p.max_chars is not None and len(text) > p.max_chars:
            raise Reject("text_too_long", f"{len(text)} characters > max_chars {p.max_chars}")
        if p.max_tokens is not None and n_tokens > p.max_tokens:
            raise Reject("text_too_long", f"{n_tokens} tokens > max_tokens {p.max_tokens}")
