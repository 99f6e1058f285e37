"""cleanup.text: HTML to text, normalisation, bounds, tokens, language filter, batch processing."""
from __future__ import annotations

import json
import sys

import pytest
from pydantic import ValidationError

from stages.base import StageContext
from stages.cleanup import text as text_mod
from stages.cleanup.text import TextCleaner
from stages.registry import STAGES
from tests.stages.helpers import make_batch, reason_of

PAGE = """<!DOCTYPE html>
<html lang="en"><head><title>Otter news</title>
<style>body { font-family: STYLE_TEXT_SHOULD_GO; }</style>
<script>var tracker = "SCRIPT_TEXT_SHOULD_GO";</script></head>
<body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li>
<li><a href="/shop">Shop now</a></li></ul></nav>
<main><article>
<h1>River otters are playful</h1>
<p>River otters live in rivers and lakes across North America. They are known for sliding down
muddy banks &amp; playing in the water for hours at a time.</p>
<p>Otters eat fish, crayfish and frogs. A single otter can eat up to fifteen percent of its body
weight each day, which keeps it warm in cold water.</p>
<p>Conservation efforts have helped otter populations recover in many regions where they had
disappeared during the last century.</p>
</article></main>
<footer><p>Copyright 2024 Example Corp. All rights reserved. Privacy policy | Terms of use</p></footer>
<script>console.log("MORE_SCRIPT_TEXT")</script>
</body></html>"""



def test_registered():
    assert STAGES["cleanup.text"] is TextCleaner


def test_whole_page_keeps_main_content_and_drops_boilerplate():
    out = TextCleaner().clean(PAGE)
    assert "River otters live in rivers and lakes" in out.value
    assert "muddy banks & playing" in out.value            # entity decoded
    assert "fifteen percent" in out.value and "last century" in out.value
    for gone in ("SCRIPT_TEXT", "STYLE_TEXT", "Shop now", "About us", "Copyright", "<p>", "&amp;"):
        assert gone not in out.value
    assert out.meta["html"] == "page"


def test_page_falls_back_to_tag_strip_when_extraction_finds_nothing(monkeypatch):
    import trafilatura

    monkeypatch.setattr(trafilatura, "extract", lambda *a, **k: None)
    out = TextCleaner().clean(PAGE)
    assert out.meta["html"] == "page_fallback"
    assert "River otters live in rivers" in out.value
    for gone in ("SCRIPT_TEXT", "STYLE_TEXT", "Otter news", "<"):
        assert gone not in out.value


def test_fragment_strip_tags_entities_and_block_breaks():
    raw = "intro<p>Caf&eacute;&nbsp;<b>au</b> lait&#33;</p><script>x()</script><div>next</div><!-- hidden -->"
    out = TextCleaner().clean(raw)
    assert [line for line in out.value.split("\n") if line] == ["intro", "Café au lait!", "next"]
    assert out.meta["html"] == "fragment"


def test_plain_text_with_angle_brackets_is_left_alone():
    assert TextCleaner().clean("if a < b and c > d then stop").value == "if a < b and c > d then stop"
    assert TextCleaner({"html": "never"}).clean("<b>kept</b>").value == "<b>kept</b>"


def test_nfkc_control_characters_and_whitespace():
    raw = "ｆｕｌｌ\u200bwidth ﬁle\x00\x07 ok\r\nline\t\t two\u00ad\n\n\n\n\nthird\u2028fourth  "
    assert TextCleaner().clean(raw).value == "fullwidth file ok\nline two\n\nthird\nfourth"
    assert TextCleaner({"keep_newlines": False}).clean(raw).value == "fullwidth file ok line two third fourth"
    assert TextCleaner().clean("emoji \U0001F469\u200D\U0001F4BB ok").value == "emoji \U0001F469\u200D\U0001F4BB ok"


def test_empty_and_whitespace_only_and_script_only():
    c = TextCleaner()
    for value in ("", "   \n\t", "<script>only()</script>", "<!-- nothing -->", "\x00\x01\ufeff"):
        assert reason_of(c, value) == "text_empty"


def test_length_bounds_in_chars_and_tokens():
    assert reason_of(TextCleaner({"min_chars": 20}), "too short") == "text_too_short"
    assert reason_of(TextCleaner({"min_tokens": 5}), "only three words") == "text_too_short"
    assert reason_of(TextCleaner({"max_chars": 10}), "this is longer than ten") == "text_too_long"
    assert reason_of(TextCleaner({"max_tokens": 3}), "one two three four") == "text_too_long"
    assert TextCleaner({"min_tokens": 3, "max_tokens": 3}).clean("one two three").meta["n_tokens"] == 3


def test_raw_size_cap_is_checked_before_parsing(monkeypatch):
    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed a value that is over max_raw_chars")

    monkeypatch.setattr(text_mod, "extract_text", no_parsing)
    assert reason_of(TextCleaner({"max_raw_chars": 1000}), "<p>" + "x" * 2000 + "</p>") == "text_too_large"


