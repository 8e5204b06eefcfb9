"""Atomic output: write into a ``.partial`` sibling, rename onto the target on success.

A run killed at any moment leaves at most ``OUT.partial`` (and, for TIFF, the
spill folder ``OUT.levels.partial``) next to ``OUT``, never something at ``OUT``
itself: the only step that creates ``OUT`` is a ``rename`` of a finished file or
folder, atomic on POSIX file systems.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, OutputExistsError, WsiNormError

__all__ = [
    "PARTIAL_SUFFIX",
    "atomic_output",
    "check_target",
    "commit",
    "partial_path",
    "remove_path",
]

logger = logging.getLogger(__name__)

#: Suffix of the sibling an output is written into before it is renamed.
PARTIAL_SUFFIX = ".partial"


def partial_path(out: Path, tag: str = "") -> Path:
    """Return the sibling ``OUT<tag>.partial`` that ``out`` is written into."""
    return out.with_name(f"{out.name}{tag}{PARTIAL_SUFFIX}")


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; do nothing if ``path`` does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_target(out: Path, *, overwrite: bool) -> None:
    """Check that ``out`` may be written before any work starts.

    Raises
    ------
    OutputExistsError
        ``out`` exists and ``overwrite`` is false.
    OutputError
        The parent folder is missing, not a folder, or not writable.
    """
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{out}: output exists; pass overwrite=True to replace it")
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{out}: parent folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{out}: parent {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {parent} is not writable")


def commit(partial: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished ``partial`` onto ``out`` (replacing it if ``overwrite``).

    A file replaces a file in one ``os.replace``.  A folder target is first
    renamed aside (``OUT.old.partial``), then the new one renamed into place,
    then the old one deleted, so ``out`` is never a mixture of both.
    """
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"{out}: output appeared while writing; pass overwrite=True to replace it"
            )
        if out.is_dir() or partial.is_dir():
            old = partial_path(out, ".old")
            remove_path(old)
            os.replace(out, old)
            os.replace(partial, out)
            remove_path(old)
            return
    os.replace(partial, out)


@contextmanager
def atomic_output(out: Path, *, overwrite: bool, keep_partial: bool = False) -> Iterator[Path]:
    """Yield the ``.partial`` path to write into; commit it to ``out`` on success.

    Parameters
    ----------
    out : Path
        Final output path (file or folder).
    overwrite : bool
        Replace an existing ``out``.
    keep_partial : bool, optional
        Leave an existing ``.partial`` in place at entry (a writer that can
        resume decides itself whether to use or clear it).  Otherwise a stale
        ``.partial`` from an earlier, killed run is removed first.

    Raises
    ------
    OutputExistsError
        ``out`` exists and ``overwrite`` is false.
    OutputError
        Writing failed: the message names ``out`` and the cause, the cause is
        chained, and the ``.partial`` is removed.  A :class:`WsiNormError`
        raised inside (a slide that cannot be read, ...) propagates unchanged
        after the same clean-up.
    """
    check_target(out, overwrite=overwrite)
    partial = partial_path(out)
    if not keep_partial and (partial.exists() or partial.is_symlink()):
        logger.info("%s: removing stale %s from an earlier run", out, partial.name)
        remove_path(partial)
    try:
        yield partial
        commit(partial, out, overwrite=overwrite)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            # Interrupted: leave the .partial (a resumable writer picks it up).
            raise
        _cleanup(partial, out)
        if isinstance(exc, WsiNormError):
            raise
        raise OutputError(f"{out}: writing failed: {type(exc).__name__}: {exc}") from exc


def _cleanup(partial: Path, out: Path) -> None:
    try:
        remove_path(partial)
    except OSError as exc:
        logger.warning("%s: could not remove %s: %s", out, partial, exc)
