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
    "FitError",
    "LevelError",
    "ManifestError",
    "OutputBusyError",
    "OutputError",
    "OutputExistsError",
    "QCError",
    "Slide",
    "SlideOpenError",
    "SlideReadError",
    "TemplateError",
    "UnsupportedFormatError",
    "WeightsError",
    "WsiNormError",
    "__version__",
    "open_slide",
]
