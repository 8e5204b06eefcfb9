"""Aperio's JPEG 2000 tiles on the tiffslide path: YCbCr components turned into OpenSlide's RGB.

Aperio SVS files store JPEG 2000 tiles under two private TIFF compressions (OpenSlide's Aperio
format notes): **33005** is RGB coded with JPEG 2000's own multi-component transform, which the
decoder undoes, and **33003** is YCbCr coded *without* it, so the decoder returns the Y, Cb, Cr
planes as they are and the reader must convert them. OpenSlide's Aperio driver does; tifffile
(and so tiffslide) hands every JPEG 2000 tile to ``imagecodecs.jpeg2k_decode`` alike, so a
33003 slide read through tiffslide came back as YCbCr taken for RGB (on a crop of the sample
slide re-coded this way: 75 levels off on average, 195 at most).

Two cases, told apart by the codestream's SIZ marker (the components' sampling factors):

* chroma at full resolution (4:4:4): openjpeg leaves the planes alone, and
  :func:`ycbcr_to_rgb` converts them with OpenSlide's own integer arithmetic (measured
  against OpenSlide 4.0.1 over all 256³ YCbCr triples: the same RGB for every one);
* chroma subsampled (Aperio's 4:2:2, which OpenSlide's notes allow): openjpeg itself takes such a
  three-component codestream for sYCC and returns RGB (chroma repeated, its own rounding), so
  nothing is converted again. Its RGB is within a level or two of OpenSlide's, which upsamples
  and converts in its own way.

Regions are converted after decoding (the conversion is per pixel, so a region is converted
as its tiles would be).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["APERIO_J2K_YCBCR", "j2k_subsampled", "ycbcr_to_rgb"]

#: TIFF compression of Aperio's JPEG 2000 tiles with YCbCr components and no colour transform.
APERIO_J2K_YCBCR = 33003

_SCALE = 1 << 16
_CHROMA = np.arange(256, dtype=np.int64) - 128
# OpenSlide's tables (found by comparing with it over every YCbCr triple): red and blue as
# libjpeg's jdcolor.c rounds them, green from two 16-bit fixed-point terms summed, then rounded.
_R_CR = ((int(1.40200 * _SCALE + 0.5) * _CHROMA + _SCALE // 2) >> 16).astype(np.int16)
_B_CB = ((int(1.77200 * _SCALE + 0.5) * _CHROMA + _SCALE // 2) >> 16).astype(np.int16)
_G_CB = (np.rint(-0.34414 * _SCALE * _CHROMA) + _SCALE // 2).astype(np.int32)
_G_CR = np.rint(-0.71414 * _SCALE * _CHROMA).astype(np.int32)


def ycbcr_to_rgb(ycc: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Full-range (JPEG) YCbCr to RGB, with OpenSlide's integer arithmetic.

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
    ycc = np.asarray(ycc)
    if ycc.dtype != np.uint8 or ycc.shape[-1:] != (3,):
        raise ValueError(f"expected (..., 3) uint8 YCbCr, got {ycc.dtype} of shape {ycc.shape}")
    y = ycc[..., 0].astype(np.int16)
    cb, cr = ycc[..., 1], ycc[..., 2]
    out = np.empty(ycc.shape, np.uint8)
    out[..., 0] = np.clip(y + _R_CR[cr], 0, 255)
    out[..., 1] = np.clip(y + ((_G_CB[cb] + _G_CR[cr]) >> 16), 0, 255)
    out[..., 2] = np.clip(y + _B_CB[cb], 0, 255)
    return out


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
