"""Finding a local WordNet 3.0 for NLTK's METEOR, without ever downloading one.

Three layouts are accepted: an NLTK data folder (`corpora/wordnet` or `corpora/wordnet.zip`, what
`nltk.downloader wordnet` writes), a WordNet "dict" folder (Princeton's release), and Debian's
`wordnet-base` package (/usr/share/wordnet). Debian ships the same database files but not the small
`lexnames` table that NLTK's reader opens at start-up (served from memory here) nor `index.sense`
(only NLTK's multilingual and sense-key functions need it; METEOR does not).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["load_wordnet", "DEBIAN_WORDNET_DIR"]

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

# WordNet 3.0's lexicographer file names in file-number order (lexnames(5WN)); NLTK reads only
# the index and the name of each line.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body "
    "verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact "
    "verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

_HOW_TO = (
    "No local WordNet 3.0 was found (METEOR needs one; medim never downloads it). Any of these works:\n"
    "  * Debian/Ubuntu: `apt-get install wordnet-base` (files in /usr/share/wordnet)\n"
    "  * NLTK: `python -m nltk.downloader -d ~/nltk_data wordnet` (or set NLTK_DATA)\n"
    "  * pass wordnet=PATH: an NLTK data folder, a WordNet dict folder or NLTK's wordnet.zip\n"
    "  * or pass wordnet=False to skip METEOR."
)


def import_nltk():
    """Import NLTK or explain how to install the `eval` extra."""
    try:
        import nltk
    except ImportError as e:
        raise ImportError(
            "report metrics need NLTK: `pip install 'medim-diffusion[eval]'` (or `pip install nltk`)"
        ) from e
    return nltk


def _lexnames_text() -> str:
    return "".join(
        f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)
    )


def _reader(root) -> Any:
    """A WordNetCorpusReader on `root` (a PathPointer), supplying `lexnames` when it is missing."""
    import io

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames" and not _has(self._root, "lexnames"):
                return io.StringIO(_lexnames_text())
            return super().open(file)

        def map_wn(self, version="wordnet"):
            # The synset map to another WordNet version serves only the multilingual functions and
            # needs `index.sense`, which Debian does not ship.
            return None

    with warnings.catch_warnings():
        # No Open Multilingual Wordnet here: METEOR only uses the English synsets.
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return _Reader(root, None)


def _has(root, name: str) -> bool:
    try:
        root.join(name)
    except OSError:
        return False
    return True


def _is_dict_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in ("data.noun", "index.noun", "noun.exc"))


@functools.lru_cache(maxsize=4)
def _load_path(path: str) -> Any:
    nltk = import_nltk()
    from nltk.data import FileSystemPathPointer

    p = Path(path)
    if p.is_file() and p.suffix == ".zip":
        p = p.parent.parent if p.parent.name == "corpora" else p.parent
    # NLTK only opens corpora under its data path: a folder the caller names is trusted explicitly.
    if str(p) not in nltk.data.path:
        nltk.data.path.append(str(p))
    if p.is_dir() and _is_dict_dir(p):
        return _reader(FileSystemPathPointer(str(p)))
    for resource in ("corpora/wordnet", "wordnet"):
        try:
            return _reader(nltk.data.find(resource, paths=[str(p)]))
        except LookupError:
            continue
    raise FileNotFoundError(
        f"wordnet={path!r} is not a WordNet folder (data.noun, index.noun, noun.exc ...), an NLTK data "
        f"folder holding corpora/wordnet[.zip], nor NLTK's wordnet.zip.\n{_HOW_TO}"
    )


def load_wordnet(wordnet: str | os.PathLike | Any | None = None) -> Any:
    """Return an NLTK `WordNetCorpusReader` for WordNet 3.0 from local files only.

    Args:
        wordnet: `None` searches NLTK's data path (NLTK_DATA, ~/nltk_data, /usr/share/nltk_data ...)
            and then Debian's /usr/share/wordnet; a path names the files explicitly; a
            `WordNetCorpusReader` is returned as is.

    Raises:
        LookupError: nothing found, with the ways to install WordNet.

    Example:
        >>> wn = load_wordnet("/usr/share/wordnet")  # doctest: +SKIP
        >>> wn.synsets("lung")[0].name()  # doctest: +SKIP
        'lung.n.01'
    """
    nltk = import_nltk()
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if isinstance(wordnet, WordNetCorpusReader):
        return wordnet
    if wordnet is not None:
        if not isinstance(wordnet, (str, os.PathLike)):
            raise TypeError(
                f"wordnet must be None, a path or a WordNetCorpusReader, got {type(wordnet).__name__}"
            )
        path = Path(wordnet).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"wordnet={str(wordnet)!r} does not exist.\n{_HOW_TO}")
        return _load_path(str(path.resolve()))
    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        root = None
    if root is not None:
        return _load_root(root)
    if _is_dict_dir(DEBIAN_WORDNET_DIR):
        return _load_path(str(DEBIAN_WORDNET_DIR))
    raise LookupError(_HOW_TO)


@functools.lru_cache(maxsize=2)
def _load_root(root) -> Any:
    return _reader(root)
