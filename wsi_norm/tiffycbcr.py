"""TIFF tiles whose decoder returns YCbCr: turned into RGB as OpenSlide turns them.

tifffile (and so tiffslide) returns the samples a codec decodes. For JPEG that is RGB (libjpeg
converts), but two layouts come back as Y, Cb, Cr planes, which OpenSlide converts and which
the tiffslide path therefore read as wrong colours:

* **Aperio's JPEG 2000, compression 33003.** Aperio stores JPEG 2000 tiles under two private
  compressions (OpenSlide's Aperio format notes): 33005 is RGB coded with JPEG 2000's own
  multi-component transform, which the decoder undoes, and 33003 is YCbCr coded *without* it.
  OpenSlide's Aperio driver converts 33003 itself (:func:`ycbcr_to_rgb`: its arithmetic,
  measured against OpenSlide 4.0.1 over all 256³ triples: the same RGB for every one). When
  the chroma is subsampled (Aperio's 4:2:2, which OpenSlide's notes allow), openjpeg takes the
  three-component codestream for sYCC and returns RGB itself (chroma repeated, its own
  rounding: within a level of OpenSlide), so nothing is converted again;
  :func:`j2k_subsampled` tells the two apart from the codestream's SIZ marker. On a crop of the
  sample slide coded this way, the planes read as RGB were 75 levels off on average.
* **PhotometricInterpretation YCbCr with a lossless codec** (none, LZW, deflate, PackBits, LZMA,
  Zstandard): OpenSlide reads it through libtiff's RGBA interface, which converts with the
  file's ``YCbCrCoefficients`` and ``ReferenceBlackWhite``; :class:`LibtiffYCbCr` is that
  conversion (libtiff's fixed-point tables, ``TIFFYCbCrToRGBInit``, rebuilt: the same RGB as
  OpenSlide for all 256³ triples with the default tags).

The conversions are per pixel, so a region is converted as its tiles would be.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["APERIO_J2K_YCBCR", "RAW_SAMPLE_CODECS", "LibtiffYCbCr", "j2k_subsampled", "ycbcr_to_rgb"]

#: TIFF compression of Aperio's JPEG 2000 tiles with YCbCr components and no colour transform.
APERIO_J2K_YCBCR = 33003
#: TIFF compressions whose decoder returns the stored samples unchanged (lossless byte codecs):
#: none, LZW, Adobe deflate, deflate, PackBits, LZMA, Zstandard.
RAW_SAMPLE_CODECS = frozenset({1, 5, 8, 32946, 32773, 34925, 50000})

_SHIFT = 16
_HALF = 1 << (_SHIFT - 1)
_CHROMA = np.arange(256, dtype=np.int64) - 128
# OpenSlide's JPEG 2000 tables (found by comparing with it over every YCbCr triple): red and blue
# as libjpeg's jdcolor.c rounds them, green from two 16-bit fixed-point terms summed, then rounded.
_R_CR = ((int(1.40200 * (1 << _SHIFT) + 0.5) * _CHROMA + _HALF) >> _SHIFT).astype(np.int16)
_B_CB = ((int(1.77200 * (1 << _SHIFT) + 0.5) * _CHROMA + _HALF) >> _SHIFT).astype(np.int16)
_G_CB = (np.rint(-0.34414 * (1 << _SHIFT) * _CHROMA) + _HALF).astype(np.int32)
_G_CR = np.rint(-0.71414 * (1 << _SHIFT) * _CHROMA).astype(np.int32)


def _check(ycc: NDArray[np.uint8]) -> NDArray[np.uint8]:
    ycc = np.asarray(ycc)
    if ycc.dtype != np.uint8 or ycc.shape[-1:] != (3,):
        raise ValueError(f"expected (..., 3) uint8 YCbCr, got {ycc.dtype} of shape {ycc.shape}")
    return ycc


def _combine(y: NDArray[np.integer], r_cr: NDArray[np.integer], g: NDArray[np.integer],
             b_cb: NDArray[np.integer], shape: tuple[int, ...]) -> NDArray[np.uint8]:
    out = np.empty(shape, np.uint8)
    out[..., 0] = np.clip(y + r_cr, 0, 255)
    out[..., 1] = np.clip(y + g, 0, 255)
    out[..., 2] = np.clip(y + b_cb, 0, 255)
    return out


def ycbcr_to_rgb(ycc: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Full-range (JPEG) YCbCr to RGB, with the arithmetic of OpenSlide's JPEG 2000 decoding.

    Parameters
    ----------
    ycc : (..., 3) uint8
        Y, Cb, Cr.

    Returns
    -------
    (..., 3) uint8
        ``R = Y + 1.402 (Cr - 128)``, ``G = Y - 0.34414 (Cb - 128) - 0.71414 (Cr - 128)``,
        ``B = Y + 1.772 (Cb - 128)``, rounded and clipped as OpenSlide does.
    """
    ycc = _check(ycc)
    cb, cr = ycc[..., 1], ycc[..., 2]
    return _combine(ycc[..., 0].astype(np.int16), _R_CR[cr], (_G_CB[cb] + _G_CR[cr]) >> _SHIFT,
                    _B_CB[cb], ycc.shape)


