"""Synthetic whole-slide images with known stain vectors, rendered by the Beer-Lambert law.

A synthetic slide is a deterministic function of a few parameters (size, seed, stain matrix,
background intensity, tissue fraction, stain intensity): hematoxylin and eosin concentration
maps are assembled from a bank of concentration patches unmixed from real H&E images (or drawn
procedurally when those are missing), placed in irregular tissue regions, and rendered as

    I = io * exp(-(C @ M))

with ``C`` the (H, W, 2) concentrations, ``M`` the (2, 3) unit optical-density vectors
(row 0 hematoxylin, row 1 eosin) and ``io`` the glass intensity, one value or one per channel
(a scanner's tinted white point). Because every region can be recomputed from the parameters,
tests get the ground truth (stain vectors, concentrations, pixels) of any region of a gigapixel
slide without reading it back, and registered pairs (same tissue, other stains) for free.

:func:`generate_slide` streams a slide into a tiled pyramidal BigTIFF that OpenSlide (as a
generic TIFF) and tiffslide open with levels and MPP; it never holds a level in memory and
encodes glass tiles once. :func:`render_region` and :func:`concentrations` give the truth of a
region; :func:`render_beer_lambert` and :func:`unmix_ruifrok` are the pure per-pixel maps.

References
----------
Ruifrok AC, Johnston DA. Quantification of histochemical staining by color deconvolution.
Anal Quant Cytol Histol 23(4):291-299, 2001.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_norm.errors import OutputError, OutputExistsError, SlideOpenError
from wsi_norm.testing import texture as _texture
from wsi_norm.testing.data import DATA_ENV, data_dir

__all__ = [
    "RUIFROK_HE",
    "SITE_STAINS",
    "SyntheticParams",
    "SyntheticTruth",
    "clear_caches",
    "concentrations",
    "generate_slide",
    "level_dimensions",
    "read_truth",
    "render_beer_lambert",
    "render_region",
    "rotate_stain_matrix",
    "unmix_ruifrok",
]

_log = logging.getLogger(__name__)

TextureKind = Literal["real", "procedural"]
Compression = Literal["jpeg", "deflate"]


def _unit_rows(matrix: ArrayLike) -> NDArray[np.float64]:
    m = np.asarray(matrix, dtype=np.float64)
    unit: NDArray[np.float64] = m / np.linalg.norm(m, axis=1, keepdims=True)
    return unit


from wsi_norm.stain.base import RUIFROK_HE


def _rotate_toward(
    vector: NDArray[np.float64], toward: ArrayLike, deg: float
) -> NDArray[np.float64]:
    """Rotate a unit vector by ``deg`` degrees in the plane it spans with ``toward``."""
    axis = np.asarray(toward, dtype=np.float64)
    perp = axis - (axis @ vector) * vector
    perp /= np.linalg.norm(perp)
    rad = math.radians(deg)
    return math.cos(rad) * vector + math.sin(rad) * perp


def _preset(
    h_deg: float, h_toward: Sequence[float], e_deg: float, e_toward: Sequence[float]
) -> NDArray[np.float64]:
    m = np.stack(
        [
            _rotate_toward(RUIFROK_HE[0], h_toward, h_deg),
            _rotate_toward(RUIFROK_HE[1], e_toward, e_deg),
        ]
    )
    m.setflags(write=False)
    return m


SITE_STAINS: dict[str, NDArray[np.float64]] = {
    "site-a": RUIFROK_HE,
    # eosin turned 10 degrees toward blue: its red OD stays small (0.069), the case where
    # Macenko's per-component beta rule drops pure-eosin pixels
    "site-b": _preset(5.0, (1.0, 0.0, 0.0), 10.0, (0.0, 0.0, 1.0)),
    # hematoxylin 6 degrees toward blue, eosin 6 degrees toward red
    "site-c": _preset(6.0, (0.0, 0.0, 1.0), 6.0, (1.0, 0.0, 0.0)),
}
"""Named (2, 3) stain matrices of three simulated sites; "site-a" is :data:`RUIFROK_HE`."""
SITE_STAINS["ruifrok"] = RUIFROK_HE


def _check_stain_matrix(stain_matrix: ArrayLike) -> NDArray[np.float64]:
    m = np.asarray(stain_matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"stain_matrix must have shape (2, 3), got {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"stain_matrix must hold finite optical densities >= 0, got {m.tolist()}")
    norms = np.linalg.norm(m, axis=1)
    if np.any(norms == 0):
        raise ValueError("stain_matrix has a zero row")
    if np.all(np.abs(norms - 1.0) <= 4 * np.finfo(np.float64).eps):
        return m.copy()  # already unit: keep it bit for bit (registered pairs compare exactly)
    unit: NDArray[np.float64] = m / norms[:, None]
    return unit


def rotate_stain_matrix(
    stain_matrix: ArrayLike, h_deg: float, e_deg: float, *, seed: int = 0
) -> NDArray[np.float64]:
    """Turn each stain vector by an exact angle in a random direction.

    Parameters
    ----------
    stain_matrix : (2, 3) array_like
        OD vectors, row 0 hematoxylin, row 1 eosin (normalised to unit length here).
    h_deg, e_deg : float
        Angle between the input and the output hematoxylin / eosin vector, degrees (0 to 90).
    seed : int
        Seed of the random directions.

    Returns
    -------
    (2, 3) float64
        Unit OD vectors with all components >= 0 (directions that would make one negative
        are redrawn).

    Raises
    ------
    ValueError
        Bad shape, or no direction keeps the vector non-negative (a very large angle).

    Examples
    --------
    >>> m = rotate_stain_matrix(RUIFROK_HE, 3.0, 8.0, seed=1)
    >>> round(float(np.degrees(np.arccos(m[1] @ RUIFROK_HE[1]))), 6)
    8.0
    """
    m = _check_stain_matrix(stain_matrix)
    rng = np.random.default_rng(seed)
    out = np.empty_like(m)
    for row, deg in enumerate((h_deg, e_deg)):
        if not 0.0 <= deg <= 90.0:
            raise ValueError(f"rotation angle must be within 0..90 degrees, got {deg}")
        for _ in range(1000):
            candidate = _rotate_toward(m[row], rng.standard_normal(3), deg)
            if np.all(candidate >= 0):
                out[row] = candidate
                break
        else:
            raise ValueError(
                f"no non-negative direction for a {deg} degree turn of {m[row].tolist()}"
            )
    return out


def _io_channels(io: float | ArrayLike) -> tuple[float, float, float]:
    """Glass intensity as three floats in (0, 255] (one value is used for every channel)."""
    values = np.broadcast_to(np.asarray(io, dtype=np.float64), (3,))
    if not np.all(np.isfinite(values)) or np.any(values <= 0.0) or np.any(values > 255.0):
        raise ValueError(f"io must be within (0, 255] (one value or three), got {np.asarray(io).tolist()}")
    return float(values[0]), float(values[1]), float(values[2])


def render_beer_lambert(
    conc: ArrayLike, stain_matrix: ArrayLike, *, io: float | ArrayLike = 240.0
) -> NDArray[np.uint8]:
    """Render stain concentrations to 8-bit RGB by the Beer-Lambert law.

    Parameters
    ----------
    conc : (..., 2) array_like of float
        Hematoxylin and eosin concentrations (OD units along the unit stain vectors), >= 0.
    stain_matrix : (2, 3) array_like
        OD vectors, row 0 hematoxylin, row 1 eosin; normalised to unit length here.
    io : float or (3,) array_like
        Transmitted intensity of glass, 0 < io <= 255, one value or one per channel (R, G, B).

    Returns
    -------
    (..., 3) uint8
        ``round(io * exp(-(conc @ stain_matrix)))`` clipped to 0..255; zero concentration gives
        ``round(io)``.

    Examples
    --------
    >>> render_beer_lambert(np.zeros((1, 2)), RUIFROK_HE).tolist()
    [[240, 240, 240]]
    """
    m = _check_stain_matrix(stain_matrix)
    c = np.asarray(conc, dtype=np.float32)
    if c.shape[-1:] != (2,):
        raise ValueError(f"conc must have shape (..., 2), got {c.shape}")
    return _render_planes(c[..., 0], c[..., 1], m, _io_channels(io))


def _render_planes(
    hema: NDArray[np.float32],
    eosin: NDArray[np.float32],
    stain_matrix: NDArray[np.float64],
    io: tuple[float, float, float],
) -> NDArray[np.uint8]:
    """Beer-Lambert on separate H and E planes of any shape S; returns S + (3,) uint8."""
    out = np.empty((*hema.shape, 3), np.uint8)
    od = np.empty(hema.shape, np.float32)
    part = np.empty(hema.shape, np.float32)
    for channel in range(3):
        np.multiply(hema, np.float32(-stain_matrix[0, channel]), out=od)
        np.multiply(eosin, np.float32(-stain_matrix[1, channel]), out=part)
        od += part
        np.exp(od, out=od)
        od *= np.float32(io[channel])
        np.rint(od, out=od)
        np.clip(od, 0.0, 255.0, out=od)
        out[..., channel] = od
    return out


def unmix_ruifrok(
    rgb: ArrayLike, *, io: float | ArrayLike = 240.0, stain_matrix: ArrayLike = RUIFROK_HE
) -> NDArray[np.float32]:
    """Unmix RGB into hematoxylin and eosin concentrations (colour deconvolution).

    Parameters
    ----------
    rgb : (..., 3) array_like of uint8 (or float, 0..255)
        Transmitted intensities.
    io : float or (3,) array_like
        Intensity of glass, per channel if an array.
    stain_matrix : (2, 3) array_like
        OD vectors to unmix with; Ruifrok & Johnston's H and E by default.

    Returns
    -------
    (..., 2) float32
        Least-squares concentrations ``OD @ pinv(stain_matrix)`` clipped at 0, with
        ``OD = -ln(max(rgb, 1) / io)`` clipped at 0.

    Notes
    -----
    Inverts :func:`render_beer_lambert` up to 8-bit rounding where the rendered pixel is not
    saturated: ``unmix_ruifrok(render_beer_lambert(c, m, io=io), io=io, stain_matrix=m) ~ c``.
    """
    m = _check_stain_matrix(stain_matrix)
    values = np.asarray(rgb, dtype=np.float32)
    if values.shape[-1:] != (3,):
        raise ValueError(f"rgb must have shape (..., 3), got {values.shape}")
    background = np.broadcast_to(np.asarray(io, dtype=np.float32), (3,))
    if np.any(background <= 0):
        raise ValueError(f"io must be > 0, got {io!r}")
    od = -np.log(np.maximum(values, 1.0) / background)
    np.clip(od, 0.0, None, out=od)
    conc = od @ np.linalg.pinv(m).astype(np.float32)
    return np.clip(conc, 0.0, None, out=conc)


def level_dimensions(
    width: int, height: int, *, min_level_px: int = 1024
) -> tuple[tuple[int, int], ...]:
    """(width, height) of each pyramid level: halved (rounding up) until both are <= ``min_level_px``."""
    dims = [(int(width), int(height))]
    while max(dims[-1]) > min_level_px:
        w, h = dims[-1]
        dims.append((-(-w // 2), -(-h // 2)))
    return tuple(dims)


@dataclass(frozen=True, eq=False)
class SyntheticParams:
    """Everything that determines a synthetic slide's pixels (no file, no encoding).

    Attributes
    ----------
    width, height : int
        Level-0 size, px.
    seed : int
        Seed of the tissue shape and texture layout.
    stain_matrix : (2, 3) float64
        Unit OD vectors, row 0 hematoxylin, row 1 eosin.
    io : (float, float, float)
        Glass intensity per channel (R, G, B), 0..255; one number is used for every channel.
    tissue_fraction : float
        Fraction of the slide area inside tissue regions, 0..1.
    conc_scale : (float, float)
        Factors on the H and E concentrations (stain intensity of a site).
    texture : {"real", "procedural"}
        Texture bank: "real" (default) unmixes the real H&E images of the project's data folder
        (:func:`wsi_norm.testing.data.data_dir`; an error where they are missing, so one seed
        gives one slide on every machine); "procedural" needs no data.
    """

    width: int
    height: int
    seed: int = 0
    stain_matrix: NDArray[np.float64] = field(default_factory=lambda: RUIFROK_HE)
    io: float | tuple[float, float, float] = 240.0
    tissue_fraction: float = 0.4
    conc_scale: tuple[float, float] = (1.0, 1.0)
    texture: TextureKind = "real"

    def __post_init__(self) -> None:
        if int(self.width) < 1 or int(self.height) < 1:
            raise ValueError(f"slide size must be >= 1 px, got {self.width} x {self.height}")
        if max(self.width, self.height) > 1024 * _texture.CELL_PX:
            raise ValueError(
                f"slide side must be <= {1024 * _texture.CELL_PX} px, got {self.width} x {self.height}"
            )
        io = _io_channels(self.io)
        if not 0.0 <= self.tissue_fraction <= 1.0:
            raise ValueError(f"tissue_fraction must be within 0..1, got {self.tissue_fraction}")
        scale = tuple(float(s) for s in self.conc_scale)
        if len(scale) != 2 or min(scale) <= 0 or not all(math.isfinite(s) for s in scale):
            raise ValueError(f"conc_scale must be two positive factors, got {self.conc_scale}")
        if self.texture not in (None, "real", "procedural"):
            raise ValueError(f"texture must be 'real', 'procedural' or None, got {self.texture!r}")
        matrix = _check_stain_matrix(self.stain_matrix)
        matrix.setflags(write=False)
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "conc_scale", scale)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "io", io)
        object.__setattr__(self, "tissue_fraction", float(self.tissue_fraction))


@dataclass(frozen=True, eq=False)
class SyntheticTruth:
    """What a generated slide is made of: the ground truth for stain-fit tests.

    Attributes
    ----------
    path : str
        The written TIFF.
    stain_matrix : (2, 3) float64
        Unit OD vectors, row 0 hematoxylin, row 1 eosin.
    io : (float, float, float)
        Glass intensity per channel, 0..255 (the slide's true white point).
    seed : int
    width, height : int
        Level-0 size, px.
    mpp : float
        Level-0 pixel size written to the file, micrometre per pixel.
    tissue_fraction_requested : float
        Fraction of the slide inside tissue regions; pixels with gray <= 200 cover a little
        less, since the texture holds some pale pixels.
    texture_source : {"real", "procedural"}
    conc_scale : (float, float)
    texture_files : tuple of str
        Real images the texture was unmixed from (empty when procedural).
    tile_px : int
    compression : {"jpeg", "deflate"}
    quality : int
        JPEG quality (ignored for deflate).
    level_dimensions : tuple of (width, height)
    """

    path: str
    stain_matrix: NDArray[np.float64]
    io: tuple[float, float, float]
    seed: int
    width: int
    height: int
    mpp: float
    tissue_fraction_requested: float
    texture_source: TextureKind
    conc_scale: tuple[float, float]
    texture_files: tuple[str, ...] = ()
    tile_px: int = 512
    compression: Compression = "jpeg"
    quality: int = 90
    level_dimensions: tuple[tuple[int, int], ...] = ()

    @property
    def params(self) -> SyntheticParams:
        """The parameters that recompute this slide's pixels."""
        return SyntheticParams(
            self.width,
            self.height,
            self.seed,
            self.stain_matrix,
            self.io,
            self.tissue_fraction_requested,
            self.conc_scale,
            self.texture_source,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the document written into the TIFF's ImageDescription)."""
        return {
            "wsi_norm_synthetic": 1,
            "stain_matrix": self.stain_matrix.tolist(),
            "io": list(self.io),
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "tissue_fraction_requested": self.tissue_fraction_requested,
            "texture_source": self.texture_source,
            "texture_files": list(self.texture_files),
            "conc_scale": list(self.conc_scale),
            "tile_px": self.tile_px,
            "compression": self.compression,
            "quality": self.quality,
            "level_dimensions": [list(d) for d in self.level_dimensions],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, path: str) -> SyntheticTruth:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``ValueError`` on a malformed document."""
        if doc.get("wsi_norm_synthetic") != 1:
            raise ValueError("not a wsi-norm synthetic slide description (version 1)")
        return cls(
            path=path,
            stain_matrix=_check_stain_matrix(doc["stain_matrix"]),
            io=_io_channels(doc["io"]),
            seed=int(doc["seed"]),
            width=int(doc["width"]),
            height=int(doc["height"]),
            mpp=float(doc["mpp"]),
            tissue_fraction_requested=float(doc["tissue_fraction_requested"]),
            texture_source=doc["texture_source"],
            conc_scale=(float(doc["conc_scale"][0]), float(doc["conc_scale"][1])),
            texture_files=tuple(doc["texture_files"]),
            tile_px=int(doc["tile_px"]),
            compression=doc["compression"],
            quality=int(doc["quality"]),
            level_dimensions=tuple((int(w), int(h)) for w, h in doc["level_dimensions"]),
        )


_REAL_TEXTURE_FILES = (
    "he/torchstain-source.png",
    "he/torchstain-target.png",
    "slides/CMU-1-Small-Region.svs",
)


def _real_texture_paths() -> list[Path] | None:
    root = data_dir()
    paths = [root / name for name in _REAL_TEXTURE_FILES]
    return paths if all(p.is_file() for p in paths) else None


def _resolve_texture(texture: TextureKind | None) -> TextureKind:
    # One seed, one slide, on every machine: the default is the real texture, and a machine
    # without the real data gets an error (from _bank), never a different slide.
    return "real" if texture is None else texture


def _bank(texture: TextureKind) -> _texture.PatchBank:
    if texture == "procedural":
        return _cached_bank("procedural", None)
    paths = _real_texture_paths()
    if paths is None:
        raise SlideOpenError(
            f"{data_dir()}: real texture files {list(_REAL_TEXTURE_FILES)} not found: set "
            f"{DATA_ENV} to the real-data folder, or generate with texture='procedural' "
            "(wsi-norm generate --texture procedural; manifest `texture: procedural`)"
        )
    return _cached_bank("real", tuple(paths))


def clear_caches() -> None:
    """Drop the generator's caches: the texture banks (real texture unmixed once per process,
    tens of MB) and the slide layouts of the last few seeds."""
    _cached_bank.cache_clear()
    _cached_plan.cache_clear()


@functools.lru_cache(maxsize=4)
def _cached_bank(texture: TextureKind, paths: tuple[Path, ...] | None) -> _texture.PatchBank:
    if paths is None:
        return _texture.procedural_bank()
    return _texture.real_bank(paths, unmix=_unmix_own_stains)


def _unmix_own_stains(rgb: NDArray[np.uint8], io: NDArray[np.float64]) -> NDArray[np.float32]:
    """Concentrations of a real H&E patch in its *own* stain basis.

    Unmixing with Ruifrok's textbook vectors leaves every stroma pixel some haematoxylin
    (the real stains differ from Ruifrok's), so a slide rendered from such maps has no pure
    eosin anywhere and no estimator can recover the true eosin vector from its pixels (real
    tissue does show pure eosin: stroma, cytoplasm). A textbook Macenko fit of the patch
    itself (alpha = 3 %) gives the basis whose extreme pixels are pure; negatives are clipped.
    Falls back to Ruifrok's vectors where the patch has too little stain to fit.
    """
    from wsi_norm.color import is_background
    from wsi_norm.errors import FitError
    from wsi_norm.stain.base import StainParams
    from wsi_norm.stain.macenko import fit_macenko

    tissue = rgb.reshape(-1, 3)
    tissue = tissue[~is_background(tissue)]
    # textbook Macenko with Io = mean(io), i.e. white point mean(io) - 1 (wsi-norm 0.1's bank, unchanged)
    params = StainParams(macenko_variant="textbook", alpha=3.0, white_point=float(np.mean(io)) - 1.0)
    try:
        stain_matrix = fit_macenko(np.ascontiguousarray(tissue), params).stain_matrix
    except FitError:
        stain_matrix = RUIFROK_HE
    return unmix_ruifrok(rgb, io=io, stain_matrix=stain_matrix)


@dataclass(frozen=True, eq=False)
class _Plan:
    bank: _texture.PatchBank
    field: _texture.TissueField
    layout: _texture.Layout
    level_dimensions: tuple[tuple[int, int], ...]


def _plan(
    width: int, height: int, seed: int, tissue_fraction: float, texture: TextureKind
) -> _Plan:
    folder = str(data_dir()) if texture == "real" else ""
    return _cached_plan(width, height, seed, tissue_fraction, texture, folder)


@functools.lru_cache(maxsize=8)
def _cached_plan(
    width: int, height: int, seed: int, tissue_fraction: float, texture: TextureKind, folder: str
) -> _Plan:
    bank = _bank(texture)
    field_seq, layout_seq = np.random.SeedSequence([seed, 0x5717]).spawn(2)
    tissue = _texture.TissueField.draw(
        width=width,
        height=height,
        tissue_fraction=tissue_fraction,
        rng=np.random.default_rng(field_seq),
    )
    layout = _texture.Layout.draw(
        width=width, height=height, group=bank.group, rng=np.random.default_rng(layout_seq)
    )
    dims = level_dimensions(width, height, min_level_px=1)
    return _Plan(bank, tissue, layout, dims)


def _plan_of(params: SyntheticParams) -> _Plan:
    texture = _resolve_texture(params.texture)
    return _plan(params.width, params.height, params.seed, params.tissue_fraction, texture)


def _conc_block(
    plan: _Plan,
    conc_scale: tuple[float, float],
    *,
    level: int,
    y: int,
    x: int,
    height: int,
    width: int,
) -> NDArray[np.float32] | None:
    """Planar (2, height, width) concentrations of a block of one level, or None if no tissue.

    The block may reach past the level's edge (tile padding); those pixels are glass.
    """
    level_w, level_h = plan.level_dimensions[level]
    mask = plan.field.mask(level=level, y=y, x=x, height=height, width=width)
    mask[max(0, level_h - y) :, :] = 0.0
    mask[:, max(0, level_w - x) :] = 0.0
    if not mask.any():
        return None
    conc = _texture.assemble_texture(
        plan.bank, plan.layout, level=level, y=y, x=x, height=height, width=width
    )
    conc *= mask
    conc *= np.asarray(conc_scale, dtype=np.float32)[:, None, None]
    return conc


def _tissue_tiles(plan: _Plan, level: int, tile_px: int) -> NDArray[np.bool_]:
    """(rows, cols) bool: tiles of a level that may hold tissue (a rigorous bound, no false "no")."""
    level_w, level_h = plan.level_dimensions[level]

    def spans(length: int) -> tuple[_texture.FloatArray, _texture.FloatArray]:
        first = np.arange(0, length, tile_px)
        return _texture.anchor_span(level, first, np.minimum(first + tile_px, length) - 1)

    (y_lo, y_hi), (x_lo, x_hi) = spans(level_h), spans(level_w)
    return plan.field.may_hold_tissue(y_lo, y_hi, x_lo, x_hi)


def _check_region(plan: _Plan, level: int, x: int, y: int, width: int, height: int) -> None:
    if not 0 <= level < len(plan.level_dimensions):
        raise ValueError(
            f"level {level} requested, slide has levels 0..{len(plan.level_dimensions) - 1}"
        )
    level_w, level_h = plan.level_dimensions[level]
    if width < 1 or height < 1 or x < 0 or y < 0 or x + width > level_w or y + height > level_h:
        raise ValueError(
            f"region x={x}, y={y}, {width} x {height} px is not inside level {level} ({level_w} x {level_h} px)"
        )


def _as_params(source: SyntheticTruth | SyntheticParams) -> SyntheticParams:
    return source.params if isinstance(source, SyntheticTruth) else source


def concentrations(
    source: SyntheticTruth | SyntheticParams,
    *,
    x: int,
    y: int,
    width: int,
    height: int,
    level: int = 0,
) -> NDArray[np.float32]:
    """Hematoxylin and eosin concentrations of a region of a synthetic slide.

    Parameters
    ----------
    source : SyntheticTruth or SyntheticParams
        The slide (only its parameters are used; the file is not read).
    x, y : int
        Top-left corner, in pixels **of that level** (column, row).
    width, height : int
        Region size, px of that level; the region must lie inside the level.
    level : int
        Pyramid level, ``2**level`` times smaller than level 0 (rounding up).

    Returns
    -------
    (height, width, 2) float32
        Concentrations in OD units along the unit stain vectors (>= 0; 0 on glass), with
        ``conc_scale`` applied. Independent of the stain matrix, so two slides that differ only
        in their stain matrix have identical concentrations.

    Notes
    -----
    Level k > 0 is rendered from the k-th mip of the texture, not as the 2x2 mean of level k-1;
    it matches the file's level k, and differs from a 2x2 mean of level 0's pixels by a few
    grey levels at nuclear edges (Beer-Lambert is not linear). Thread-safe.
    """
    params = _as_params(source)
    plan = _plan_of(params)
    _check_region(plan, level, x, y, width, height)
    conc = _conc_block(plan, params.conc_scale, level=level, y=y, x=x, height=height, width=width)
    if conc is None:
        return np.zeros((height, width, 2), np.float32)
    return np.ascontiguousarray(np.moveaxis(conc, 0, -1))


def render_region(
    source: SyntheticTruth | SyntheticParams,
    *,
    x: int,
    y: int,
    width: int,
    height: int,
    level: int = 0,
    stain_matrix: ArrayLike | None = None,
) -> NDArray[np.uint8]:
    """Pixels of a region of a synthetic slide, as written before compression.

    Parameters
    ----------
    source : SyntheticTruth or SyntheticParams
    x, y, width, height, level : int
        As in :func:`concentrations`.
    stain_matrix : (2, 3) array_like, optional
        Render the same concentrations with these stains instead (a registered pair).

    Returns
    -------
    (height, width, 3) uint8
        Identical to the TIFF's pixels with ``compression="deflate"``; within JPEG error otherwise.
    """
    params = _as_params(source)
    conc = concentrations(params, x=x, y=y, width=width, height=height, level=level)
    matrix = params.stain_matrix if stain_matrix is None else stain_matrix
    return render_beer_lambert(conc, matrix, io=params.io)


def read_truth(path: str | os.PathLike[str]) -> SyntheticTruth:
    """Read the truth that :func:`generate_slide` wrote into a slide's ImageDescription.

    Raises
    ------
    SlideOpenError
        The file cannot be opened or is not a wsi-norm synthetic slide.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            description = tif.pages.first.description
        doc = json.loads(description)
        return SyntheticTruth.from_dict(doc, path=str(path))
    except (OSError, ValueError, KeyError, TypeError, tifffile.TiffFileError) as exc:
        raise SlideOpenError(f"{path}: not a readable wsi-norm synthetic slide: {exc}") from exc


_T = TypeVar("_T")


def _ordered_map(
    fn: Callable[[_T], bytes], items: Iterable[_T | bytes], *, workers: int
) -> Iterator[bytes]:
    """``fn(item)`` for each item on a thread pool, in order, a bounded number in flight.

    Items that already are ``bytes`` (a reused glass tile) pass through without a task.
    """
    if workers <= 1:
        for item in items:
            yield item if isinstance(item, bytes) else fn(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="wsi-norm-synth") as pool:
        pending: deque[Future[bytes] | bytes] = deque()
        for item in items:
            pending.append(item if isinstance(item, bytes) else pool.submit(fn, item))
            while pending and (isinstance(pending[0], bytes) or len(pending) >= 4 * workers):
                head = pending.popleft()
                yield head if isinstance(head, bytes) else head.result()
        while pending:
            head = pending.popleft()
            yield head if isinstance(head, bytes) else head.result()


def _single_threaded_blas() -> contextlib.AbstractContextManager[object]:
    """Limit BLAS to one thread (process-wide) while active, if threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[object] = threadpool_limits(limits=1, user_api="blas")
    return limits


def _encoder(compression: Compression, quality: int) -> Callable[[NDArray[np.uint8]], bytes]:
    import imagecodecs

    if compression == "jpeg":

        def jpeg(tile: NDArray[np.uint8]) -> bytes:
            # the same stream tifffile writes for photometric RGB + JPEG: YCbCr, 4:2:0
            return bytes(
                imagecodecs.jpeg_encode(
                    tile, level=quality, subsampling=(2, 2), colorspace="RGB", outcolorspace="YCBCR"
                )
            )

        return jpeg

    def deflate(tile: NDArray[np.uint8]) -> bytes:
        predicted = imagecodecs.delta_encode(tile, axis=-2)
        return bytes(imagecodecs.deflate_encode(predicted.tobytes(), level=6))

    return deflate


def generate_slide(
    path: str | os.PathLike[str],
    *,
    width: int,
    height: int,
    stain_matrix: ArrayLike = RUIFROK_HE,
    seed: int = 0,
    tile_px: int = 512,
    mpp: float = 0.25,
    io: float | tuple[float, float, float] = 240.0,
    quality: int = 90,
    compression: Compression = "jpeg",
    tissue_fraction: float = 0.4,
    conc_scale: tuple[float, float] = (1.0, 1.0),
    texture: TextureKind = "real",
    min_level_px: int = 1024,
    workers: int | None = None,
    overwrite: bool = False,
) -> SyntheticTruth:
    """Write a synthetic H&E slide as a tiled pyramidal BigTIFF, streamed tile by tile.

    Parameters
    ----------
    path : path-like
        Output file (``.tif``/``.tiff``); written as ``<path>.partial`` and renamed when complete.
    width, height : int
        Level-0 size, px (up to 262,144 a side).
    stain_matrix : (2, 3) array_like
        OD vectors, row 0 hematoxylin, row 1 eosin (see :data:`SITE_STAINS`).
    seed : int
        Seed of tissue shape and texture layout; the same seed gives the same file.
    tile_px : int
        Tile side, px, a multiple of 16.
    mpp : float
        Level-0 pixel size, micrometre per pixel, written as X/YResolution in pixels per
        centimetre (OpenSlide reports it as ``openslide.mpp-x``, tiffslide as ``tiffslide.mpp-x``).
    io : float or (float, float, float)
        Glass intensity, 0..255, one value or one per channel (a scanner's white point); glass
        pixels are exactly ``round(io)``.
    quality : int
        JPEG quality, 1..100.
    compression : {"jpeg", "deflate"}
        JPEG (YCbCr 4:2:0, as scanners write) or lossless deflate with horizontal predictor.
    tissue_fraction : float
        Fraction of the slide area inside tissue regions, 0..1.
    conc_scale : (float, float)
        Factors on hematoxylin and eosin concentration (a site's stain intensity).
    texture : {"real", "procedural"}
        Texture bank: "real" (default) needs the real H&E images of the data folder
        (:func:`wsi_norm.testing.data.data_dir`) and raises where they are missing;
        "procedural" needs no data.
    min_level_px : int
        Levels are added (halving, rounding up) until both sides are <= this.
    workers : int, optional
        Threads rendering and encoding tiles; default ``min(4, os.cpu_count())``.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    SyntheticTruth
        Also written, as JSON, into the ImageDescription of level 0 (see :func:`read_truth`).

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is false.
    OutputError
        The file cannot be written.
    ValueError
        A parameter is out of range.

    Notes
    -----
    Levels are consecutive IFDs (NewSubfileType 1 after the first), the layout OpenSlide reads as
    a multi-level generic TIFF. Memory stays at a few tiles per worker plus the ~40 MiB texture
    bank; tiles without tissue are encoded once and their bytes reused.

    Examples
    --------
    >>> truth = generate_slide("slide.tif", width=3000, height=2500, tile_px=256)  # doctest: +SKIP
    >>> truth.level_dimensions  # doctest: +SKIP
    ((3000, 2500), (1500, 1250), (750, 625))
    """
    import tifffile

    params = SyntheticParams(
        width,
        height,
        seed,
        _check_stain_matrix(stain_matrix),
        io,
        tissue_fraction,
        conc_scale,
        texture,
    )
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    if compression not in ("jpeg", "deflate"):
        raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be within 1..100, got {quality}")
    if min_level_px < 1:
        raise ValueError(f"min_level_px must be >= 1, got {min_level_px}")
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists (pass overwrite=True to replace it)")
    texture_kind = _resolve_texture(params.texture)
    plan = _plan(params.width, params.height, params.seed, params.tissue_fraction, texture_kind)
    dims = level_dimensions(params.width, params.height, min_level_px=min_level_px)
    truth = SyntheticTruth(
        path=str(out),
        stain_matrix=params.stain_matrix,
        io=_io_channels(params.io),
        seed=params.seed,
        width=params.width,
        height=params.height,
        mpp=float(mpp),
        tissue_fraction_requested=params.tissue_fraction,
        texture_source=texture_kind,
        conc_scale=params.conc_scale,
        texture_files=plan.bank.files,
        tile_px=tile_px,
        compression=compression,
        quality=quality,
        level_dimensions=dims,
    )
    encode = _encoder(compression, quality)
    glass_tile = render_beer_lambert(
        np.zeros((tile_px, tile_px, 2), np.float32), params.stain_matrix, io=params.io
    )
    glass_bytes = encode(glass_tile)
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)

    def tile_bytes(job: tuple[int, int, int]) -> bytes:
        level, row, col = job
        conc = _conc_block(
            plan,
            params.conc_scale,
            level=level,
            y=row * tile_px,
            x=col * tile_px,
            height=tile_px,
            width=tile_px,
        )
        if conc is None:
            return glass_bytes
        return encode(_render_planes(conc[0], conc[1], params.stain_matrix, _io_channels(params.io)))

    tmp = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    try:
        # tiles are rendered in parallel by our threads; BLAS threads on top only contend
        with _single_threaded_blas(), tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for level, (level_w, level_h) in enumerate(dims):
                candidates = _tissue_tiles(plan, level, tile_px)
                rows, cols = candidates.shape
                jobs = (
                    (level, r, c) if candidates[r, c] else glass_bytes
                    for r in range(rows)
                    for c in range(cols)
                )
                tif.write(
                    _ordered_map(tile_bytes, jobs, workers=n_workers),
                    shape=(level_h, level_w, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    tile=(tile_px, tile_px),
                    compression="jpeg" if compression == "jpeg" else "adobe_deflate",
                    predictor=None if compression == "jpeg" else "horizontal",
                    resolution=(
                        1e4 / (mpp * params.width / level_w),
                        1e4 / (mpp * params.height / level_h),
                    ),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if level == 0 else 1,
                    description=json.dumps(truth.to_dict()) if level == 0 else None,
                    software="wsi-norm synthetic" if level == 0 else None,
                    metadata=None,
                )
                _log.debug("%s: level %d (%d x %d px) written", out, level, level_w, level_h)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write synthetic slide: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _log.info(
        "%s: %d x %d px synthetic slide, %d levels, written in %.1f s",
        out,
        params.width,
        params.height,
        len(dims),
        time.perf_counter() - started,
    )
    return truth
