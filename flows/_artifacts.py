"""Prefect artifacts for the flows: small PNG data URIs, markdown, tables, throttled progress.

The Prefect UI renders a ``data:image/png;base64,...`` URI both as an image artifact and
inside markdown, so QC images need no web server.  Each image is kept to tens of kB
(shrunk and, if needed, palette-quantised) because artifacts live in the Prefect database.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MAX_IMAGE_BYTES",
    "ProgressArtifact",
    "artifact_key",
    "figure_data_uri",
    "markdown_table",
    "png_data_uri",
]

MAX_IMAGE_BYTES = 40_000
"""Largest encoded image (bytes of PNG before base64) an artifact may carry."""


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from free-form parts.

    Examples
    --------
    >>> artifact_key("qc", "Site_A", "CMU-1.Small")
    'qc-site-a-cmu-1-small'
    """
    text = "-".join(parts).lower()
    text = re.sub(r"[^a-z0-9-]+", "-", text)
    return re.sub(r"-{2,}", "-", text).strip("-")[:200] or "artifact"


def _encode_png(image: Any, *, quantize: int | None) -> bytes:
    from PIL import Image

    if quantize is not None:
        image = image.quantize(colors=quantize, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # optimize=True: 7x the time for 2 % fewer bytes
    return buf.getvalue()


def png_data_uri(rgb: NDArray[np.uint8], *, max_px: int = 256, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """Encode an RGB image as a small ``data:image/png;base64,...`` URI.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        The image (a slide thumbnail, a plot rendered to pixels).
    max_px : int
        Longest side after resizing (aspect kept; never enlarged).
    max_bytes : int
        Budget for the PNG bytes: the image is palette-quantised (256, then 64 colours)
        and then halved in size until it fits.

    Returns
    -------
    str
        The data URI.
    """
    from PIL import Image

    arr = np.ascontiguousarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    image = Image.fromarray(arr, mode="RGB")
    side = max_px
    while True:
        scaled = image.copy()
        scaled.thumbnail((side, side), Image.Resampling.LANCZOS)
        for quantize in (None, 256, 64):
            data = _encode_png(scaled, quantize=quantize)
            if len(data) <= max_bytes:
                return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        if side <= 32:
            return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        side //= 2


def figure_data_uri(fig: Figure, *, dpi: int = 80, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """Render a matplotlib figure to a PNG data URI within ``max_bytes`` (closes the figure)."""
    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    from PIL import Image

    buf.seek(0)
    rgb = np.asarray(Image.open(buf).convert("RGB"))
    return png_data_uri(rgb, max_px=max(rgb.shape[:2]), max_bytes=max_bytes)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table with one column per key of the first row."""
    if not rows:
        return "_(none)_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class ProgressArtifact:
    """A Prefect progress artifact fed by the library's ``progress(done, total)`` callback.

    Updates are throttled: at most one per ``min_interval_s`` and only when the percentage
    moved by ``min_step_pct`` (the last call, ``done == total``, always goes through). The
    artifact is created by the first update that goes through, at that percentage (with
    ``create_now``, at once at 0 %): a slide that finishes within ``min_interval_s`` costs one
    API call, not two. Thread-safe: dask may call back from several threads.

    Parameters
    ----------
    key : str
        Artifact key (see :func:`artifact_key`).
    description : str
    min_interval_s : float
    min_step_pct : float
    create_now : bool
        Create the artifact at 0 % in the constructor (a run-level bar the UI should show at once).
    """

    def __init__(self, key: str, *, description: str, min_interval_s: float = 1.0, min_step_pct: float = 5.0,
                 create_now: bool = False) -> None:
        self.key = key
        self.description = description
        self.min_interval_s = min_interval_s
        self.min_step_pct = min_step_pct
        self.updates = 0
        self._lock = threading.Lock()
        self._last_time = time.monotonic()  # the first update waits min_interval_s, like the others
        self._last_pct = 0.0
        self.artifact_id: UUID | None = None
        if create_now:
            self.artifact_id = self._create(0.0, description)

    def _create(self, pct: float, description: str) -> UUID:
        from prefect.artifacts import create_progress_artifact

        # async_dispatch is typed "UUID | Coroutine"; called from sync code it returns the UUID
        return cast(UUID, create_progress_artifact(progress=pct, key=self.key, description=description))

    def __call__(self, done: int, total: int) -> None:
        self.report(100.0 if total <= 0 else 100.0 * done / total)

    def report(self, pct: float, description: str | None = None, *, force: bool = False) -> None:
        """Set the percentage (and optionally the description); throttled unless ``force``."""
        from prefect.artifacts import update_progress_artifact

        pct = min(100.0, max(0.0, pct))
        now = time.monotonic()
        with self._lock:
            final = pct >= 100.0 and self._last_pct < 100.0
            if not (final or force) and (
                now - self._last_time < self.min_interval_s or pct - self._last_pct < self.min_step_pct
            ):
                return
            self._last_time = now
            self._last_pct = pct
            self.updates += 1
            if self.artifact_id is None:  # created under the lock: one artifact per key
                self.artifact_id = self._create(pct, description or self.description)
                return
            artifact_id = self.artifact_id
        update_progress_artifact(artifact_id, progress=pct, description=description)

    def part(self, index: int, parts: int) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for part ``index`` of ``parts`` equal parts of
        this artifact (one slide's outputs: each output's tiles move its share)."""

        def progress(done: int, total: int) -> None:
            share = 1.0 if total <= 0 else min(1.0, done / total)
            self.report(100.0 * (index + share) / parts)

        return progress
