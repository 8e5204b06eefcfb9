"""Atomic output: write into a ``.partial`` sibling, rename onto the target on success.

A run killed at any moment leaves at most ``OUT.partial`` (and, for TIFF, the
spill folder ``OUT.levels.partial``) next to ``OUT``, never something at ``OUT``
itself: the only step that creates ``OUT`` is a ``rename`` of a finished file or
folder, atomic on POSIX file systems.

One writer per output: every write of ``OUT`` holds an exclusive claim on it
(:func:`claim_output`), an ``flock`` on ``OUT.lock`` taken before anything next
to ``OUT`` is touched and released after the commit.  ``OUT.partial`` and the
spill folder therefore belong to the claim holder: a stale one (left by a killed
run, whose lock the kernel released) is removed only by the next holder, never
while a live run writes it.  A second writer gets :class:`OutputBusyError`
("another run is writing OUT") at once instead of sharing the ``.partial``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ..errors import OutputBusyError, OutputError, OutputExistsError, WsiNormError

__all__ = [
    "LOCK_SUFFIX",
    "PARTIAL_SUFFIX",
    "atomic_output",
    "check_target",
    "claim_output",
    "commit",
    "lock_path",
    "partial_path",
    "refuse_overwriting_input",
    "remove_path",
]

logger = logging.getLogger(__name__)

#: Suffix of the sibling an output is written into before it is renamed.
PARTIAL_SUFFIX = ".partial"
#: Suffix of the lock file whose ``flock`` is the claim on writing an output.
LOCK_SUFFIX = ".lock"

# Outputs claimed in this context (a nested call on the same output, such as a flow's slide
# task calling normalize_slide, reuses its caller's claim; other threads have their own).
_HELD: ContextVar[frozenset[str]] = ContextVar("wsi_norm_claimed_outputs", default=frozenset())


def partial_path(out: Path, tag: str = "") -> Path:
    """Return the sibling ``OUT<tag>.partial`` that ``out`` is written into."""
    return out.with_name(f"{out.name}{tag}{PARTIAL_SUFFIX}")


def lock_path(out: Path) -> Path:
    """Return the sibling ``OUT.lock`` whose ``flock`` is the claim on writing ``out``."""
    return out.with_name(f"{out.name}{LOCK_SUFFIX}")


def _check_parent(out: Path) -> None:
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{out}: parent folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{out}: parent {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {parent} is not writable")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def _acquire(out: Path) -> int:
    """Open and ``flock`` ``OUT.lock`` without waiting; return its descriptor."""
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the lock file {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"another run is writing {out} ({holder}; lock {path.name}); "
                "nothing was written, try again when it has finished"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"{out}: cannot lock {path}: {exc.strerror}") from exc
        # The previous holder unlinks the file before releasing it: a lock won on an unlinked
        # file claims nothing, so check that the path still names the file we locked.
        try:
            on_disk = os.stat(path, follow_symlinks=False)
            mine = os.fstat(fd)
            same = (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    since = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    note = f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
    except OSError as exc:  # the claim holds without the note; say so and go on
        logger.warning("%s: could not note the lock holder: %s", path, exc)
    return fd


def _release(out: Path, fd: int) -> None:
    try:
        lock_path(out).unlink(missing_ok=True)  # unlinked while still held: see _acquire
    except OSError as exc:
        logger.warning("%s: could not remove the lock file: %s", out, exc)
    finally:
        os.close(fd)


@contextmanager
def claim_output(out: Path) -> Iterator[None]:
    """Hold the exclusive claim on writing ``out`` for the duration of the ``with`` block.

    The claim is an ``flock(LOCK_EX | LOCK_NB)`` on the sibling ``OUT.lock`` (created if
    needed, holding the holder's pid, host and start time, removed on release).  The
    kernel releases it when the holding process dies, however it dies, so a killed run
    never blocks the next one.  ``flock`` works on local file systems and on NFSv4;
    it conflicts between processes and between threads that claim separately.

    Claiming an output this context already holds (a nested call) is a no-op.

    Raises
    ------
    OutputBusyError
        Another run holds the claim: the message says "another run is writing OUT" and
        names the holder.  Nothing is waited for and nothing is touched.
    OutputError
        The parent folder is missing or not writable, or the lock file cannot be made.
    """
    out = Path(out)
    key = os.path.join(os.path.realpath(out.parent), out.name)
    held = _HELD.get()
    if key in held:
        yield
        return
    _check_parent(out)
    fd = _acquire(out)
    token = _HELD.set(held | {key})
    try:
        yield
    finally:
        _HELD.reset(token)
        _release(out, fd)


def _target_state(out: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(out, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; do nothing if ``path`` does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def refuse_overwriting_input(out: Path, used: Path, what: str) -> None:
    """Raise :class:`OutputError` when writing ``out`` would replace or remove the data of the
    input ``used`` (``what`` names it in the message).

    It would when the file or folder ``used`` finally points to is the entry ``out`` names
    (written by a rename over it) or lies inside it (a replaced output folder is removed):
    ``overwrite`` replaces an earlier output, never an input. A link at ``out`` is replaced,
    not followed, and another hard link to the input leaves the input's own name intact:
    both are allowed. An input that cannot be resolved is left to fail where it is read.
    """
    entry = out.parent.resolve() / out.name  # the directory entry the write replaces
    try:
        data = used.resolve(strict=True)
    except OSError:
        return
    if data == entry or data.is_relative_to(entry):
        where = "itself" if data == entry else f"(it lies inside {out})"
        raise OutputError(
            f"{out}: is the {what} {used} {where}; writing there would destroy it: choose "
            "another output path"
        )


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
    _check_parent(out)


def commit(
    partial: Path,
    out: Path,
    *,
    overwrite: bool,
    expected: tuple[int, int, int, int] | None | Literal[False] = False,
) -> None:
    """Move the finished ``partial`` onto ``out`` (replacing it if ``overwrite``).

    A file replaces a file in one ``os.replace``.  A folder target is first
    renamed aside (``OUT.old.partial``), then the new one renamed into place,
    then the old one deleted, so ``out`` is never a mixture of both.

    ``expected`` (the state of ``out`` when the write began, from inside the claim; False:
    not checked): when ``out`` has changed since, something that does not take the claim
    wrote it meanwhile, and its output is kept rather than replaced (:class:`OutputBusyError`).
    """
    if expected is not False and _target_state(out) != expected:
        raise OutputBusyError(
            f"another run replaced {out} while this one was writing it; its output is kept "
            "and this run's result discarded"
        )
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

    The whole write, from the stale-``.partial`` clean-up to the commit, holds the claim
    on ``out`` (:func:`claim_output`; a caller that already holds it keeps it).

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
    OutputBusyError
        Another run holds the claim on ``out``, or replaced ``out`` while this one wrote.
    OutputError
        Writing failed: the message names ``out`` and the cause, the cause is
        chained, and the ``.partial`` is removed.  A :class:`WsiNormError`
        raised inside (a slide that cannot be read, ...) propagates unchanged
        after the same clean-up.
    """
    check_target(out, overwrite=overwrite)
    with claim_output(out):
        yield from _write_claimed(out, overwrite=overwrite, keep_partial=keep_partial)


def _write_claimed(out: Path, *, overwrite: bool, keep_partial: bool) -> Iterator[Path]:
    check_target(out, overwrite=overwrite)  # again, now that no other writer can change it
    before = _target_state(out)
    partial = partial_path(out)
    if not keep_partial and (partial.exists() or partial.is_symlink()):
        logger.info("%s: removing stale %s from an earlier run", out, partial.name)
        remove_path(partial)
    try:
        yield partial
        commit(partial, out, overwrite=overwrite, expected=before)
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
