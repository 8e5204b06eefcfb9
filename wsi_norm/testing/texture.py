"""Stain-concentration texture of synthetic slides (private helper of :mod:`wsi_norm.testing.synthetic`).

Three parts, all deterministic:

* a **patch bank**: square (H, E) concentration patches unmixed from real H&E images, or drawn
  procedurally (nuclei as blobs in H, stroma as a smooth fibrous field in E) when no real image
  is available; each patch is stored with its 2x2-mean mip levels so that lower pyramid levels
  can be rendered directly at their resolution;
* a **tissue field**: a smooth random field over the whole slide (a sum of Gaussian bumps on a
  coarse grid, two octaves, pushed down near the slide border), thresholded at the quantile that
  gives the requested tissue fraction; it can be evaluated on any pixel grid of any level without
  ever holding the slide;
* a **layout**: one bank patch (and one of the 8 flips/rotations) per 256 x 256 px cell of level 0,
  blended over a 32 px overlap with variance-preserving weights so that cell borders show no seam
  and no loss of contrast.

Nothing here holds more than one tile of the slide; the bank is about 40 MiB.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_norm.errors import SlideOpenError

__all__ = [
    "CELL_PX",
    "OVERLAP_PX",
    "TEXTURE_MPP",
    "Layout",
    "PatchBank",
    "TissueField",
    "assemble_texture",
    "procedural_bank",
    "real_bank",
]

_log = logging.getLogger(__name__)

FloatArray = NDArray[np.floating[Any]]

CELL_PX = 256
"""Side of one layout cell at level 0, px (a power of two)."""
OVERLAP_PX = 64
"""Half-width of the blending band around each cell border at level 0, px (a power of two)."""
_FULL_PX = CELL_PX + 2 * OVERLAP_PX
TEXTURE_MPP = 0.25
"""Nominal pixel size of the bank texture, micrometre per pixel (a 40x scan)."""

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as MATLAB rgb2gray
_BANK_SEED = 20240617  # fixed: the bank is the same for every slide; the slide seed picks from it


@dataclass(frozen=True, eq=False)
class PatchBank:
    """Concentration patches, their mip levels and their groups.

    Attributes
    ----------
    source : {"real", "procedural"}
        Where the texture came from.
    files : tuple of str
        File names of the real images unmixed (empty for procedural texture).
    group : (N,) int32
        Group of each patch (the image it came from, or the procedural kind); the layout keeps
        neighbouring cells in one group so that tissue types form regions.
    mips : tuple of (N, 2, S_k, S_k) float32
        Planar (H plane, E plane). Level k: the patches 2x2-mean downsampled k times. While ``2**k <= OVERLAP_PX`` they
        include the blending margin (``S_k = (CELL_PX + 2 OVERLAP_PX) / 2**k``); beyond, only the
        cell core (``S_k = CELL_PX / 2**k``), down to 1 px.
    means : tuple of (N, 2) float32
        Mean H and E concentration of each patch at each level.
    """

    source: str
    files: tuple[str, ...]
    group: NDArray[np.int32]
    mips: tuple[FloatArray, ...]
    means: tuple[FloatArray, ...]

    @property
    def size(self) -> int:
        """Number of patches N."""
        return int(self.mips[0].shape[0])

    def overlap_px(self, level: int) -> int:
        """Blending margin of the patches of ``level``, px of that level (0: edge to edge)."""
        factor = 1 << level
        return OVERLAP_PX // factor if factor <= OVERLAP_PX else 0


def _mean2x2(a: FloatArray) -> FloatArray:
    n, c, h, w = a.shape
    mean: FloatArray = a.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5), dtype=np.float32)
    return mean


def _make_bank(
    patches: FloatArray, group: NDArray[np.int32], source: str, files: tuple[str, ...]
) -> PatchBank:
    """Build the mip chain of (N, CELL_PX + 2 OVERLAP_PX, same, 2) patches (stored planar)."""
    mips = [np.ascontiguousarray(np.moveaxis(patches, -1, 1), dtype=np.float32)]
    while (1 << len(mips)) <= OVERLAP_PX:
        mips.append(_mean2x2(mips[-1]))
    core = CELL_PX // (1 << (len(mips) - 1))
    margin = (mips[-1].shape[-1] - core) // 2
    last = np.ascontiguousarray(mips[-1][:, :, margin : margin + core, margin : margin + core])
    while last.shape[-1] > 1:
        last = _mean2x2(last)
        mips.append(last)
    means = [m.mean(axis=(2, 3), dtype=np.float64).astype(np.float32) for m in mips]
    for arr in (*mips, *means, group):
        arr.setflags(write=False)
    return PatchBank(source, files, group, tuple(mips), tuple(means))


def _read_rgb(path: Path) -> tuple[NDArray[np.uint8], float | None]:
    """Read a small RGB image or one-level slide whole; return it and its MPP if known."""
    suffix = path.suffix.lower()
    try:
        if suffix in {".svs", ".tif", ".tiff", ".ndpi", ".scn"}:
            import tiffslide

            with tiffslide.TiffSlide(path) as slide:
                rgb = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
                mpp = slide.properties.get("tiffslide.mpp-x")
            return np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), (float(mpp) if mpp else None)
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8), None
    except (OSError, ValueError) as exc:
        raise SlideOpenError(f"{path}: cannot read texture source image: {exc}") from exc


def _resize_rgb(rgb: NDArray[np.uint8], size_px: int) -> NDArray[np.uint8]:
    from PIL import Image

    if rgb.shape[0] == size_px and rgb.shape[1] == size_px:
        return rgb
    img = Image.fromarray(rgb).resize((size_px, size_px), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def real_bank(
    files: Sequence[Path],
    *,
    unmix: Callable[[NDArray[np.uint8], NDArray[np.float64]], FloatArray],
    n_patches: int = 40,
    min_tissue: float = 0.8,
) -> PatchBank:
    """Unmix patches of real H&E images into a concentration bank.

    Parameters
    ----------
    files : sequence of Path
        RGB(A) images (PNG, JPEG) or small one-level slides (SVS, TIFF) holding H&E tissue.
        Slides with an MPP are rescaled to :data:`TEXTURE_MPP`; images without are taken as is.
    unmix : callable (rgb (H, W, 3) uint8, io (3,) float64) -> (H, W, 2) float32
        Stain unmixing (Ruifrok's H&E vectors in :mod:`wsi_norm.testing.synthetic`).
    n_patches : int
        Patches to take, shared evenly between the files.
    min_tissue : float
        Least fraction of tissue pixels (gray <= 200) in a patch; lowered to 90% of the best
        patch of an image where none reaches it (pale stroma is tissue too).

    Returns
    -------
    PatchBank

    Raises
    ------
    SlideOpenError
        A file cannot be read.
    ValueError
        No file holds a patch with enough tissue.

    Notes
    -----
    The background intensity ``io`` of each image is its 99.5th percentile per channel (clipped
    to 200..255), so that each image's own glass unmixes to zero concentration.
    """
    rng = np.random.default_rng(_BANK_SEED)
    per_file = max(1, n_patches // max(1, len(files)))
    patches: list[FloatArray] = []
    groups: list[int] = []
    for file_index, path in enumerate(files):
        rgb, mpp = _read_rgb(Path(path))
        scale = (mpp / TEXTURE_MPP) if mpp else 1.0
        native = max(16, round(_FULL_PX / scale))
        if rgb.shape[0] < native or rgb.shape[1] < native:
            _log.warning("%s: smaller than one %d px texture patch, skipped", path, native)
            continue
        pixels = rgb.reshape(-1, 3)
        io = np.clip(
            np.percentile(pixels[:: max(1, pixels.shape[0] // 200_000)], 99.5, axis=0), 200.0, 255.0
        )
        # gray <= 200 with ITU-R 601 weights, in integers: 299 R + 587 G + 114 B <= 200 000
        weights = (_LUMA * 1000).astype(np.int32)
        dark = (
            rgb[..., 0] * weights[0] + rgb[..., 1] * weights[1] + rgb[..., 2] * weights[2]
        ) <= 200_000
        integral = np.pad(
            dark.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0))
        )
        stride = max(8, native // 8)
        ys = np.arange(0, rgb.shape[0] - native + 1, stride)
        xs = np.arange(0, rgb.shape[1] - native + 1, stride)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        count = (
            integral[yy + native, xx + native]
            - integral[yy, xx + native]
            - integral[yy + native, xx]
            + integral[yy, xx]
        )
        fraction = count.ravel() / float(native * native)
        ok = np.flatnonzero(fraction >= min(min_tissue, 0.9 * float(fraction.max(initial=0.0))))
        if ok.size == 0 or fraction.max(initial=0.0) < 0.2:
            _log.warning("%s: no %d px patch with tissue, skipped", path, native)
            continue
        chosen = rng.choice(ok, size=min(per_file, ok.size), replace=False)
        for idx in np.sort(chosen):
            y, x = int(yy.ravel()[idx]), int(xx.ravel()[idx])
            crop = _resize_rgb(rgb[y : y + native, x : x + native], _FULL_PX)
            patches.append(unmix(crop, io))
            groups.append(file_index)
    if not patches:
        raise ValueError(f"no texture patch found in {[str(f) for f in files]}")
    names = tuple(Path(f).name for f in files)
    return _make_bank(np.stack(patches), np.asarray(groups, np.int32), "real", names)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]
) -> FloatArray:
    """Unit-variance Gaussian-filtered white noise; wide kernels run on a coarser grid."""
    from scipy.ndimage import gaussian_filter, zoom

    step = max(1, int(min(sigma) // 3))
    coarse = (-(-shape[0] // step), -(-shape[1] // step))
    field = gaussian_filter(
        rng.standard_normal(coarse), (sigma[0] / step, sigma[1] / step), mode="wrap"
    )
    if step > 1:
        field = zoom(field, step, order=1, mode="grid-wrap", grid_mode=True)[: shape[0], : shape[1]]
    unit: FloatArray = (field - field.mean()) / (field.std() + 1e-12)
    return unit


def procedural_bank(*, n_patches: int = 40) -> PatchBank:
    """Draw a bank of procedural H&E concentration patches.

    Stroma is a smooth, fibrous (anisotropic) eosin field with a faint hematoxylin counterstain;
    nuclei are elliptic hematoxylin blobs, 4-9 px in radius, clustered in half of the patches.

    Parameters
    ----------
    n_patches : int
        Patches to draw.

    Returns
    -------
    PatchBank
        With ``source == "procedural"``.
    """
    rng = np.random.default_rng(_BANK_SEED)
    size = _FULL_PX
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n_patches, size, size, 2), np.float32)
    for i in range(n_patches):
        fibres = _smooth_noise(rng, (size, size), (1.5, 9.0) if i % 2 else (9.0, 1.5))
        blobs = _smooth_noise(rng, (size, size), (24.0, 24.0))
        eosin = np.clip(0.45 + 0.18 * fibres + 0.12 * blobs, 0.05, 1.2)
        hema = np.clip(0.10 + 0.04 * _smooth_noise(rng, (size, size), (3.0, 3.0)), 0.0, None)
        density = 60 + (140 if i % 2 == 0 else 0)
        for _ in range(int(rng.poisson(density))):
            cy, cx = rng.uniform(-8, size + 8, 2)
            ry, rx = rng.uniform(4.0, 9.0), rng.uniform(3.0, 7.0)
            theta = rng.uniform(0, np.pi)
            strength = rng.uniform(0.7, 1.5)
            y0, y1 = max(0, int(cy - 10)), min(size, int(cy + 11))
            x0, x1 = max(0, int(cx - 10)), min(size, int(cx + 11))
            if y0 >= y1 or x0 >= x1:
                continue
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            u = (dy * math.cos(theta) + dx * math.sin(theta)) / ry
            v = (-dy * math.sin(theta) + dx * math.cos(theta)) / rx
            inside = np.clip(1.0 - (u * u + v * v), 0.0, None) ** 0.35
            hema[y0:y1, x0:x1] = np.maximum(hema[y0:y1, x0:x1], strength * inside)
            eosin[y0:y1, x0:x1] *= 1.0 - 0.6 * inside
        out[i, ..., 0] = hema
        out[i, ..., 1] = eosin
    return _make_bank(out, (np.arange(n_patches) % 2).astype(np.int32), "procedural", ())


_BUMP_SIGMA = 0.7  # bump width, in node spacings
_BUMP_CUTOFF = 4.0  # bumps are exactly zero beyond this many sigmas (exp(-8) ~ 3e-4 at the cut)
_ANCHOR_PX = 8  # the field is evaluated every 8 px of a level and interpolated in between


def _bump_weights(coords: FloatArray, spacing: float, n_nodes: int) -> FloatArray:
    """(len(coords), n_nodes) truncated Gaussian-bump weights of nodes at (j - 2) * spacing."""
    nodes = (np.arange(n_nodes) - 2.0) * spacing
    t = (coords[:, None] - nodes[None, :]) / (_BUMP_SIGMA * spacing)
    return np.where(np.abs(t) <= _BUMP_CUTOFF, np.exp(-0.5 * t * t), 0.0)


def _separable_sum(wy: FloatArray, coef: FloatArray, wx: FloatArray) -> FloatArray:
    """``wy @ coef @ wx.T`` as ordered sums of products, skipping all-zero columns.

    Each element is computed by the same sequence of floating-point operations whichever block
    of the slide it is evaluated in (BLAS kernels round differently for different shapes), which
    makes tiles bit-identical to regions rendered in one piece.
    """
    rows = np.zeros((wy.shape[0], coef.shape[1]))
    for a in np.flatnonzero(wy.any(axis=0)):
        rows += wy[:, a, None] * coef[None, a, :]
    out = np.zeros((wy.shape[0], wx.shape[0]))
    for b in np.flatnonzero(wx.any(axis=0)):
        out += rows[:, b, None] * wx[None, :, b]
    return out


def _border_side(t: FloatArray, length: int) -> FloatArray:
    """Penalty (<= 0) at level-0 coordinates ``t`` along a side of ``length`` px."""
    margin = 0.06 * length
    d = np.minimum(t, length - t)
    return -3.0 * np.clip(1.0 - d / margin, 0.0, None) ** 2


def _bump_extremes(
    lo: FloatArray, hi: FloatArray, spacing: float, n_nodes: int
) -> tuple[FloatArray, FloatArray]:
    """Max and min of each node's bump over each interval [lo, hi]: two (len(lo), n_nodes) arrays."""
    nodes = (np.arange(n_nodes) - 2.0) * spacing
    near = np.abs(np.clip(nodes[None, :], lo[:, None], hi[:, None]) - nodes[None, :])
    far = np.maximum(np.abs(nodes[None, :] - lo[:, None]), np.abs(nodes[None, :] - hi[:, None]))
    sigma = _BUMP_SIGMA * spacing
    peak = np.where(near <= _BUMP_CUTOFF * sigma, np.exp(-0.5 * (near / sigma) ** 2), 0.0)
    low = np.where(far <= _BUMP_CUTOFF * sigma, np.exp(-0.5 * (far / sigma) ** 2), 0.0)
    return peak, low


@dataclass(frozen=True, eq=False)
class TissueField:
    """Smooth random field over the slide whose upper level set is the tissue.

    Evaluate with :meth:`mask`; coordinates are level-0 pixel centres, so any level's pixel grid
    can be evaluated (pixel ``i`` of level k has its centre at ``(i + 0.5) * 2**k - 0.5``).

    Attributes
    ----------
    width, height : int
        Level-0 size of the slide, px.
    octaves : tuple of (spacing_px, (ny, nx) float64 coefficients)
        Grids of Gaussian bumps; the field is the sum of all octaves.
    scale : float
        Divides the raw octave sum to unit standard deviation.
    threshold : float
        Field value at the tissue border (mask = 0.5).
    edge : float
        Field change over which the mask goes from 0 to 1 (about 6 px at level 0).
    """

    width: int
    height: int
    octaves: tuple[tuple[float, FloatArray], ...]
    scale: float
    threshold: float
    edge: float

    @classmethod
    def draw(
        cls, *, width: int, height: int, tissue_fraction: float, rng: np.random.Generator
    ) -> TissueField:
        """Draw a field for a slide of ``width`` x ``height`` px with the given tissue fraction."""
        base = float(np.clip(min(width, height) / 6.0, 256.0, 16384.0))
        octaves = []
        for spacing, amplitude in ((base, 1.0), (base / 2.5, 0.45)):
            ny = math.ceil(height / spacing) + 5
            nx = math.ceil(width / spacing) + 5
            octaves.append((spacing, amplitude * rng.standard_normal((ny, nx))))
        field = cls(width, height, tuple(octaves), 1.0, 0.0, 1.0)
        sample_y = (np.arange(256) + 0.5) * height / 256.0
        sample_x = (np.arange(256) + 0.5) * width / 256.0
        raw = field._raw(sample_y, sample_x)
        scale = float(raw.std()) or 1.0
        values = raw / scale + field._border(sample_y, sample_x)
        if tissue_fraction <= 0.0:
            threshold = math.inf
        elif tissue_fraction >= 1.0:
            threshold = -math.inf
        else:
            threshold = float(np.quantile(values, 1.0 - tissue_fraction))
        return cls(width, height, tuple(octaves), scale, threshold, 6.0 / base)

    def _raw(self, ys: FloatArray, xs: FloatArray) -> FloatArray:
        total = np.zeros((ys.size, xs.size))
        for spacing, coef in self.octaves:
            wy = _bump_weights(ys, spacing, coef.shape[0])
            wx = _bump_weights(xs, spacing, coef.shape[1])
            total += _separable_sum(wy, coef, wx)
        return total

    def _ramp(self, ys: FloatArray, xs: FloatArray) -> FloatArray:
        """The mask before clipping to 0..1 on the grid ``ys`` x ``xs`` (level-0 coordinates)."""
        values = self._raw(ys, xs) / self.scale + self._border(ys, xs)
        return (values - self.threshold) / self.edge + 0.5

    def _border(self, ys: FloatArray, xs: FloatArray) -> FloatArray:
        """Separable penalty that keeps tissue off the outer 6% of each side."""
        return _border_side(ys, self.height)[:, None] + _border_side(xs, self.width)[None, :]

    def may_hold_tissue(
        self,
        y_lo: FloatArray,
        y_hi: FloatArray,
        x_lo: FloatArray,
        x_hi: FloatArray,
    ) -> NDArray[np.bool_]:
        """Whether each rectangle of a grid may hold a pixel with mask > 0 (never a false "no").

        Parameters
        ----------
        y_lo, y_hi : (R,) float64
            Level-0 coordinates of the first and last pixel centre of each grid row of rectangles.
        x_lo, x_hi : (C,) float64
            The same for the grid columns.

        Returns
        -------
        (R, C) bool

        Notes
        -----
        A rigorous upper bound of the field over each rectangle: every bump term ``g phi(y) phi(x)``
        is bounded by its extreme over the rectangle (1 where the node lies inside the interval,
        else the value at the nearest or farthest end), which turns the bound of all rectangles
        into two matrix products per octave.
        """
        if math.isinf(self.threshold):
            return np.full((y_lo.size, x_lo.size), self.threshold < 0)
        bound = np.zeros((y_lo.size, x_lo.size))
        for spacing, coef in self.octaves:
            ymax, ymin = _bump_extremes(y_lo, y_hi, spacing, coef.shape[0])
            xmax, xmin = _bump_extremes(x_lo, x_hi, spacing, coef.shape[1])
            bound += ymax @ np.clip(coef, 0.0, None) @ xmax.T
            bound += ymin @ np.clip(coef, None, 0.0) @ xmin.T
        bound /= self.scale

        # the border penalty is largest at the point of each interval nearest the slide's centre
        bound += _border_side(np.clip(self.height / 2.0, y_lo, y_hi), self.height)[:, None]
        bound += _border_side(np.clip(self.width / 2.0, x_lo, x_hi), self.width)[None, :]
        # interpolation between anchors cannot exceed the anchors' bound; 1e-6 absorbs rounding
        return bound > self.threshold - 0.5 * self.edge - 1e-6

    def mask(self, *, level: int, y: int, x: int, height: int, width: int) -> FloatArray:
        """Tissue weight of a block of one level.

        Parameters
        ----------
        level : int
            Pyramid level; pixel ``i`` has its centre at level-0 coordinate ``(i + 0.5) * 2**level - 0.5``.
        y, x : int
            Top-left pixel of the block (row, column), in pixels of that level.
        height, width : int
            Block size, px of that level.

        Returns
        -------
        (height, width) float32
            1 inside tissue, 0 on glass, a ramp about 6 level-0 px wide at the border. The field
            is evaluated on anchors every 8 px of the level and interpolated bilinearly; every
            pixel depends only on its own position, not on the block it is computed in.
        """
        if math.isinf(self.threshold):
            return np.full((height, width), 0.0 if self.threshold > 0 else 1.0, np.float32)
        (ay, ty, iy), (ax, tx, ix) = _anchors(level, y, height), _anchors(level, x, width)
        ramp = self._ramp(ay, ax)
        # interpolation is monotone, so blocks whose anchors are all <= 0 or >= 1 are exact
        if np.all(ramp <= 0.0) or np.all(ramp >= 1.0):
            return np.full((height, width), 0.0 if ramp[0, 0] <= 0.0 else 1.0, np.float32)
        rows = (ramp[iy] * (1.0 - ty)[:, None] + ramp[iy + 1] * ty[:, None]).astype(np.float32)
        tx32 = tx.astype(np.float32)
        out = rows[:, ix] * (np.float32(1.0) - tx32)[None, :]
        out += rows[:, ix + 1] * tx32[None, :]
        return np.clip(out, 0.0, 1.0, out=out)


def _anchors(
    level: int, start: int, length: int
) -> tuple[FloatArray, FloatArray, NDArray[np.intp]]:
    """Anchor coordinates (level 0) around pixels ``start .. start + length - 1`` of a level.

    Returns the anchors' level-0 coordinates, each pixel's interpolation weight toward the next
    anchor, and each pixel's index of the anchor at or before it.
    """
    factor = 1 << level
    pixels = np.arange(start, start + length)
    first = start // _ANCHOR_PX
    anchor_px = np.arange(first, (start + length - 1) // _ANCHOR_PX + 2) * _ANCHOR_PX
    coords = (anchor_px + 0.5) * factor - 0.5
    index = pixels // _ANCHOR_PX - first
    weight = (pixels % _ANCHOR_PX) / _ANCHOR_PX
    return coords, weight, index


def anchor_span(
    level: int, first_px: NDArray[np.int64], last_px: NDArray[np.int64]
) -> tuple[FloatArray, FloatArray]:
    """Level-0 range of the anchors that pixels ``first_px .. last_px`` of a level interpolate."""
    factor = 1 << level
    lo = (first_px // _ANCHOR_PX) * _ANCHOR_PX
    hi = (last_px // _ANCHOR_PX + 1) * _ANCHOR_PX
    return (lo + 0.5) * factor - 0.5, (hi + 0.5) * factor - 0.5


@dataclass(frozen=True, eq=False)
class Layout:
    """Which bank patch, and which of its 8 flips/rotations, fills each cell of level 0.

    Attributes
    ----------
    patch : (ny, nx) int32
        Bank index per cell; cell (i, j) covers level-0 rows ``[CELL_PX i, CELL_PX (i + 1))`` and
        columns ``[CELL_PX j, CELL_PX (j + 1))``.
    dihedral : (ny, nx) uint8
        0-3: rotation by that many quarter turns; 4-7: the same followed by a left-right flip.
    """

    patch: NDArray[np.int32]
    dihedral: NDArray[np.uint8]

    @classmethod
    def draw(
        cls, *, width: int, height: int, group: NDArray[np.int32], rng: np.random.Generator
    ) -> Layout:
        """Draw a layout for a slide of ``width`` x ``height`` level-0 px.

        Cells first get a group (tissue type) from the largest of one smooth random field per
        group (regions about four cells across), then a random patch of that group.
        """
        from scipy.ndimage import gaussian_filter

        shape = (-(-height // CELL_PX), -(-width // CELL_PX))
        groups = np.unique(group)
        noise = rng.standard_normal((groups.size, *shape))
        cell_group = groups[
            np.argmax(gaussian_filter(noise, (0.0, 2.0, 2.0), mode="reflect"), axis=0)
        ]
        patch = np.zeros(shape, np.int32)
        for g in groups:
            members = np.flatnonzero(group == g).astype(np.int32)
            pick = members[rng.integers(0, members.size, size=shape)]
            patch = np.where(cell_group == g, pick, patch)
        dihedral = rng.integers(0, 8, size=shape, dtype=np.uint8)
        return cls(patch, dihedral)


def _window(overlap: int, core: int) -> FloatArray:
    """Blending weights at pixel centres of a cell's extended range [-overlap, core + overlap)."""
    if overlap == 0:
        return np.ones(core, np.float32)
    u = np.arange(-overlap, core + overlap, dtype=np.float32) + 0.5
    rise = np.clip((u + overlap) / (2 * overlap), 0.0, 1.0)
    fall = np.clip((core + overlap - u) / (2 * overlap), 0.0, 1.0)
    return rise * fall


def _orient(patch: FloatArray, dihedral: int) -> FloatArray:
    """View of a (2, S, S) patch turned by ``dihedral % 4`` quarter turns, then flipped if >= 4."""
    out = np.rot90(patch, dihedral % 4, axes=(1, 2))
    return out[:, :, ::-1] if dihedral >= 4 else out


def assemble_texture(
    bank: PatchBank, layout: Layout, *, level: int, y: int, x: int, height: int, width: int
) -> FloatArray:
    """Blend the bank patches of the cells under a region of one level.

    Parameters
    ----------
    bank, layout : PatchBank, Layout
    level : int
        Pyramid level; its pixels are ``2**level`` level-0 pixels wide.
    y, x : int
        Top-left corner of the region, in pixels of that level (row, column), >= 0.
    height, width : int
        Region size in pixels of that level; parts beyond the cell grid come back as zero.

    Returns
    -------
    (2, height, width) float32
        Planar H and E concentration (OD units, >= 0) before the tissue mask.

    Notes
    -----
    Each patch is split into its mean ``m_i`` and detail ``p_i - m_i``; means are blended
    linearly and details with variance-preserving weights,
    ``sum(w_i m_i) / sum(w_i) + sum(w_i (p_i - m_i)) / sqrt(sum(w_i**2))``, with linear ramps
    ``w_i`` across the overlap, so cell borders show neither a seam nor a loss of contrast.
    Level k uses the patches' k-th mip with the cell and overlap shrunk by ``2**k``; once the
    overlap is below one pixel, cells are laid edge to edge from the mips of their cores.
    """
    factor = 1 << level
    if factor > CELL_PX or level >= len(bank.mips):
        raise ValueError(f"level {level} is coarser than one {CELL_PX} px texture cell")
    core = CELL_PX // factor
    overlap = bank.overlap_px(level)
    mips, means = bank.mips[level], bank.means[level]
    window = _window(overlap, core)
    ny, nx = layout.patch.shape
    cells_y = range(max(0, (y - overlap) // core), min(ny, -(-(y + height + overlap) // core)))
    cells_x = range(max(0, (x - overlap) // core), min(nx, -(-(x + width + overlap) // core)))
    # separable weights: w_ij(r, c) = wy_i(r) wx_j(c); column k of each matrix is one cell
    wy = _cell_weights(window, core, overlap, cells_y, y, height)
    wx = _cell_weights(window, core, overlap, cells_x, x, width)
    detail = np.zeros((2, height, width), np.float32)
    scratch = np.empty((2, min(height, window.size), min(width, window.size)), np.float32)
    for a, ci in enumerate(cells_y):
        rows = np.flatnonzero(wy[:, a])
        if rows.size == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        top = ci * core - overlap
        for b, cj in enumerate(cells_x):
            cols = np.flatnonzero(wx[:, b])
            if cols.size == 0:
                continue
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            left = cj * core - overlap
            index = int(layout.patch[ci, cj])
            patch = _orient(mips[index], int(layout.dihedral[ci, cj]))
            block = patch[:, y + r0 - top : y + r1 - top, x + c0 - left : x + c1 - left]
            tmp = scratch[:, : r1 - r0, : c1 - c0]
            np.multiply(block, wy[None, r0:r1, a, None], out=tmp)
            tmp *= wx[None, None, c0:c1, b]
            detail[:, r0:r1, c0:c1] += tmp
    # detail holds sum(w_i p_i); the patch means blend linearly, the rest variance-preserving
    cell_means = means[layout.patch[cells_y.start : cells_y.stop, cells_x.start : cells_x.stop]]
    mean = np.stack([_separable_sum(wy, cell_means[:, :, k], wx) for k in range(2)]).astype(
        np.float32
    )
    total = np.outer(_ordered_sum(wy), _ordered_sum(wx))
    total2 = np.outer(_ordered_sum(wy * wy), _ordered_sum(wx * wx))
    covered = total > 0
    norm = np.where(covered, 1.0 / np.sqrt(np.where(covered, total2, 1.0)), 0.0).astype(np.float32)
    inv_total = np.where(covered, 1.0 / np.where(covered, total, 1.0), 0.0).astype(np.float32)
    detail *= norm
    mean *= inv_total - norm
    detail += mean
    return np.clip(detail, 0.0, None, out=detail)


def _ordered_sum(weights: FloatArray) -> FloatArray:
    """Row sums of (n, k) weights, added column by column (the same order in every block)."""
    out = np.zeros(weights.shape[0])
    for column in weights.T:
        out += column
    return out


def _cell_weights(
    window: FloatArray, core: int, overlap: int, cells: range, start: int, length: int
) -> FloatArray:
    """(length, len(cells)) weights of each cell at pixels ``start .. start + length - 1``."""
    out = np.zeros((length, len(cells)), np.float32)
    for k, cell in enumerate(cells):
        first = cell * core - overlap
        lo, hi = max(start, first), min(start + length, first + window.size)
        if lo < hi:
            out[lo - start : hi - start, k] = window[lo - first : hi - first]
    return out
