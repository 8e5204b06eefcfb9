"""Exception types raised by wsi-norm.

Every error the library raises on bad input derives from :class:`WsiNormError`,
so callers (the CLI, the Prefect flows) can catch one type, print one line and
move on to the next slide.  Each subclass also derives from the builtin that a
caller would expect, so ``except OSError`` still catches an unreadable file.
"""

from __future__ import annotations

__all__ = [
    "FitError",
    "LevelError",
    "ManifestError",
    "OutputBusyError",
    "OutputError",
    "OutputExistsError",
    "QCError",
    "SlideOpenError",
    "SlideReadError",
    "TemplateError",
    "UnsupportedFormatError",
    "WeightsError",
    "WsiNormError",
]


class WsiNormError(Exception):
    """Base class of every error wsi-norm raises on purpose."""


class SlideOpenError(WsiNormError, OSError):
    """A slide or image file is missing or cannot be opened."""


class UnsupportedFormatError(SlideOpenError):
    """The file opens, but holds something wsi-norm does not handle (16-bit, not RGB, ...)."""


class SlideReadError(WsiNormError, OSError):
    """Pixels could not be read from an open slide (truncated file, corrupt tile)."""


class LevelError(WsiNormError, IndexError):
    """A pyramid level that the slide does not have was requested."""


class FitError(WsiNormError, ValueError):
    """Stain statistics could not be fitted (too little tissue, a degenerate stain matrix)."""


class QCError(FitError):
    """A fit or a compiled colour map failed the QC gate: writing it would give wrong colours.

    The message names the slide and the numbers against their bounds. ``force`` (``--force``,
    the manifest's ``force: true``) writes anyway and records the failure in provenance.
    """


class TemplateError(WsiNormError, ValueError):
    """A template document is malformed, of another method or of an unknown schema version."""


class OutputExistsError(WsiNormError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


class OutputError(WsiNormError, OSError):
    """Output could not be written (not writable, disk full, interrupted)."""


class OutputBusyError(WsiNormError, BlockingIOError):
    """Another run holds the claim on this output (it is writing it, or replaced it meanwhile).

    Not a failure of this run: nothing was written and the other run's output is left alone.
    """


class WeightsError(WsiNormError, ValueError):
    """A model weights file is not a usable checkpoint."""


class ManifestError(WsiNormError, ValueError):
    """A data manifest is invalid."""