@dataclass(frozen=True)
class LibtiffYCbCr:
    """libtiff's YCbCr to RGB conversion for a page's ``YCbCrCoefficients`` (luma weights of R,
    G, B) and ``ReferenceBlackWhite`` (the code values of black and white for Y, Cb, Cr).

    libtiff computes in single precision and fixed point (``TIFFYCbCrToRGBInit``); the tables
    here repeat its steps (float32 products, truncating casts) so the result is its own.
    """

    luma: tuple[float, ...] = (0.299, 0.587, 0.114)
    reference: tuple[float, ...] = (0.0, 255.0, 128.0, 255.0, 128.0, 255.0)
    _tables: tuple[NDArray[np.int64], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.luma) != 3 or len(self.reference) != 6:
            raise ValueError(f"YCbCrCoefficients takes 3 values and ReferenceBlackWhite 6, got "
                             f"{len(self.luma)} and {len(self.reference)}")
        f32 = np.float32
        red, green, blue = (f32(v) for v in self.luma)
        if not green > 0:
            raise ValueError(f"YCbCrCoefficients {self.luma}: the green weight must be positive")
        f1 = f32(2) - f32(2) * red
        f3 = f32(2) - f32(2) * blue
        d1, d2 = self._fix(f1), -self._fix(red * f1 / green)
        d3, d4 = self._fix(f3), -self._fix(blue * f3 / green)
        ref = [f32(v) for v in self.reference]
        x = _CHROMA.astype(np.float32)
        cr = self._code(x, ref[4] - f32(128), ref[5] - f32(128), 127)
        cb = self._code(x, ref[2] - f32(128), ref[3] - f32(128), 127)
        y = self._code(x + f32(128), ref[0], ref[1], 255)
        object.__setattr__(self, "_tables", (
            y, (d1 * cr + _HALF) >> _SHIFT, (d3 * cb + _HALF) >> _SHIFT, d2 * cr, d4 * cb + _HALF,
        ))

    @staticmethod
    def _fix(v: np.float32) -> int:
        return int(np.float64(np.float32(np.clip(v, 0, 2)) * np.float32(1 << _SHIFT)) + 0.5)

    @staticmethod
    def _code(c: NDArray[np.float32], black: np.float32, white: np.float32, span: int) -> NDArray[np.int64]:
        """libtiff's ``Code2V``, clamped to +-4096 and truncated to an integer."""
        width = white - black if white - black != 0 else np.float32(1)
        v = ((c - np.float32(int(black))) * np.float32(span)) / width
        out: NDArray[np.int64] = np.clip(v, -128.0 * 32, 128.0 * 32).astype(np.int64)
        return out

    def __call__(self, ycc: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """(..., 3) uint8 YCbCr to RGB."""
        ycc = _check(ycc)
        y_tab, r_cr, b_cb, g_cr, g_cb = self._tables
        cb, cr = ycc[..., 1], ycc[..., 2]
        return _combine(y_tab[ycc[..., 0]], r_cr[cr], (g_cb[cb] + g_cr[cr]) >> _SHIFT, b_cb[cb], ycc.shape)


def j2k_subsampled(data: bytes) -> bool | None:
    """Whether a JPEG 2000 codestream samples any component below full resolution.

    Reads the SIZ marker, which follows the start-of-codestream marker (in a raw codestream or
    inside a JP2 file's codestream box). ``None`` when there is none to read.
    """
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0:
        return None
    # SOC, SIZ marker, Lsiz, Rsiz, Xsiz ... YTOsiz (8 x 4 bytes), then Csiz and 3 bytes a component
    csiz = at + 2 + 2 + 2 + 2 + 32
    if len(data) < csiz + 2:
        return None
    n = int.from_bytes(data[csiz : csiz + 2], "big")
    comps = data[csiz + 2 : csiz + 2 + 3 * n]
    if n == 0 or len(comps) < 3 * n:
        return None
    return any(comps[3 * i + 1] != 1 or comps[3 * i + 2] != 1 for i in range(n))


def first_tile_subsampled(fd: int, offsets: Sequence[int], counts: Sequence[int]) -> bool | None:
    """:func:`j2k_subsampled` of a level's first tile that holds bytes (``None``: no such tile
    or no SIZ marker in it). Aperio codes every tile of a level alike."""
    for offset, count in zip(offsets, counts, strict=False):
        if count:
            return j2k_subsampled(os.pread(fd, min(int(count), 4096), int(offset)))
    return None
