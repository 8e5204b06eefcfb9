"""OME-Zarr compression settings: which lossless Blosc codec, parsed and checked.

Kept apart from :mod:`wsi_norm.writers.ome_zarr` so that parsing an option (the command line,
a manifest, :class:`~wsi_norm.writers.WriterOptions`) does not import zarr (about 0.4 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

if TYPE_CHECKING:
    from zarr.codecs import BloscCodec

__all__ = ["DEFAULT_ZARR_CODEC", "ZARR_CODEC_NAMES", "ZarrCodec", "parse_zarr_codec"]

ZARR_CODEC_NAMES: Final = ("lz4", "zstd")
"""Blosc compressors an OME-Zarr output may use (``zarr_codec`` is ``NAME`` or ``NAME:LEVEL``)."""

_DEFAULT_LEVEL: Final = 5

DEFAULT_ZARR_CODEC: Final = "lz4:5"
"""The default OME-Zarr compression (chosen by ``bench/bench_zarr_codecs.py``, see BENCHMARKS.md)."""


@dataclass(frozen=True)
class ZarrCodec:
    """A lossless Blosc compressor for OME-Zarr chunks.

    Attributes
    ----------
    cname : {"lz4", "zstd"}
        Blosc's inner compressor.
    clevel : int
        Compression level, 1 (fastest) to 9 (smallest).
    """

    cname: Literal["lz4", "zstd"]
    clevel: int

    def __post_init__(self) -> None:
        if self.cname not in ZARR_CODEC_NAMES:
            raise ValueError(f"zarr codec must be one of {', '.join(ZARR_CODEC_NAMES)}, got {self.cname!r}")
        if not (isinstance(self.clevel, int) and not isinstance(self.clevel, bool) and 1 <= self.clevel <= 9):
            raise ValueError(f"zarr codec level must be an integer in 1..9, got {self.clevel!r}")

    def __str__(self) -> str:
        return f"{self.cname}:{self.clevel}"

    def v3(self) -> BloscCodec:
        """The zarr v3 ``blosc`` codec."""
        from zarr.codecs import BloscCodec

        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle="noshuffle", typesize=1)

    def v2(self) -> Any:
        """The numcodecs ``Blosc`` compressor of a zarr v2 array."""
        from numcodecs import Blosc

        return Blosc(cname=self.cname, clevel=self.clevel, shuffle=Blosc.NOSHUFFLE)


def parse_zarr_codec(value: str | ZarrCodec) -> ZarrCodec:
    """Parse an OME-Zarr compression setting: ``"lz4"``, ``"zstd"``, ``"lz4:N"`` or ``"zstd:N"``.

    Parameters
    ----------
    value : str or ZarrCodec
        A Blosc compressor name (:data:`ZARR_CODEC_NAMES`), optionally with ``:LEVEL``,
        1 (fastest) to 9 (smallest); a bare name takes level 5.  Case and surrounding
        spaces are ignored.

    Returns
    -------
    ZarrCodec

    Raises
    ------
    ValueError
        Not of that form; the message names the value and what is allowed.
    TypeError
        Not a string.

    Examples
    --------
    >>> str(parse_zarr_codec("zstd:3")), str(parse_zarr_codec("LZ4"))
    ('zstd:3', 'lz4:5')
    """
    if isinstance(value, ZarrCodec):
        return value
    allowed = "lz4 or zstd, optionally with a level 1..9 (e.g. 'zstd:5'); lossless Blosc, no lossy codec"
    if not isinstance(value, str):
        raise TypeError(f"zarr codec must be a string, {allowed}; got {value!r}")
    name, sep, level_text = value.strip().lower().partition(":")
    if name not in ZARR_CODEC_NAMES:
        raise ValueError(f"unknown zarr codec {value!r}: use {allowed}")
    level = _DEFAULT_LEVEL
    if sep:
        if not (level_text.isascii() and level_text.isdigit() and 1 <= int(level_text) <= 9):
            raise ValueError(f"zarr codec {value!r}: the level must be an integer in 1..9")
        level = int(level_text)
    return ZarrCodec(cast(Literal["lz4", "zstd"], name), level)
