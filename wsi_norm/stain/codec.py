"""Codec-aware stain vectors: remove the bias the slide's own JPEG coding puts into a fit.

Why
---
Scanners store tiles as JPEG. The coding moves exactly the pixels that define the stain
directions: with 4:2:0 chroma subsampling a small nucleus shares its colour with the stroma
around it, and coarse quantization (Aperio writes RGB JPEG at Q=30) flattens the colour of
every small structure. Every estimator that reads stain directions off observed pixels (all
Macenko and Vahadane variants) is pulled by it, mostly hematoxylin towards eosin. The
benchmark (BENCHMARKS.md, "Codec-aware fit") measured Macenko's hematoxylin on 4:2:0 slides at
q >= 80 off by 3.6 deg at the median (1.1 deg on losslessly stored cases).

What
----
A parametric bootstrap bias correction. The slide says how it was coded (its quantization
tables, chroma subsampling and colour space, :class:`wsi_norm.tiffjpeg.JpegCoding`), so the
coding can be simulated exactly (re-coding a tile's original pixels with the tables read back
gives the decoded tile bit for bit: ``tests/unit/test_stain_codec.py``). For the current
estimate ``V``: unmix windows the sampler read with ``V`` and render the concentrations back
with it (a slide whose stains are exactly ``V``), then fit that rendering twice, as it is and
coded and decoded as the scanner did. The difference of the two fits is what the coding does to
the estimator near ``V``; the corrected vectors solve ``V* = fit(observed) - bias(V*)`` by
fixed-point steps, and the slide-wide fit moves by the shift found. All fits of a step use the
same 2 x 2 blocks of the same windows (paired), so sampling noise cancels.

Chosen by evidence (``bench/codec_fit.py``, BENCHMARKS.md "Codec-aware fit"): comparing the
coded rendering with the *observed* windows instead (``V <- V + fit(observed) -
fit(coded)``) did about as well on the seeded cases but moved fits that were already right on
whole generated slides (the rendering inherits the first coding's noise, which that form
counts as bias); the paired clean-against-coded form isolates the coding and improved all
eight whole slides.

Off by default (``StainParams.codec_correction``): the stain vectors it gives are much closer to
the truth, but the written colour is not (ΔE2000 against the truth unchanged at the median), and
against a JPEG-coded target site's own slides it moves outputs by up to 0.8 Lab units: the map
projects each pixel onto the stain plane, and the corrected plane drops the coding's systematic
off-plane part that the target's slides keep (keeping that part instead, a residual-preserving
map, cost 0.6 dB against the truth: measured, not kept).

Limits, stated: the windows are the observed ones unmixed, so their nuclei carry the chroma
the coding already blurred, and the simulated bias is an under-estimate where the first coding
erased structure. A slide whose coding is unknown (a plain image, a format OpenSlide decodes
itself) gets no correction, recorded in provenance; so does a correction beyond
:data:`MAX_SHIFT_DEG`, or one whose simulated windows do not fit.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import rgb_to_od64
from wsi_norm.errors import FitError
from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.stain.base import (
    StainMatrixStats,
    StainParams,
    check_stain_matrix,
    max_concentrations,
    order_stains,
    tissue_pixels,
)
from wsi_norm.tiffjpeg import JpegCoding
from wsi_norm.tissue.sampling import block_means_at, tissue_block_mask

__all__ = ["CODEC_STEPS", "CODEC_WINDOWS", "CodecCorrection", "code_like", "codec_corrected"]

CODEC_WINDOWS = 32
"""Windows (of the sample's, spread over the slide) the coding is simulated on."""
CODEC_BLOCKS_PER_WINDOW = 4096
"""2 x 2 tissue blocks drawn per window (the same positions observed and simulated)."""
CODEC_STEPS = 2
"""Fixed-point steps of the correction."""
#: A correction larger than this (deg, either stain) is not applied: the fit is left as it was.
MAX_SHIFT_DEG = 15.0
_PIL_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


@dataclass(frozen=True)
class CodecCorrection:
    """What the correction did, for provenance.

    Attributes
    ----------
    coding : dict or None
        The slide's coding (:meth:`JpegCoding.to_dict`), None when unknown.
    applied : bool
    shift_deg : (float, float)
        How far the hematoxylin and eosin vectors moved (deg); 0 when not applied.
    reason : str
        Why it was or was not applied.
    windows : int
        Windows simulated.
    """

    coding: dict[str, Any] | None
    applied: bool
    shift_deg: tuple[float, float]
    reason: str
    windows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"coding": self.coding, "applied": self.applied,
                "shift_deg": [round(float(a), 3) for a in self.shift_deg],
                "reason": self.reason, "windows": self.windows}


def code_like(rgb: NDArray[np.uint8], coding: JpegCoding) -> NDArray[np.uint8]:
    """``rgb`` (H, W, 3) coded with ``coding``'s tables, subsampling and colour space (Pillow's
    libjpeg), then decoded as the slide's tiles are (libjpeg-turbo through simplejpeg, fancy
    upsampling)."""
    import simplejpeg
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(
        buf, format="JPEG", qtables=[list(t) for t in coding.qtables],
        subsampling=_PIL_SUBSAMPLING[coding.subsampling], keep_rgb=coding.rgb)
    decoded: NDArray[np.uint8] = np.asarray(simplejpeg.decode_jpeg(buf.getvalue(), colorspace="RGB"))
    return decoded


