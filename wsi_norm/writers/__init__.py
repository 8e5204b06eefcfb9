"""Pyramidal output writers: OME-Zarr and tiled BigTIFF, one pass, atomic, with provenance.

:func:`write_pyramid` is the entry point: it computes a lazy level-0 array once,
block by block (see :mod:`wsi_norm.pyramid`), and writes every pyramid level to
the chosen format through a ``.partial`` sibling that is renamed on success.

Examples
--------
>>> import dask.array as da, numpy as np
>>> from wsi_norm.writers import write_pyramid, read_level, read_provenance
>>> image = da.zeros((3000, 2000, 3), dtype=np.uint8, chunks=(1024, 1024, 3))
>>> out = write_pyramid(image, "/tmp/doc.ome.zarr", mpp=(0.5, 0.5),
...                     provenance={"method": "none"}, overwrite=True)
>>> read_level(out, 1).shape
(1500, 1000, 3)
>>> read_provenance(out)["method"]
'none'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from numpy.typing import NDArray

from ..errors import LevelError, OutputError
from ..pyramid import LazyLevel, pyramid_shapes
from .provenance import read_provenance, software_versions
from .tiff import write_tiff
from .zarr_codec import DEFAULT_ZARR_CODEC, ZarrCodec, parse_zarr_codec

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "DEFAULT_ZARR_CODEC",
    "OutputFormat",
    "WriterOptions",
    "ZarrCodec",
    "infer_format",
    "parse_zarr_codec",
    "pyramid_shapes",
    "read_level",
    "read_provenance",
    "software_versions",
    "write_pyramid",
]

OutputFormat = Literal["ome-zarr", "tiff"]

_LEGACY_ZARR_CODEC = "lz4:5"  # the only OME-Zarr codec before WriterOptions.zarr_codec

_SUFFIXES: tuple[tuple[str, OutputFormat], ...] = (
    (".zarr", "ome-zarr"),
    (".tif", "tiff"),
    (".tiff", "tiff"),
)


@dataclass(frozen=True)
class WriterOptions:
    """How an output is stored: one value from the command line or a manifest to the writer.

    Attributes
    ----------
    fmt : {"ome-zarr", "tiff"} or None
        Output format; None: from the output's suffix (:func:`infer_format`).
    tile_px : int
        TIFF tile side, a multiple of 16 (OpenSlide and QuPath read 256 and 512 best).
    quality : int
        TIFF JPEG quality, 1-100.
    compression : {"jpeg", "deflate"}
        TIFF tile compression (deflate is lossless).  OME-Zarr is always lossless.
    zarr_format : {3, 2}
        OME-Zarr on zarr v3 with NGFF 0.5, or zarr v2 with NGFF 0.4 for older viewers.
    zarr_codec : str
        OME-Zarr compression, lossless Blosc: ``"lz4:N"`` or ``"zstd:N"``, level N in 1..9
        (a bare ``"lz4"`` / ``"zstd"`` is level 5); kept in canonical form (``"zstd:5"``).
        Default :data:`DEFAULT_ZARR_CODEC`.  See :func:`parse_zarr_codec` for why there is
        no lossy choice.

    Raises
    ------
    ValueError
        An option out of range, naming it.
    TypeError
        ``zarr_codec`` is not a string.
    """

    fmt: OutputFormat | None = None
    tile_px: int = 256
    quality: int = 90
    compression: Literal["jpeg", "deflate"] = "jpeg"
    zarr_format: Literal[2, 3] = 3
    zarr_codec: str = DEFAULT_ZARR_CODEC

    def __post_init__(self) -> None:
        if self.fmt not in (None, "ome-zarr", "tiff"):
            raise ValueError(f"fmt must be 'ome-zarr', 'tiff' or None, got {self.fmt!r}")
        if not (isinstance(self.tile_px, int) and self.tile_px >= 16 and self.tile_px % 16 == 0):
            raise ValueError(f"tile_px must be a positive multiple of 16, got {self.tile_px!r}")
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise ValueError(f"quality must be an integer in 1..100, got {self.quality!r}")
        if self.compression not in ("jpeg", "deflate"):
            raise ValueError(f"compression must be 'jpeg' or 'deflate', got {self.compression!r}")
        if self.zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {self.zarr_format!r}")
        try:
            codec = parse_zarr_codec(self.zarr_codec)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"zarr_codec: {exc}") from None
        object.__setattr__(self, "zarr_codec", str(codec))  # canonical: "zstd" -> "zstd:5"

    def format_of(self, out: str | Path) -> OutputFormat:
        """The format ``out`` is written in: :attr:`fmt`, else from its suffix."""
        return self.fmt or infer_format(out)

    def record(self, out: str | Path) -> dict[str, Any]:
        """The options that decide ``out``'s stored bytes (for fingerprints): the format and,
        per format, only what it uses.

        The OME-Zarr codec is recorded only when it is not ``"lz4:5"``, the one codec of
        outputs written before the option existed, so those stay current."""
        fmt = self.format_of(out)
        if fmt == "ome-zarr":
            rec_zarr: dict[str, Any] = {"format": fmt, "zarr_format": self.zarr_format}
            if self.zarr_codec != _LEGACY_ZARR_CODEC:
                rec_zarr["zarr_codec"] = self.zarr_codec
            return rec_zarr
        rec: dict[str, Any] = {"format": fmt, "tile_px": self.tile_px, "compression": self.compression}
        if self.compression == "jpeg":
            rec["quality"] = self.quality
        return rec

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`write_pyramid`."""
        return {
            "fmt": self.fmt,
            "tile_px": self.tile_px,
            "quality": self.quality,
            "compression": self.compression,
            "zarr_format": self.zarr_format,
            "zarr_codec": self.zarr_codec,
        }


