"""Where a command writes: checked before any work, so a bad `--out` costs a second, never a
profile; and a write that fails anyway (the folder replaced or gone since, the disk full) keeps
what was measured in a temporary folder and says where.

The check writes and removes one empty file in the nearest folder that exists: permission bits
do not tell (root writes through them; a read-only mount or a virtual file system refuses root).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from .errors import OutputError, UserInputError

T = TypeVar("T")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _refuses_files(folder: Path) -> OSError | None:
    """The error writing a file into `folder` gives, or None when it takes one."""
    try:
        fd, name = tempfile.mkstemp(prefix=".autotiacc-write-check-", dir=folder)
    except OSError as exc:
        return exc
    os.close(fd)
    os.unlink(name)
    return None


def _check_creatable(path: Path, folder: Path, flag: str, fix: str | None = None) -> None:
    """`folder` (absent, or a folder), where `path` goes, can be made and written into: its
    nearest existing folder takes files."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UserInputError(f"{flag} {path} cannot be created: {base} is a file, not a folder; give another {flag}.")
    err = _refuses_files(base)
    if err is not None:
        raise UserInputError(f"{flag} {path} cannot be written: {base} takes no new file ({err.strerror or err}); "
                             f"{fix or f'give a {flag} in a folder you can write'}.")


def check_output_dir(path: str | Path, *, flag: str = "`--out`", accept: str = "a folder (it is created if missing)",
                     fix: str | None = None) -> None:
    """Refuse, with one line naming the cause and the fix, an output folder that is a file (give
    `accept`) or cannot be created or written (`fix`; default: another one). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path} is a file, not a folder; give {accept}.")
    _check_creatable(path, path, flag, fix)


def check_output_file(path: str | Path, *, flag: str = "`--out`") -> None:
    """Refuse an output file that is a folder, or whose folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a folder, not a file; give a file name (or the folder without it).")
    _check_creatable(path, path.parent, flag)


def write_or_keep(write: Callable[[Path], T], path: str | Path, *, what: str) -> T:
    """`write(path)` (its folder made first). When that fails, `write` into a new temporary
    folder instead and raise `OutputError` naming both places: what was measured is not lost."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write(path)
    except OSError as exc:
        why = exc.strerror or str(exc)
    kept = Path(tempfile.mkdtemp(prefix="autotiacc-kept-")) / path.name
    try:
        write(kept)
    except OSError as exc:
        raise OutputError(f"{what} could not be written to {path} ({why}), nor kept in {kept.parent} "
                          f"({exc.strerror or exc}).") from None
    raise OutputError(f"{what} could not be written to {path} ({why}); it was kept in {kept}: move it where you "
                      "want it.")


def written_or_error(write: Callable[[], T], where: str | Path, *, what: str) -> T:
    """`write()`, whose files go to `where`; an OSError becomes one line naming the place. For
    outputs rendered from inputs that stay (reports, comparisons): nothing measured is lost."""
    try:
        return write()
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        raise OutputError(f"{what} could not be written to {where}:{name} {exc.strerror or exc}; the inputs are "
                          "unchanged: give a folder you can write and run it again.") from None