def _unit_rows(m: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = m / np.linalg.norm(m, axis=1, keepdims=True)
    return out


def _render_with(rgb: NDArray[np.uint8], matrix: NDArray[np.float64], white: NDArray[np.float64]) -> NDArray[np.uint8]:
    """``rgb`` unmixed with ``matrix`` (least squares, negative concentrations clipped) and
    rendered back with it: the window as a slide whose stains are exactly ``matrix`` shows it."""
    od = rgb_to_od64(rgb.reshape(-1, 3), white=white)  # 8-bit: looked up per level
    conc = np.clip(od @ np.linalg.pinv(matrix), 0.0, None)
    # od_to_rgb in float32 (numpy's SIMD exp: 4x faster than float64 here; on real windows the
    # same 8-bit pixels, at worst a level at a rounding boundary)
    intensity = np.exp(-(conc @ matrix).astype(np.float32))
    intensity *= (np.asarray(white, dtype=np.float64) + 1.0).astype(np.float32)
    intensity -= np.float32(1.0)
    np.rint(intensity, out=intensity)
    np.clip(intensity, 0.0, 255.0, out=intensity)
    out: NDArray[np.uint8] = intensity.astype(np.uint8).reshape(rgb.shape)
    return out


def _block_positions(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.intp]:
    """Seeded positions (into the (H/2 * W/2) block grid) of up to ``CODEC_BLOCKS_PER_WINDOW``
    blocks whose four pixels are tissue."""
    flat = np.flatnonzero(tissue_block_mask(rgb))
    if len(flat) > CODEC_BLOCKS_PER_WINDOW:
        flat = np.sort(rng.choice(flat, size=CODEC_BLOCKS_PER_WINDOW, replace=False))
    return flat


def _simulated_blocks(windows: Sequence[NDArray[np.uint8]], positions: Sequence[NDArray[np.intp]],
                      matrix: NDArray[np.float64], white: NDArray[np.float64],
                      coding: JpegCoding) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The drawn blocks of every window rendered with ``matrix``, as rendered and as coded
    (windows on a thread pool: numpy, Pillow's encoder and libjpeg-turbo release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_norm.runtime import usable_cpus

    def one(k: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        rendered = _render_with(windows[k], matrix, white)
        return block_means_at(rendered, positions[k]), block_means_at(code_like(rendered, coding), positions[k])

    with ThreadPoolExecutor(max(1, min(usable_cpus(), len(windows)))) as pool:
        parts = list(pool.map(one, range(len(windows))))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def codec_corrected(
    stats: StainMatrixStats,
    estimate: Callable[[NDArray[np.float32]], StainMatrixStats],
    *,
    data: NDArray[Any],
    windows: Sequence[NDArray[np.uint8]],
    white: NDArray[np.float64],
    coding: JpegCoding | None,
    params: StainParams,
    seed: int = 0,
) -> tuple[StainMatrixStats, CodecCorrection]:
    """The slide-wide fit ``stats`` with the bias of the slide's JPEG coding removed.

    Parameters
    ----------
    stats : StainMatrixStats
        The fit on the whole sample (``data``).
    estimate : callable
        The estimator that produced ``stats``: ``(N, 3)`` block means -> stats.
    data : (N, 3) array
        The sample ``stats`` was fitted on (its maximum concentrations are recomputed from it
        with the corrected vectors).
    windows : sequence of (H, W, 3) uint8
        Windows read from the slide (even origins on the tile grid).
    white : (3,) float
        The white point the fit used.
    coding : JpegCoding or None
        The slide's coding; None: nothing is corrected.
    params : StainParams
    seed : int
        Seeds the blocks drawn per window.

    Returns
    -------
    stats, record : the corrected (or unchanged) statistics, and what was done.
    """
    info = coding.to_dict() if coding is not None else None
    if coding is None:
        return stats, CodecCorrection(None, False, (0.0, 0.0), "the slide's coding is unknown (not JPEG tiles read here)")
    if not windows:
        return stats, CodecCorrection(info, False, (0.0, 0.0), "no windows to simulate")
    rng = np.random.default_rng(seed)
    positions = [_block_positions(w, rng) for w in windows]
    observed = np.concatenate([block_means_at(w, p) for w, p in zip(windows, positions, strict=True)])
    try:
        target = estimate(observed).stain_matrix
        current = target.copy()
        for _ in range(CODEC_STEPS):
            clean, coded = _simulated_blocks(windows, positions, current, white, coding)
            bias = estimate(coded).stain_matrix - estimate(clean).stain_matrix
            current = _unit_rows(target - bias)
    except FitError as exc:
        return stats, CodecCorrection(info, False, (0.0, 0.0), f"the simulated windows do not fit ({exc})", len(windows))
    corrected = order_stains(_unit_rows(stats.stain_matrix + (current - target)))
    h_shift, e_shift = stain_matrix_angles_deg(corrected, stats.stain_matrix)
    shift = (float(h_shift), float(e_shift))
    if max(shift) > MAX_SHIFT_DEG:
        return stats, CodecCorrection(info, False, (0.0, 0.0),
                                      f"a shift of {max(shift):.1f} deg is beyond {MAX_SHIFT_DEG:g}: fit kept", len(windows))
    try:
        check_stain_matrix(corrected, min_angle_deg=params.min_stain_angle_deg, what=f"{stats.method} (codec-corrected)")
        od = rgb_to_od64(tissue_pixels(data), white=white)
        max_conc = max_concentrations(od, corrected, percentile=params.max_conc_percentile, what=stats.method)
    except FitError as exc:
        return stats, CodecCorrection(info, False, (0.0, 0.0), f"the corrected vectors are degenerate ({exc})", len(windows))
    return (type(stats)(stain_matrix=corrected, max_conc=max_conc),
            CodecCorrection(info, True, shift, f"{CODEC_STEPS} steps on {len(windows)} windows", len(windows)))
