"""wsi-norm: slide-wide stain normalization of whole-slide images at archive scale."""

from __future__ import annotations

from wsi_norm.errors import (
    FitError,
    LevelError,
    ManifestError,
    OutputBusyError,
    OutputError,
    OutputExistsError,
    QCError,
    SlideOpenError,
    SlideReadError,
    TemplateError,
    UnsupportedFormatError,
    WeightsError,
    WsiNormError,
)
from wsi_norm.slide import Slide, open_slide

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "Slide",
    "open_slide",
    "WsiNormError",
    "SlideOpenError",
    "UnsupportedFormatError",
    "SlideReadError",
    "LevelError",
    "FitError",
    "QCError",
    "TemplateError",
    "OutputExistsError",
    "OutputError",
    "OutputBusyError",
    "WeightsError",
    "ManifestError",
]