def infer_format(out: str | Path) -> OutputFormat:
    """Return the output format named by a path's suffix.

    ``*.ome.zarr`` / ``*.zarr`` give ``"ome-zarr"``; ``*.tif`` / ``*.tiff``
    (any case) give ``"tiff"``.

    Raises
    ------
    ValueError
        Any other suffix.
    """
    name = Path(out).name.lower()
    for suffix, fmt in _SUFFIXES:
        if name.endswith(suffix):
            return fmt
    raise ValueError(
        f"{out}: cannot tell the output format from the suffix; use .ome.zarr, .zarr, .tif or .tiff, or pass fmt"
    )


def write_pyramid(
    array: da.Array | NDArray[np.uint8] | LazyLevel,
    out: str | Path,
    *,
    mpp: tuple[float, float] | None,
    provenance: Mapping[str, Any],
    fmt: OutputFormat | None = None,
    overwrite: bool = False,
    tile_px: int = 256,
    chunk_px: int | None = None,
    quality: int = 90,
    compression: str = "jpeg",
    zarr_format: int = 3,
    zarr_codec: str | ZarrCodec = DEFAULT_ZARR_CODEC,
    progress: Callable[[int, int], None] | None = None,
    chunk_shape: tuple[int, int] | None = None,
    icc_profile: bytes | None = None,
) -> Path:
    """Write an RGB image and its 2x2-mean pyramid to OME-Zarr or pyramidal TIFF.

    Every level-0 chunk of ``array`` is computed exactly once, block by block
    (a few chunks of one band at a time, two blocks computing ahead), using the
    active ``distributed`` client if there is one and dask's threaded scheduler
    otherwise (a :class:`~wsi_norm.pyramid.LazyLevel`: this process's threads).  Lower levels are spilled to raw files beside ``out`` while level
    0 streams, so memory stays flat as the slide grows (disk: a third of level
    0's uncompressed size, freed when done).

    Parameters
    ----------
    array : dask.array.Array, numpy.ndarray or LazyLevel, (H, W, 3) uint8
        Level 0 (for example a normalised slide).  It is computed a few of its
        chunks at a time; a numpy array is wrapped in ``chunk_px`` (1024) chunks; a
        :class:`~wsi_norm.pyramid.LazyLevel` computes its blocks on this process's threads.
    out : str or Path
        Output path.  Written as ``OUT.partial`` and renamed when complete.
    mpp : (mpp_x, mpp_y) or None
        Level-0 pixel size in micrometres per pixel, x (columns) first, as
        OpenSlide's ``openslide.mpp-x``/``-y``.  None: the source had none.
    provenance : mapping
        JSON-serialisable description of the run (method, parameters, fitted
        statistics, template, source identity).  Stored with software versions
        and creation time; see :func:`read_provenance`.
    fmt : {"ome-zarr", "tiff"}, optional
        Output format; by default inferred from the suffix of ``out``.
    overwrite : bool, optional
        Replace an existing ``out`` (otherwise :class:`OutputExistsError`).
    tile_px : int, optional
        TIFF tile side (256 or 512).
    chunk_px : int, optional
        OME-Zarr chunk side; by default the array's own regular chunk side
        (a multiple of 16 in 256..4096), else 1024.
    quality : int, optional
        TIFF JPEG quality (1-100).
    compression : {"jpeg", "deflate"}, optional
        TIFF tile compression; deflate is lossless.  OME-Zarr is always
        lossless (``zarr_codec``).
    zarr_format : {3, 2}, optional
        OME-Zarr on zarr v3 with NGFF 0.5 (default), or zarr v2 with NGFF 0.4.
    zarr_codec : str, optional
        OME-Zarr Blosc compression, ``"lz4:N"`` or ``"zstd:N"`` (N in 1..9); default
        :data:`DEFAULT_ZARR_CODEC`.  Checked for every format, used by OME-Zarr.
    progress : callable ``(done_chunks, total_chunks)``, optional
        Called from the calling thread as level-0 chunks complete.
    chunk_shape : (rows, cols), optional
        A numpy ``array``'s processing chunks for a TIFF (blocks group them, progress counts
        them; the file is the same); default ``chunk_px`` (1024) square.
    icc_profile : bytes, optional
        ICC profile of the pixels, embedded in a TIFF's level 0 (InterColorProfile); NGFF has
        no place for one, so an OME-Zarr carries none.

    Returns
    -------
    Path
        The finished output.

    Raises
    ------
    OutputExistsError
        ``out`` exists and ``overwrite`` is false.
    OutputError
        The output could not be written (folder not writable, disk full, an
        error while computing or encoding); nothing is left at ``out``.
    ValueError, TypeError
        ``array`` is not ``(H, W, 3)`` uint8, or an option is invalid.

    Notes
    -----
    A killed OME-Zarr run resumes from its last finished band of blocks of level 0
    when called again with the same array shape and chunks, MPP, options and
    provenance.
    """
    out = Path(out)
    fmt = infer_format(out) if fmt is None else fmt
    if not isinstance(array, np.ndarray | LazyLevel):
        import dask.array as da  # a numpy or lazy level 0 written as TIFF never imports it

        if not isinstance(array, da.Array):
            raise TypeError(f"array must be a dask or numpy array or a LazyLevel, got {type(array).__name__}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"array must have shape (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        raise TypeError(f"array must be uint8, got {array.dtype}")
    if 0 in array.shape:
        raise ValueError(f"array is empty: shape {array.shape}")
    if mpp is not None and not (len(mpp) == 2 and all(float(v) > 0 for v in mpp)):
        raise ValueError(f"mpp must be two positive numbers (mpp_x, mpp_y) or None, got {mpp!r}")
    try:
        codec = parse_zarr_codec(zarr_codec)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"zarr_codec: {exc}") from None
    if fmt == "ome-zarr":
        from .ome_zarr import write_ome_zarr  # zarr only when an OME-Zarr is written

        lazy: da.Array | LazyLevel
        if isinstance(array, np.ndarray):
            import dask.array as da

            side = chunk_px or 1024
            lazy = da.from_array(array, chunks=(side, side, 3))  # type: ignore[no-untyped-call]
        else:
            lazy = array
        return write_ome_zarr(
            lazy,
            out,
            mpp=mpp,
            provenance=provenance,
            overwrite=overwrite,
            chunk_px=chunk_px,
            zarr_format=zarr_format,
            zarr_codec=codec,
            progress=progress,
        )
    if fmt == "tiff":
        return write_tiff(
            array,
            out,
            mpp=mpp,
            provenance=provenance,
            overwrite=overwrite,
            tile_px=tile_px,
            quality=quality,
            compression=compression,
            progress=progress,
            chunk_shape=chunk_shape or ((chunk_px, chunk_px) if chunk_px else None),
            icc_profile=icc_profile,
        )
    raise ValueError(f"{out}: unknown output format {fmt!r}; use 'ome-zarr' or 'tiff'")


def read_level(path: str | Path, level: int) -> NDArray[np.uint8]:
    """Read one pyramid level of an output written by :func:`write_pyramid`.

    Parameters
    ----------
    path : str or Path
        OME-Zarr folder or TIFF file.
    level : int
        0 is full resolution.

    Returns
    -------
    (rows, cols, 3) uint8
        The level, whole, in memory (meant for tests and thumbnails).

    Raises
    ------
    LevelError
        The output has no such level.
    OutputError
        ``path`` cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise OutputError(f"{path}: no such output")
    if path.is_dir():
        import zarr

        try:
            group = zarr.open_group(path, mode="r")
            keys = sorted(group.array_keys(), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        except (OSError, ValueError, KeyError) as exc:
            raise OutputError(f"{path}: cannot open zarr group: {exc}") from exc
        if str(level) not in keys:  # also a level missing from the middle (a deleted "1/")
            raise LevelError(
                f"{path}: level {level} requested, output has level(s) {', '.join(keys) or 'none'}"
            )
        data = np.asarray(cast(Any, group[str(level)])[...])
        return np.ascontiguousarray(data.transpose(1, 2, 0))
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            levels = tif.series[0].levels
            if not 0 <= level < len(levels):
                raise LevelError(f"{path}: level {level} requested, output has {len(levels)}")
            return np.asarray(levels[level].asarray())
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise OutputError(f"{path}: cannot read TIFF: {exc}") from exc