def test_tokens_output_lowercase_and_stop_words():
    c = TextCleaner({"output": "tokens", "lowercase": True, "remove_stopwords": True})
    out = c.clean("The Otters are playing in the river, and they won't stop!")
    assert out.value == "otters playing river , won't stop !"
    assert out.meta["n_tokens"] == 7
    treebank = TextCleaner({"output": "tokens", "tokenizer": "treebank"}).clean("They won't stop.")
    assert treebank.value == "They wo n't stop ."


def test_stop_words_without_token_output_fails_at_construction():
    with pytest.raises(ValidationError, match="remove_stopwords"):
        TextCleaner({"remove_stopwords": True})
    with pytest.raises(ValidationError):
        TextCleaner({"no_such_param": 1})


def test_language_filter():
    pytest.importorskip("py3langid")
    c = TextCleaner({"languages": ["en"], "language_min_prob": 0.5})
    out = c.clean("The quick brown fox jumps over the lazy dog while the farmer watches from the field.")
    assert out.meta["language"] == "en" and out.meta["language_prob"] >= 0.5
    german = "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer vom Feld aus zusieht."
    assert reason_of(c, german) == "text_language"
    with pytest.raises(ValueError, match="unknown language codes"):
        TextCleaner({"languages": ["english"]})


def test_language_filter_without_package_fails_clearly_at_construction(monkeypatch):
    monkeypatch.setattr(text_mod, "language_identifier", text_mod.language_identifier.__wrapped__)
    monkeypatch.setitem(sys.modules, "py3langid", None)
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    with pytest.raises(ImportError, match="pip install py3langid"):
        TextCleaner({"languages": ["en"]})
    TextCleaner()  # without the option nothing is needed


def test_process_batch_cleans_rejects_and_skips():
    values = [PAGE, "", None, "  plain\ttext  ", b"utf-8 bytes \xc3\xa9"]
    batch = make_batch(text=values)
    batch["reject_reason"][4] = "image_corrupt"     # rejected earlier: left alone
    out = TextCleaner()(batch)
    assert "River otters" in out["text"][0]
    assert json.loads(out["meta"][0])["text_html"] == "page"
    assert (out["reject_stage"][1], out["reject_reason"][1]) == ("cleanup.text", "text_empty")
    assert out["text"][2] is None and out["reject_reason"][2] == ""
    assert out["text"][3] == "plain text"
    assert out["text"][4] == b"utf-8 bytes \xc3\xa9"


def test_drop_modality_policy_keeps_row_with_other_media():
    batch = make_batch(text=["", ""], image=[b"jpeg-bytes", None])
    out = TextCleaner({}, StageContext(bad_modality="drop_modality"))(batch)
    assert out["text"][0] is None and json.loads(out["dropped"][0]) == {"text": "text_empty"}
    assert out["reject_reason"][0] == ""
    assert out["reject_reason"][1] == "no_modality"


def test_bytes_input_is_decoded():
    assert TextCleaner().clean("caf\u00e9 ok".encode()).value == "café ok"


def test_fast_extraction_finds_the_main_text_of_crawled_pages():
    """The default skips trafilatura's fallback extractors (readability, jusText): a third of the
    time per page. On pages whose main content trafilatura finds itself, the text is the same."""
    import numpy as np

    from pipeline.demo import _text

    rng = np.random.default_rng(1)
    pages = [_text(label, rng, html=True) for label in ("forest", "ocean", "city", "desert") * 5]
    fast, slow = TextCleaner(), TextCleaner({"extract_fallback": True})
    assert [fast.clean(p).value for p in pages] == [slow.clean(p).value for p in pages]
    assert all(fast.clean(p).meta["html"] == "page" and "<" not in fast.clean(p).value for p in pages)


def test_reusing_justext_stop_list_keeps_every_extraction():
    """cleanup.text keeps the frozenset justext makes of trafilatura's 154k-word stop list instead
    of remaking it for every page: the same set, the same extracted text."""
    import justext.core
    import numpy as np

    from pipeline.demo import _text

    TextCleaner({"extract_fallback": True})   # constructing the stage installs the reuse (jusText is a fallback)
    reuse = justext.core.define_stoplist

    class Counted(tuple):   # counts how often justext's lru_cache hashes the stop list
        hashed = 0

        def __hash__(self):
            Counted.hashed += 1
            return super().__hash__()

    words = Counted(["The", "a", "Of"])
    assert reuse(words) is reuse(words) is reuse(words) == frozenset({"the", "a", "of"})
    assert Counted.hashed == 1   # once, for the first call; then the same object is reused
    assert reuse(("X",)) == frozenset({"x"}) and reuse(words) == frozenset({"the", "a", "of"})

    rng = np.random.default_rng(0)
    pages = [PAGE] + [_text(label, rng, html=True) for label in ("forest", "ocean", "city", "desert") * 5]
    slow = TextCleaner({"extract_fallback": True})
    kept = [slow.clean(p).value for p in pages]
    justext.core.define_stoplist = reuse.original
    try:
        assert [TextCleaner({"extract_fallback": True}).clean(p).value for p in pages] == kept
    finally:
        justext.core.define_stoplist = reuse
