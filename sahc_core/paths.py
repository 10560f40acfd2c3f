"""Where user input meets the file system: identifier patterns, containment, and owned directories.

Three rules, each enforced in one place:

* **Identifiers** are checked where they enter, one rule per kind: run ids by :func:`safe_id` (a
  single path component of letters, digits and ``._-``), plan names by :func:`safe_label` (a label:
  any letters, spaces and punctuation, but never a separator, a control character or a leading
  dot), so that an identifier joined under a directory can never name anything but a child.
* **Containment**: every path built from user input is checked before anything is written or
  removed. :func:`contained` resolves symlinks and ``..`` and requires the result to lie strictly
  inside the resolved parent (for directories we write or delete); :func:`member` checks a relative
  file name that a file inside a directory names (a shard in a model index, a file in an assembly
  manifest) lexically: relative, no ``..``, no drive or root, so it can only address the directory's
  own tree (symlinks the directory's owner placed there, as the Hugging Face hub cache does, stay usable).
* **Ownership**: every directory SAHC creates for its output carries the marker file
  :data:`MARKER`; :func:`remove_owned` deletes a directory only when it carries the marker (and is not
  a symlink), so no input can make SAHC delete a directory it did not create.
"""
from __future__ import annotations

import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from sahc_core.errors import SahcError

#: Run ids and any other identifier joined under a directory: one safe path component.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Longest plan name (a label shown in the UI and stored in the cache; see :func:`safe_label`).
LABEL_MAX = 100
#: Marker file written into every directory SAHC creates for its output (checked before deleting).
MARKER = ".sahc-owned"
_MARKER_TEXT = "This directory was created by SAHC Explorer (sahc_core); SAHC deletes only directories holding this file.\n"


class PathError(SahcError):
    """An identifier or path from user input that could address something outside its place."""


def safe_id(value: object, what: str = "run id") -> str:
    """``value`` if it is a safe identifier (:data:`ID_PATTERN`), else :class:`PathError`.

    Parameters
    ----------
    value : object
        The identifier as given (CLI flag, page, cache row).
    what : str
        What it names, for the message (``"run id"``).
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise PathError(f"{what} {_shown(value)} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit.")
    return value


def safe_label(value: object, what: str = "plan name") -> str:
    """``value`` if it is a safe label, else :class:`PathError`.

    A label is 1-100 characters that start with a letter or digit (any script) and hold no path
    separator (``/``, ``\\``) and no control, format or unassigned character (Unicode category
    ``C*``: newlines, NUL, bidirectional overrides); spaces and punctuation are allowed. Such a name
    is also a safe single file-name component.
    """
    ok = (isinstance(value, str) and 0 < len(value) <= LABEL_MAX and value[0].isalnum()
          and not any(ch in "/\\" or unicodedata.category(ch).startswith("C") for ch in value))
    if not ok:
        raise PathError(f"{what} {_shown(value)} is not allowed: use 1-{LABEL_MAX} characters starting with a "
                        "letter or digit, without '/', '\\' or control characters.")
    return value


def _shown(value: object) -> str:
    """A short, printable rendering of a rejected value (never more than 40 characters)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def contained(parent: str | Path, child: str | Path, what: str = "path") -> Path:
    """``parent / child`` resolved, checked to lie strictly inside the resolved ``parent``.

    Symlinks and ``..`` are resolved first (on the parts that exist), so a symlink planted at
    ``child`` that points elsewhere is refused too.

    Raises
    ------
    PathError
        When the result is ``parent`` itself or lies outside it.
    """
    root = Path(parent).expanduser().resolve()
    path = (root / child).resolve()
    if path == root or not path.is_relative_to(root):
        raise PathError(f"{what} {_shown(str(child))} would lie outside {root}; refusing to write or delete there.")
    return path


def member(root: str | Path, name: object, what: str = "file") -> Path:
    """``root / name`` for a relative file name that a file inside ``root`` names (checked lexically).

    Raises
    ------
    PathError
        When ``name`` is not a non-empty relative path without ``..`` (an absolute path, a drive,
        ``../../etc/passwd``), before anything is opened.
    """
    text = name if isinstance(name, str) else ""
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    bad = (not text or "\0" in text or posix.is_absolute() or windows.drive or windows.root
           or ".." in posix.parts or ".." in windows.parts)
    if bad:
        raise PathError(f"{what} {_shown(name)} points outside {root}; only files inside the directory are read.")
    return Path(root) / posix


def mark_owned(directory: str | Path) -> Path:
    """Create ``directory`` (and parents) if needed and write the ownership marker into it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
    return d


def is_owned(directory: str | Path) -> bool:
    """True for a real directory (not a symlink) that holds the ownership marker."""
    d = Path(directory)
    return d.is_dir() and not d.is_symlink() and (d / MARKER).is_file()


def check_removable(directory: str | Path, what: str = "directory") -> None:
    """PathError unless ``directory`` is absent, empty, or a directory SAHC created (checked before work)."""
    d = Path(directory)
    if not d.exists() and not d.is_symlink():
        return
    if is_owned(d) or (d.is_dir() and not d.is_symlink() and not any(d.iterdir())):
        return
    raise PathError(f"{what} {d} was not created by SAHC (it has no {MARKER} marker); "
                    "refusing to delete it: choose another location or remove it yourself.")


def remove_owned(directory: str | Path, what: str = "directory") -> bool:
    """Delete ``directory`` if SAHC created it (or it is empty); True when removed, False when absent.

    Raises
    ------
    PathError
        When it exists but is not a directory SAHC created (no marker, or a symlink); nothing is removed.
    OSError
        When the removal itself fails (permissions).
    """
    check_removable(directory, what)
    d = Path(directory)
    if not d.exists():
        return False
    if is_owned(d):
        shutil.rmtree(d)
    else:
        os.rmdir(d)  # empty: rmdir removes nothing else
    return True


@contextmanager
def staged_directory(out: Path, tmp: Path, write_error: Callable[[Exception, Path], Exception],
                     what: str = "output") -> Iterator[Path]:
    """Write a directory atomically: yield ``tmp`` (fresh, marked ours), then move it onto ``out``.

    The one staging rule of every directory SAHC writes (an assembly, an export): nothing appears at
    ``out`` until the block has finished; an existing ``out`` (the caller checked it removable with
    :func:`check_removable` before any work) is moved aside, replaced, then removed; on any failure
    ``tmp`` is removed, and an ``OSError`` / ``SafetensorError`` (a full disk, a permission) becomes
    ``write_error(exc, out)``.
    """
    from safetensors import SafetensorError

    remove_owned(tmp, f"a stale temporary {what} directory")  # never a directory SAHC did not create
    try:
        mark_owned(tmp)  # marked before anything is written, so a failure can always remove it
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():  # os.replace cannot overwrite a non-empty directory
            os.replace(out, old)
        os.replace(tmp, out)
        remove_owned(old, f"the replaced {what}")
    except (OSError, SafetensorError) as exc:
        _discard(tmp)
        raise write_error(exc, out) from exc
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    if is_owned(tmp):
        shutil.rmtree(tmp, ignore_errors=True)  # best effort: the error that stopped the writer is what counts
