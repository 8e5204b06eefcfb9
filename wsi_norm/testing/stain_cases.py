"""A seeded family of H&E images whose stains are known: the estimation and fidelity benchmark's cases.

Each case is the same tissue rendered twice by the Beer-Lambert law, ``I = w * exp(-C @ M)``:

* the **source** as a scanner would have written it: stain vectors ``M`` turned up to 15 deg from
  Ruifrok & Johnston's in random directions, hematoxylin : eosin strength ratio 0.5-2 and overall
  density 0.6-1.6 (log-uniform / uniform), a white point ``w`` drawn per channel in 220-255 (glass
  tint), then JPEG at quality 70-95 with 4:2:0 (60 %) or 4:4:4 chroma, or none (15 %);
* the **truth**: the same concentrations rendered with the target site's stains, strengths and
  white point, losslessly: what a perfect normalization to that target writes.

Texture (the concentration maps ``C``), in rotation:

* ``gen-real``: wsi-norm's Beer-Lambert generator (:mod:`wsi_norm.testing.synthetic`) with its bank of
  patches unmixed from the real H&E images in the project's data folder; in compositions
  ``mixed``, ``nuclei-dense`` (nuclei dilated), ``stroma-dominant`` (only the strongest 10 % of
  hematoxylin kept), ``pale`` (0.45 x density), ``fatty`` (tissue cut by adipocyte-like holes) and
  ``sparse`` (5 % tissue);
* ``gen-proc``: the same generator with its procedural texture (blobs and fibres);
* ``real-cmu``, ``real-source``, ``real-target``: crops of the real CMU-1-Small-Region slide and
  the two torchstain patches, unmixed in their own stain basis (textbook Macenko, alpha = 2 %, on
  the crop; white point from the image's glass) and re-rendered. Negative concentrations are
  clipped, so at least ~2 % of each crop's stained pixels are pure in each stain: the truth is
  identifiable by construction ("unmixed-by-construction"). ``residual=True`` adds back the part
  of the real image's optical density that two stains cannot explain (off the new stain plane),
  a stress condition reported separately.

Everything is a deterministic function of the case index (and the real images). Cases are small
(1024 x 1024 px by default) so that hundreds run in minutes; the benchmark fits them through the
same slide-wide sampling as whole slides.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import BACKGROUND_WEIGHTED_MIN
from wsi_norm.stain.base import RUIFROK_HE, StainParams, order_stains
from wsi_norm.stain.macenko import fit_macenko
from wsi_norm.testing.data import data_dir

__all__ = [
    "COMPOSITIONS",
    "TARGET",
    "TEXTURES",
    "Case",
    "Staining",
    "data_dir",
    "draw_case",
    "jpeg_roundtrip",
    "render",
    "write_jpeg_tiff",
]

TEXTURES = ("gen-real", "gen-real", "gen-proc", "real-cmu", "real-source", "real-target")
"""Texture of case ``i`` is ``TEXTURES[i % 6]`` (the generator's real-texture bank twice as often)."""
COMPOSITIONS = ("mixed", "nuclei-dense", "stroma-dominant", "pale", "fatty", "sparse")
"""Compositions of generated texture, in rotation (real crops are taken as they are)."""
Subsampling = Literal["420", "444"]

_REAL_FILES = {
    "cmu": "slides/CMU-1-Small-Region.svs",
    "source": "he/torchstain-source.png",
    "target": "he/torchstain-target.png",
}


@dataclass(frozen=True)
class Staining:
    """How a site stains and scans: stain vectors, strengths and white point.

    Attributes
    ----------
    stain_matrix : (2, 3) float64, unit OD rows (hematoxylin, eosin)
    conc_scale : (float, float), factors on the hematoxylin and eosin concentrations
    white : (float, float, float), glass intensity per channel
    """

    stain_matrix: NDArray[np.float64]
    conc_scale: tuple[float, float] = (1.0, 1.0)
    white: tuple[float, float, float] = (240.0, 240.0, 240.0)


TARGET = Staining(
    stain_matrix=order_stains(np.array([[0.60, 0.74, 0.30], [0.12, 0.96, 0.25]])),
    conc_scale=(1.0, 1.0),
    white=(241.0, 238.0, 244.0),
)
"""The benchmark's target site: stains near Ruifrok's, unit strengths, a slightly cool white point."""


@dataclass(frozen=True, eq=False)
class Case:
    """One benchmark case.

    Attributes
    ----------
    index : int
    texture : str, one of :data:`TEXTURES`
    composition : str, one of :data:`COMPOSITIONS` (``mixed`` for real crops)
    source : Staining, the source site (the truth the estimators should recover)
    quality : int or None, JPEG quality of the source (None: lossless)
    subsampling : {"420", "444"}, JPEG chroma subsampling of the source
    conc : (H, W, 2) float32, concentrations at unit strength
    residual : (H, W, 3) float32, off-plane optical density added to the source (zeros unless
        the case was drawn with ``residual=True``)
    """

    index: int
    texture: str
    composition: str
    source: Staining
    quality: int | None
    subsampling: Subsampling
    conc: NDArray[np.float32] = field(repr=False)
    residual: NDArray[np.float32] = field(repr=False)

    @property
    def lossy(self) -> bool:
        """The source went through JPEG."""
        return self.quality is not None

    def source_rgb(self) -> NDArray[np.uint8]:
        """The source as the scanner wrote it (rendered, then JPEG-compressed if lossy)."""
        rgb = render(self.conc, self.source, residual=self.residual)
        return rgb if self.quality is None else jpeg_roundtrip(rgb, self.quality, self.subsampling)

    def truth_rgb(self, target: Staining = TARGET) -> NDArray[np.uint8]:
        """The same tissue stained and scanned as ``target`` (lossless): the normalization's truth."""
        return render(self.conc, target)

    def tissue(self) -> NDArray[np.bool_]:
        """(H, W) bool: pixels holding any stain (the truth's tissue, before the gray rule)."""
        return np.asarray((self.conc[..., 0] + self.conc[..., 1]) > 0.02)


def render(conc: NDArray[np.floating], staining: Staining, *, residual: NDArray[np.floating] | None = None) -> NDArray[np.uint8]:
    """``round(w * exp(-(conc * scale) @ M - residual))`` as 8-bit RGB."""
    od = (np.asarray(conc, dtype=np.float64) * np.asarray(staining.conc_scale)) @ staining.stain_matrix
    if residual is not None:
        od = od + residual
    rgb = np.asarray(staining.white, dtype=np.float64) * np.exp(-od)
    out: NDArray[np.uint8] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def jpeg_roundtrip(rgb: NDArray[np.uint8], quality: int, subsampling: Subsampling) -> NDArray[np.uint8]:
    """Encode as a JPEG (YCbCr, the given chroma subsampling) and decode, as a scanner and a reader would."""
    import imagecodecs

    data = imagecodecs.jpeg8_encode(rgb, level=quality, subsampling=subsampling, colorspace="RGB",
                                    outcolorspace="YCBCR")
    return np.asarray(imagecodecs.jpeg8_decode(data), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _real_image(name: str) -> NDArray[np.uint8]:
    from wsi_norm.slide import open_slide

    path = data_dir() / _REAL_FILES[name]
    with open_slide(path) as slide:
        w, h = slide.dimensions
        return slide.read_region(0, x=0, y=0, width=w, height=h)


@functools.lru_cache(maxsize=4)
def _real_white(name: str) -> NDArray[np.float64]:
    """A real image's glass intensity: the median of its flat glass, else its 99.5th percentile."""
    from wsi_norm.tissue.whitepoint import estimate_white_point, glass_candidates

    rgb = _real_image(name)
    white = estimate_white_point(glass_candidates(rgb))
    if white.source == "glass":
        return white.array
    return np.clip(np.percentile(rgb.reshape(-1, 3), 99.5, axis=0), 200.0, 255.0)


def _unmix_own(rgb: NDArray[np.uint8], white: NDArray[np.float64], alpha: float = 2.0) -> tuple[
    NDArray[np.float32], NDArray[np.float32], NDArray[np.float64]
]:
    """Concentrations (clipped >= 0) and off-plane residual OD of a real crop in its own basis."""
    flat = rgb.reshape(-1, 3).astype(np.float64)
    weighted = flat @ np.array([299.0, 587.0, 114.0])
    tissue = flat[weighted < BACKGROUND_WEIGHTED_MIN]
    m = fit_macenko(tissue, StainParams(macenko_variant="textbook", alpha=alpha), white=white).stain_matrix
    od = -np.log((rgb.astype(np.float64) + 1.0) / (white + 1.0))
    conc = od @ np.linalg.pinv(m)
    residual = od - conc @ m
    residual[(weighted >= 215_000).reshape(rgb.shape[:2])] = 0.0
    return np.clip(conc, 0.0, None).astype(np.float32), residual.astype(np.float32), m


def _compose(conc: NDArray[np.float64], composition: str, rng: np.random.Generator) -> NDArray[np.float64]:
    from scipy import ndimage

    h, e = conc[..., 0], conc[..., 1]
    tissue = (h + e) > 0.02
    if composition == "nuclei-dense":
        h = ndimage.grey_dilation(h, size=(5, 5)) * 1.1
    elif composition == "stroma-dominant":
        q = float(np.percentile(h[tissue], 90)) if tissue.any() else 1.0
        h = h * np.clip((h - 0.8 * q) / (0.2 * q + 1e-6), 0.0, 1.0)
    elif composition == "pale":
        h, e = h * 0.45, e * 0.45
    elif composition == "fatty":
        from scipy.spatial import cKDTree

        n_rows, n_cols = h.shape
        cells = rng.uniform(0, 1, (max(8, n_rows * n_cols // 3000), 2)) * [n_rows, n_cols]
        yy, xx = np.mgrid[0:n_rows, 0:n_cols]
        dist, _ = cKDTree(cells).query(np.stack([yy.ravel(), xx.ravel()], 1), k=2)
        hole = ((dist[:, 1] - dist[:, 0]).reshape(n_rows, n_cols) > 4) & tissue
        h, e = np.where(hole, 0.0, h), np.where(hole, 0.0, e)
    return np.stack([h, e], axis=-1)


def draw_case(index: int, *, size: int = 1024, residual: bool = False) -> Case:
    """Case ``index`` of the family (deterministic).

    Parameters
    ----------
    index : int, >= 0
    size : int
        Side of the (square) images, px; real crops are at most the real image's size.
    residual : bool
        Add the real texture's off-plane residual to the source (real textures only).

    Returns
    -------
    Case
    """
    from wsi_norm.testing.synthetic import SyntheticParams, concentrations, rotate_stain_matrix

    rng = np.random.default_rng([index, 77])
    texture = TEXTURES[index % len(TEXTURES)]
    composition = COMPOSITIONS[(index // len(TEXTURES)) % len(COMPOSITIONS)] if texture.startswith("gen") else "mixed"
    h_deg, e_deg = rng.uniform(0.0, 15.0, 2)
    matrix = rotate_stain_matrix(RUIFROK_HE, h_deg, e_deg, seed=int(rng.integers(1 << 30)))
    ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    density = rng.uniform(0.6, 1.6)
    scale = (density * math.sqrt(ratio), density / math.sqrt(ratio))
    white = tuple(float(v) for v in rng.uniform(220.0, 255.0, 3))
    quality = None if rng.random() < 0.15 else int(rng.integers(70, 96))
    subsampling: Subsampling = "420" if rng.random() < 0.6 else "444"
    seed = int(rng.integers(1 << 30))
    conc: NDArray[np.floating]  # float64 when generated, float32 when unmixed from a real crop
    if texture.startswith("gen"):
        fraction = 0.05 if composition == "sparse" else float(rng.uniform(0.2, 0.7))
        params = SyntheticParams(size, size, seed=seed, tissue_fraction=fraction,
                                 texture="real" if texture == "gen-real" else "procedural")
        conc = _compose(concentrations(params, x=0, y=0, width=size, height=size).astype(np.float64),
                        composition, rng)
        off_plane = np.zeros(conc.shape[:2] + (3,), np.float32)
    else:
        name = texture.split("-", 1)[1]
        image = _real_image(name)
        side = min(size, *image.shape[:2])
        y = int(rng.integers(0, image.shape[0] - side + 1))
        x = int(rng.integers(0, image.shape[1] - side + 1))
        conc, resid, _ = _unmix_own(image[y : y + side, x : x + side], _real_white(name))
        if residual:
            q, _ = np.linalg.qr(matrix.T)  # keep only the part off the new stain plane
            off_plane = ((resid - (resid @ q) @ q.T) * density).astype(np.float32)
        else:
            off_plane = np.zeros(resid.shape, np.float32)
    staining = Staining(matrix, (float(scale[0]), float(scale[1])), white)  # type: ignore[arg-type]
    return Case(index, texture, composition, staining, quality, subsampling,
                np.ascontiguousarray(conc, dtype=np.float32), off_plane)


def write_jpeg_tiff(rgb: NDArray[np.uint8], path: str | os.PathLike[str], *, quality: int,
                    subsampling: Subsampling, tile_px: int = 256) -> None:
    """Write ``rgb`` as a scanner would: a tiled TIFF of baseline JPEG tiles (YCbCr, the given
    chroma subsampling and quality), each tile coded on its own."""
    import imagecodecs
    import tifffile

    h, w = rgb.shape[:2]
    sub = (2, 2) if subsampling == "420" else (1, 1)

    def tiles() -> Iterator[bytes]:
        for y in range(0, h, tile_px):
            for x in range(0, w, tile_px):
                tile = np.full((tile_px, tile_px, 3), 255, np.uint8)
                part = rgb[y : y + tile_px, x : x + tile_px]
                tile[: part.shape[0], : part.shape[1]] = part
                yield bytes(imagecodecs.jpeg8_encode(tile, level=quality, subsampling=sub, colorspace="RGB",
                                                     outcolorspace="YCBCR"))

    with tifffile.TiffWriter(path) as tif:
        tif.write(tiles(), shape=(h, w, 3), dtype=np.uint8, photometric="rgb", tile=(tile_px, tile_px),
                  compression="jpeg", metadata=None)
