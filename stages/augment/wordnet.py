"""WordNet 3.0 from Debian's ``wordnet-base`` (``/usr/share/wordnet``) through nltk's reader.

nltk's ``WordNetCorpusReader`` expects the nltk_data layout; Debian's package differs in two
ways this module bridges: it ships no ``lexnames`` file (the 45 lexicographer file names are
fixed by WordNet 3.0, see lexnames(5WN)), and nltk's OMW version mapping would look for
``corpora/wordnet`` in nltk_data. The directory is also added to ``nltk.data.path``, which is
how nltk's path sandbox (nltk.pathsec) is told a corpus root is trusted.
"""
from __future__ import annotations

import io
import logging
import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # NLTK is imported when a reader is made: ~1.4 s, not paid by a driver validating params
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

log = logging.getLogger(__name__)

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
REQUIRED = ("index.noun", "data.noun", "index.verb", "data.verb", "index.adj", "data.adj",
            "index.adv", "data.adv")

# WordNet 3.0 lexicographer files, in file-number order (lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession "
    "noun.process noun.quantity noun.relation noun.shape noun.state noun.substance noun.time "
    "verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


@cache
def _reader_class() -> type[WordNetCorpusReader]:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class DebianWordNetReader(WordNetCorpusReader):
        """nltk's reader over a plain WordNet 3.0 database directory."""

        def open(self, file):  # noqa: A003 - nltk's name
            if file == "lexnames" and not Path(self._root.path, "lexnames").exists():
                return io.StringIO("".join(f"{i:02d}\t{name}\t0\n" for i, name in enumerate(LEXNAMES)))
            return super().open(file)

        def map_wn(self, version: str = "wordnet"):
            return None  # English only: no mapping to another WordNet version is needed

    return DebianWordNetReader


def missing_files(wordnet_dir: str) -> list[str]:
    return [f for f in REQUIRED if not (Path(wordnet_dir) / f).is_file()]


def load_wordnet(wordnet_dir: str = DEFAULT_WORDNET_DIR) -> WordNetCorpusReader | None:
    """The reader (one per directory and process: loading takes seconds), or None with one
    logged warning per directory when the database is absent."""
    root = str(Path(wordnet_dir).resolve())
    if root in _readers:
        return _readers[root]
    if missing_files(root):
        if root not in _warned:
            _warned.add(root)
            log.warning("WordNet not found at %s (install Debian's wordnet-base); synonym "
                        "replacement is skipped, the other text ops still run", root)
        return None
    import nltk

    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        _readers[root] = _reader_class()(root, None)
    return _readers[root]


_readers: dict[str, WordNetCorpusReader] = {}
_warned: set[str] = set()
