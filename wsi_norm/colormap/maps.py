"""The fitted per-pixel colour map: direct evaluation (numpy, torch) and an exact 256^3 LUT.

Once source and target statistics are fixed, every method maps one RGB value
to one RGB value, whatever the pixel's neighbours.  A :class:`ColorMap` is
that function.

Evaluation paths
----------------
``evaluate_numpy(rgb)``
    The reference: float64 math in numpy, rounded half-to-even, clipped to
    [0, 255].
``apply(rgb)`` / ``cmap(rgb)``
    The fast CPU path: a gather from the 256^3 table that :meth:`ColorMap.lut`
    builds once, in blocks of 65 536 colours, by calling ``evaluate_numpy``: the
    gather is bit-identical to direct evaluation.  The table is held with each
    colour in four bytes (64 MiB; ``lut()`` is its 3-byte view), so the gather
    loads one aligned word per pixel: 10-28 % faster than three bytes on real
    tiles (2.2-2.9 against 3.0-3.3 ns a pixel).  The gather is a numba loop
    compiled with ``nogil=True``, so dask threads run it in parallel.
``evaluate_direct(rgb)``
    What the pipeline calls for a slide under 256^3 pixels (no table): ``evaluate_numpy``, or,
    for the mixture map, each distinct colour evaluated once into a table filled on demand
    (:mod:`wsi_norm.colormap.memo`); bit-identical either way.
``apply_torch(t)``
    The same function evaluated directly in torch on the tensor's device
    (float32 by default; ``use_lut=True`` gathers from the table moved to
    the device instead).  In float32 a value that lies within ~1e-4 of a
    rounding boundary can round the other way, so it agrees with the numpy
    reference within 1 grey level; in float64 on CPU it agrees up to
    the last-ulp differences of ``exp``/``log``/``pow`` (also within 1 level).

Every pixel is mapped, continuously
-----------------------------------
The gray > 200 rule chooses the pixels the statistics are *fitted* on; it does not switch the
map on and off.  Each map is one continuous function of the whole RGB cube, so neighbouring
colours stay neighbours (no speckle at gray 200).  Glass goes to the **target's glass colour**:
Macenko and Vahadane do so by construction (optical density against the source's white point,
rendered into the target's: glass has OD 0 and comes out as the target white); Reinhard,
histogram matching, the mixture map (:mod:`wsi_norm.colormap.gmm`) and StainNet carry a
:class:`GlassBlend` when asked to.  A ``GlassBlend``
blends the method's colour smoothly (a smoothstep in luma over a band of at least 8 levels below
the white point) into either the white-balanced pixel (``mode="target"``: each channel scaled
from the source's white point to the target's) or the unchanged pixel (``mode="keep"``: the
source's glass is kept, ``--keep-glass``).  Every input, including pure black and pure white,
maps to a finite value: optical densities are clipped before ``exp``.

Thread safety and pickling
--------------------------
Maps are immutable.  The LUT is built lazily under a lock, so concurrent
``apply`` calls build it once.  Pickling drops the LUT (a map pickles in a few
hundred bytes; each dask worker builds its own table on first use).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import (
    BACKGROUND_LUMA,
    DEFAULT_WHITE,
    _channels_from_lab,
    _lab_from_channels,
    _lab_from_linear,
    _white_channels,
    srgb_linear_levels,
)
from wsi_norm.color import _check_rgb_uint8 as _check_uint8_rgb
from wsi_norm.errors import FitError
from wsi_norm.stain.base import check_stain_matrix

__all__ = ["ColorMap", "GlassBlend", "HistogramMap", "IdentityMap", "ReinhardMap", "StainMatrixMap"]

GlassMode = Literal["target", "keep"]
#: The glass band ends this many luma levels below the source white point ...
_BAND_TOP_BELOW_WHITE = 6.0
#: ... and starts this many below it (never below the gray > 200 rule), at least 8 levels wide.
_BAND_BOTTOM_BELOW_WHITE = 24.0
_BAND_MIN_WIDTH = 8.0


def _luma_of(white: tuple[float, float, float]) -> float:
    return 0.299 * white[0] + 0.587 * white[1] + 0.114 * white[2]


@dataclass(frozen=True)
class GlassBlend:
    """A smooth hand-over from a method's colour to a glass colour near the white point.

    ``out = m + s(luma) * (glass - m)`` channel by channel, where ``m`` is the method's colour,
    ``s`` a smoothstep (``3 t^2 - 2 t^3``) rising from 0 at luma ``lo`` to 1 at ``hi``, and
    ``glass`` is the white-balanced input (``mode="target"``: ``(x + 1) * (wt + 1) / (ws + 1) - 1``
    per channel) or the input itself (``mode="keep"``).  The blend is continuous and has no
    switch: its slope adds at most ``1.5 |glass - m| / (hi - lo)`` per luma level.

    Parameters
    ----------
    mode : {"target", "keep"}
    source_white, target_white : (float, float, float)
        White points (glass intensity per channel) of the source slide and of the target.
    lo, hi : float
        Luma band of the hand-over, ``200 <= lo < hi``.
    """

    mode: GlassMode
    source_white: tuple[float, float, float]
    target_white: tuple[float, float, float]
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.mode not in ("target", "keep"):
            raise ValueError(f"glass mode must be 'target' or 'keep', got {self.mode!r}")
        object.__setattr__(self, "source_white", _white_channels(self.source_white))
        object.__setattr__(self, "target_white", _white_channels(self.target_white))
        if not (BACKGROUND_LUMA <= self.lo < self.hi):
            raise ValueError(f"glass band must satisfy {BACKGROUND_LUMA} <= lo < hi, got {self.lo}, {self.hi}")

    @classmethod
    def for_whites(
        cls, mode: GlassMode, source_white: Any = DEFAULT_WHITE, target_white: Any = DEFAULT_WHITE
    ) -> GlassBlend:
        """The band from the source white point's luma ``Y``: ``lo = max(200, Y - 24)``,
        ``hi = max(lo + 8, Y - 6)`` (glass sits within a few levels of its white point)."""
        src = _white_channels(source_white)
        y = _luma_of(src)
        lo = max(float(BACKGROUND_LUMA), y - _BAND_BOTTOM_BELOW_WHITE)
        hi = max(lo + _BAND_MIN_WIDTH, y - _BAND_TOP_BELOW_WHITE)
        return cls(mode, src, _white_channels(target_white), lo, hi)

    def weight(self, xp: ModuleType, r: Any, g: Any, b: Any) -> Any:
        """Smoothstep weight of the glass colour, 0 below ``lo``, 1 above ``hi``."""
        t = xp.clip((0.299 * r + 0.587 * g + 0.114 * b - self.lo) / (self.hi - self.lo), 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)

    def glass(self, r: Any, g: Any, b: Any) -> list[Any]:
        """The glass colour of each input: white-balanced (target) or unchanged (keep)."""
        if self.mode == "keep":
            return [r, g, b]
        return [
            (c + 1.0) * ((wt + 1.0) / (ws + 1.0)) - 1.0
            for c, ws, wt in zip((r, g, b), self.source_white, self.target_white)
        ]

    def apply(self, xp: ModuleType, r: Any, g: Any, b: Any, mapped: list[Any]) -> list[Any]:
        """Blend the method's planar colour ``mapped`` with the glass colour of ``(r, g, b)``."""
        s = self.weight(xp, r, g, b)
        return [m + s * (q - m) for m, q in zip(mapped, self.glass(r, g, b))]

_LUT_BLOCK_BITS = 16  # colours per LUT block: 2**16 (one value of R)
_EVAL_SLAB_PX = 1 << _LUT_BLOCK_BITS  # pixels per slab of direct evaluation
# Mapped optical density is clipped to this range before exp: far beyond 8-bit output either way.
_OD_MIN, _OD_MAX = -5.0, 30.0
OD_RANGE = (_OD_MIN, _OD_MAX)
# The same clip on the transmitted fraction exp(-od).
_E_MIN, _E_MAX = float(np.exp(-_OD_MAX)), float(np.exp(-_OD_MIN))
# Optical density of 8-bit input against any white point <= 255 lies within +-log(256); a
# product of exponentials whose exponents stay within _FACTOR_EXP_MAX neither overflows nor
# underflows, in float64 and in the float32 of the torch path (exp(+-80) is finite and normal there).
_MAX_ABS_OD = float(np.log(256.0))
_FACTOR_EXP_MAX = 80.0


def planar_od(xp: ModuleType, planes: tuple[Any, Any, Any], white: tuple[float, float, float]) -> list[Any]:
    """Optical density of three intensity planes, ``-log((c + 1) / (white + 1))`` per channel
    (:func:`wsi_norm.color.rgb_to_od`, planar)."""
    return [-xp.log((c + 1.0) / (w + 1.0)) for c, w in zip(planes, white, strict=True)]


def planar_intensity(xp: ModuleType, od: list[Any], white: tuple[float, float, float]) -> list[Any]:
    """Intensity planes of optical density rendered into ``white`` (clipped to a range far beyond
    8-bit output first): the inverse of :func:`planar_od`."""
    return [(w + 1.0) * xp.exp(-xp.clip(o, _OD_MIN, _OD_MAX)) - 1.0 for o, w in zip(od, white, strict=True)]

_GATHER: Any = None
_GATHER_WORDS: Any = None
_LITTLE_ENDIAN = sys.byteorder == "little"

# Process-wide LUTs by ColorMap.cache_key(), (256, 256, 256, 4) uint8 (RGB and a zero byte):
# a few slides' maps (64 MiB each) at most.
# _LUT_CACHE_LOCK guards the two dicts only; each key's table is built under its own lock, so
# two different maps build their tables at the same time and one map's table is built once.
_LUT_CACHE: OrderedDict[str, NDArray[np.uint8]] = OrderedDict()
_LUT_BUILD_LOCKS: dict[str, threading.Lock] = {}
_LUT_CACHE_LOCK = threading.Lock()
_LUT_CACHE_SIZE = 4
# The same tables on torch devices, by (cache_key, device), under _LUT_CACHE_LOCK.
_DEVICE_LUTS: OrderedDict[tuple[str, str], Any] = OrderedDict()
# Tiles of at most this many pixels are evaluated directly (bit-identical) while their map's
# table is not built: a 10 x 10 tile costs 0.2 ms, not the 1 s a whole table takes.
_DIRECT_MAX_PX = 1 << 14


def clear_lut_cache() -> None:
    """Drop the process-wide lookup tables (64 MiB each; at most four are kept), the whole
    tables and those filled on demand (:func:`wsi_norm.colormap.memo.shared_memo`).

    Maps that already hold their table keep it until they are dropped; every other map
    rebuilds its table on next use.
    """
    from wsi_norm.colormap.memo import clear_memos

    with _LUT_CACHE_LOCK:
        _LUT_CACHE.clear()
        _DEVICE_LUTS.clear()
    clear_memos()


def _gather_kernel() -> Any:
    """Compile (once, lazily) the numba gather ``out[i] = lut[r, g, b]``."""
    global _GATHER
    if _GATHER is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def gather(pixels: Any, lut: Any, out: Any) -> None:  # pragma: no cover - compiled
            for i in range(pixels.shape[0]):
                r = pixels[i, 0]
                g = pixels[i, 1]
                b = pixels[i, 2]
                out[i, 0] = lut[r, g, b, 0]
                out[i, 1] = lut[r, g, b, 1]
                out[i, 2] = lut[r, g, b, 2]

        _GATHER = gather
    return _GATHER


def _gather_words_kernel() -> Any:
    """Compile (once, lazily) the numba gather from the 4-byte table, one word a pixel:
    ``out[i] = bytes 0..2 of words[r << 16 | g << 8 | b]`` (little-endian)."""
    global _GATHER_WORDS
    if _GATHER_WORDS is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def gather_words(pixels: Any, words: Any, out: Any) -> None:  # pragma: no cover - compiled
            for i in range(pixels.shape[0]):
                v = words[(np.uint32(pixels[i, 0]) << 16) | (np.uint32(pixels[i, 1]) << 8) | np.uint32(pixels[i, 2])]
                out[i, 0] = v & 255
                out[i, 1] = (v >> 8) & 255
                out[i, 2] = (v >> 16) & 255

        _GATHER_WORDS = gather_words
    return _GATHER_WORDS


def load_kernels() -> None:
    """Compile (or load from numba's cache) the table gather now, on a one-pixel input: a
    ``distributed`` worker does it as it joins (:class:`wsi_norm.worker_setup.WorkerWarmup`),
    not in its first block."""
    if _LITTLE_ENDIAN:
        _gather_words_kernel()(np.zeros((1, 3), np.uint8), np.zeros(1, np.uint32), np.empty((1, 3), np.uint8))
    else:  # pragma: no cover - big-endian hosts
        _gather_kernel()(np.zeros((1, 3), np.uint8), np.zeros((1, 1, 1, 3), np.uint8), np.empty((1, 3), np.uint8))


def _in_parallel(fill: Any) -> None:
    """``fill(r)`` for r in 0..255 on a thread pool (numpy releases the GIL in its loops)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, range(256)))


def _packed(lut: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """``(256, 256, 256, 4) uint8``, read-only: ``lut``'s colours and a zero byte, copied one
    channel at a time (a copy of 3-byte rows runs its inner loop 16.7 M times: 0.1-0.3 s)."""
    packed = np.empty((256, 256, 256, 4), dtype=np.uint8)
    words, colours = packed.reshape(-1, 4), lut.reshape(-1, 3)
    for c in range(3):
        words[:, c] = colours[:, c]
    words[:, 3] = 0
    packed.flags.writeable = False
    return packed


class ColorMap:
    """A per-pixel map of 8-bit RGB, with numpy, LUT and torch evaluation.

    Subclasses implement :meth:`_map_channels`; everything else is shared.
    """

    method: ClassVar[str] = "base"
    #: ``_map_channels`` is element-wise under numpy broadcasting (no stacking, no matrix
    #: products across channels): the table is then built from planes of shape ``(1, 1)``,
    #: ``(256, 1)`` and ``(1, 256)``, so per-channel work (logarithms, sRGB decoding) runs on 256
    #: values instead of 65,536 a block, with the same float64 operations on each element
    #: (``tests/unit/test_colormap.py`` compares the whole table with per-pixel evaluation).
    broadcasts: ClassVar[bool] = False
    #: The pipeline maps a large slide through :meth:`evaluate_memo` (each of the slide's
    #: distinct colours evaluated once) instead of building the whole 256^3 table first. A real
    #: slide holds far fewer colours than the cube (CMU-1-Small-Region 0.95 M in 6.6 MP), so it
    #: pays where the table is costly: the mixture map (0.2 us a colour, 3.7 CPU-s for the
    #: table) and Reinhard (144 ns a colour, 0.7-1.2 s of wall for the table). Macenko, Vahadane
    #: and histogram matching build theirs in 0.12-0.25 s, and filling on demand measured no
    #: faster end to end (BENCHMARKS.md), so they keep the whole table.
    memo_for_slides: ClassVar[bool] = False

    def __init__(self, *, glass: GlassBlend | None = None) -> None:
        self.glass = glass
        self._lut: NDArray[np.uint8] | None = None
        self._torch_luts: dict[str, Any] = {}
        self._lock = threading.Lock()

    def notes(self) -> dict[str, Any]:
        """What the map decided while it was built, for the output's provenance (JSON-ready;
        empty for most maps, see :meth:`wsi_norm.colormap.gmm.GmmMap.notes`)."""
        return {}

    # -- the math, once, for numpy arrays and torch tensors -----------------
    def _map_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        """Map planar float channels (values 0..255) to planar float channels (unrounded)."""
        raise NotImplementedError

    def _evaluate_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        """The whole map: the method's colour, blended into the glass colour if asked to."""
        mapped = self._map_channels(xp, r, g, b)
        return mapped if self.glass is None else self.glass.apply(xp, r, g, b, mapped)

    # -- numpy reference ----------------------------------------------------
    def evaluate_numpy(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Evaluate the map directly in float64 numpy (the exact reference).

        Parameters
        ----------
        rgb : (..., 3) uint8

        Returns
        -------
        out : (..., 3) uint8, same shape; every pixel mapped
        """
        arr = _check_uint8_rgb(rgb)
        flat = arr.reshape(-1, 3)
        out = np.empty_like(flat)
        # slabs of 2**16 pixels (the LUT's blocks): the float64 temporaries stay in cache, 3-4x
        # faster than whole tiles; every operation is per element, so the values are the same
        for start in range(0, flat.shape[0], _EVAL_SLAB_PX):
            part = flat[start : start + _EVAL_SLAB_PX]
            planar = np.ascontiguousarray(part.T, dtype=np.float64)  # (3, n), contiguous channels
            mapped = self._evaluate_channels(np, planar[0], planar[1], planar[2])
            for c in range(3):
                out[start : start + _EVAL_SLAB_PX, c] = np.clip(np.rint(mapped[c]), 0.0, 255.0).astype(np.uint8)
        return out.reshape(arr.shape)

    def evaluate_direct(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Evaluate a tile without the whole table (an image of fewer than 256^3 pixels):
        :meth:`evaluate_numpy` here, no compiled code; a map whose evaluation is costly may
        instead use :meth:`evaluate_memo`. Bit-identical to :meth:`evaluate_numpy`.
        """
        return self.evaluate_numpy(rgb)

    def evaluate_distinct(self, rgb: NDArray[np.uint8], *, threads: int = 2) -> NDArray[np.uint8]:
        """Evaluate an image held in memory through its distinct colours: each evaluated once by
        :meth:`evaluate_numpy` (on ``threads`` threads), then looked up for every pixel.
        Bit-identical to :meth:`evaluate_numpy`; numpy only (no compiled code), for a map that
        costs more a colour than a lookup (:attr:`memo_for_slides`) on an image whose colours
        repeat (CMU-1-Small-Region: 0.95 M distinct in 6.6 MP). Holds a 16-MiB presence mask and
        a 64-MiB table of which only the pages of the image's colours are touched.
        """
        arr = _check_uint8_rgb(rgb)
        # a colour's key is its bytes as a little-endian word: r | g << 8 | b << 16
        words = np.zeros((arr.size // 3, 4), dtype=np.uint8)
        words[:, :3] = arr.reshape(-1, 3)
        keys = words.view("<u4")[:, 0]
        present = np.zeros(1 << 24, dtype=bool)
        present[keys] = True
        distinct = np.flatnonzero(present).astype("<u4")
        del present
        colours = distinct.view(np.uint8).reshape(-1, 4)[:, :3]
        mapped = np.zeros((len(distinct), 4), dtype=np.uint8)  # (R, G, B, 0) words, as the keys
        bounds = np.linspace(0, len(distinct), max(1, threads) + 1).astype(int)

        def evaluate(i: int) -> None:
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                mapped[lo:hi, :3] = self.evaluate_numpy(colours[lo:hi])

        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="wsi-norm-distinct") as pool:
            list(pool.map(evaluate, range(len(bounds) - 1)))
        table = np.empty(1 << 24, dtype="<u4")  # only the entries of the image's colours are set
        table[distinct] = mapped.view("<u4")[:, 0]
        out = table[keys].view(np.uint8).reshape(-1, 4)[:, :3]
        return np.ascontiguousarray(out).reshape(arr.shape)

    def evaluate_memo(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Evaluate a tile through a table filled on demand: each distinct colour is evaluated
        once per map and process (:func:`wsi_norm.colormap.memo.shared_memo`, 64 MiB once used,
        shared by every copy of the map), then gathered. Bit-identical to :meth:`evaluate_numpy`
        and to :meth:`lut`.
        """
        arr = _check_uint8_rgb(rgb)
        memo = self.__dict__.get("_memo")
        if memo is None:
            from wsi_norm.colormap.memo import shared_memo

            with self._lock:
                memo = self.__dict__.get("_memo")
                if memo is None:
                    memo = self.__dict__["_memo"] = shared_memo(self.cache_key(), self.evaluate_numpy)
        return memo(np.ascontiguousarray(arr).reshape(-1, 3)).reshape(arr.shape)

    # -- LUT -----------------------------------------------------------------
    def cache_key(self) -> str:
        """SHA-256 of what defines the map (its pickled state without caches).

        Two copies of one map (say, unpickled by dask for every band of a slide) share a key,
        so they share one process-wide LUT (:meth:`lut`).
        """
        key = self.__dict__.get("_cache_key")
        if key is None:
            key = hashlib.sha256(
                type(self).__qualname__.encode() + pickle.dumps(self.__getstate__(), protocol=5)
            ).hexdigest()
            self.__dict__["_cache_key"] = key
        return key

    def lut(self) -> NDArray[np.uint8]:
        """The exact lookup table ``lut[r, g, b] == evaluate_numpy([r, g, b])``.

        Returns
        -------
        lut : (256, 256, 256, 3) uint8, read-only view of the 64 MiB 4-byte table; built on first call
            in 256 blocks of 65 536 colours (about 5 MiB of temporaries), then
            cached for the process: every copy of the same map (same
            :meth:`cache_key`) reuses it, so a map that dask unpickles once per
            band of a slide is still compiled once per process.
        """
        if self._lut is None:
            key = self.cache_key()
            with _LUT_CACHE_LOCK:
                packed = _LUT_CACHE.get(key)
                if packed is not None:
                    _LUT_CACHE.move_to_end(key)
                build_lock = _LUT_BUILD_LOCKS.setdefault(key, threading.Lock())
            if packed is None:
                with build_lock:
                    with _LUT_CACHE_LOCK:
                        packed = _LUT_CACHE.get(key)
                    if packed is None:
                        packed = self._build_packed()
                        with _LUT_CACHE_LOCK:
                            _LUT_CACHE[key] = packed
                            while len(_LUT_CACHE) > _LUT_CACHE_SIZE:
                                _LUT_CACHE.popitem(last=False)
                            _LUT_BUILD_LOCKS.pop(key, None)
            self._lut = packed[..., :3]
        return self._lut

    def _gather(self, flat: NDArray[np.uint8], out: NDArray[np.uint8]) -> None:
        """``out[i] = lut[flat[i]]`` for ``(N, 3) uint8`` C-contiguous arrays, from the table
        (built on first use), one 4-byte word a pixel."""
        lut = self.lut()
        packed = lut.base
        if _LITTLE_ENDIAN and isinstance(packed, np.ndarray) and packed.shape == (256, 256, 256, 4):
            _gather_words_kernel()(flat, packed.reshape(-1, 4).view(np.uint32).reshape(-1), out)
        else:  # pragma: no cover - big-endian hosts: the bytes one by one
            _gather_kernel()(flat, lut, out)

    def has_cached_lut(self) -> bool:
        """True when this map's LUT is already built in this process."""
        if self._lut is not None:
            return True
        with _LUT_CACHE_LOCK:
            return self.cache_key() in _LUT_CACHE

    def _build_lut(self) -> NDArray[np.uint8]:
        """The table ``(256, 256, 256, 3) uint8``, per-pixel evaluation of every colour in 256 blocks
        of one red value (a map whose numpy math does not broadcast overrides :meth:`_build_packed`
        through this)."""
        lut = np.empty((256, 256, 256, 3), dtype=np.uint8)
        gb = np.indices((256, 256), dtype=np.uint8).reshape(2, -1).T  # (65536, 2): g, b

        def fill(r: int) -> None:
            block = np.empty((1 << _LUT_BLOCK_BITS, 3), dtype=np.uint8)
            block[:, 1:] = gb
            block[:, 0] = r
            lut[r] = self.evaluate_numpy(block).reshape(256, 256, 3)

        _in_parallel(fill)
        lut.flags.writeable = False
        return lut

    def _build_packed(self) -> NDArray[np.uint8]:
        """The 4-byte table ``(256, 256, 256, 4) uint8`` (colour, zero byte), read-only.

        A map that :attr:`broadcasts` is evaluated per block of one red value on the planes
        ``r: (1, 1)``, ``g: (256, 1)``, ``b: (1, 256)`` and written straight into the table: the
        Macenko table in 0.15 s instead of 0.57 s (plus 0.1-0.3 s to pack it), Reinhard's in 1.2 s
        instead of 2.3 s. Every element sees the float64 operations of :meth:`evaluate_numpy`,
        in the same order, so the values are the same.
        """
        if not self.broadcasts:
            return _packed(self._build_lut())
        packed = np.empty((256, 256, 256, 4), dtype=np.uint8)
        levels = np.arange(256, dtype=np.float64)
        green, blue = levels[:, None], levels[None, :]

        def fill(r: int) -> None:
            mapped = self._evaluate_channels(np, np.full((1, 1), float(r)), green, blue)
            block = packed[r]
            for c in range(3):
                block[..., c] = np.clip(np.rint(mapped[c]), 0.0, 255.0).astype(np.uint8)
            block[..., 3] = 0

        _in_parallel(fill)
        packed.flags.writeable = False
        return packed

    def apply(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Map a tile by LUT gather (fast CPU path, releases the GIL).

        Parameters
        ----------
        rgb : (..., 3) uint8, e.g. (H, W, 3)

        Returns
        -------
        out : (..., 3) uint8, a new array, bit-identical to :meth:`evaluate_numpy`
        """
        arr = _check_uint8_rgb(rgb)
        flat = np.ascontiguousarray(arr).reshape(-1, 3)
        if flat.shape[0] <= _DIRECT_MAX_PX and not self.has_cached_lut():
            return self.evaluate_numpy(arr)  # what the table would hold, without building it
        out = np.empty_like(flat)
        self._gather(flat, out)
        return out.reshape(arr.shape)

    __call__ = apply

    # -- torch ---------------------------------------------------------------
    def apply_torch(self, t: Any, *, use_lut: bool = False, dtype: Any = None) -> Any:
        """Map a torch tensor on its own device.

        Parameters
        ----------
        t : (..., 3) torch.uint8 tensor, any device
        use_lut : bool, keyword-only
            Gather from the LUT copied to the device (exact) instead of
            evaluating directly.
        dtype : torch float dtype, keyword-only
            Precision of direct evaluation; default ``torch.float32``.

        Returns
        -------
        out : (..., 3) torch.uint8 tensor on ``t.device``; within 1 grey level of
            :meth:`evaluate_numpy` (exact with ``use_lut=True``)
        """
        import torch

        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError(f"t must be a torch.uint8 tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
        if t.ndim < 1 or t.shape[-1] != 3:
            raise ValueError(f"t must have shape (..., 3), got {tuple(t.shape)}")
        flat = t.reshape(-1, 3)
        if use_lut:
            table = self.device_lut(t.device)
            idx = flat.to(torch.int64)
            return table[(idx[:, 0] << 16) | (idx[:, 1] << 8) | idx[:, 2]].reshape(t.shape)
        planar = flat.T.to(dtype or torch.float32)
        mapped = self._evaluate_channels(torch, planar[0], planar[1], planar[2])
        out = torch.stack([torch.clamp(torch.round(m), 0.0, 255.0) for m in mapped], dim=1).to(torch.uint8)
        return out.reshape(t.shape)

    def device_lut(self, device: Any) -> Any:
        """The table as a ``(256^3, 3) uint8`` tensor on ``device``, copied there once per map
        and process: every copy of the map (a distributed cluster unpickles one per block of the
        pyramid) shares it, as they share :meth:`lut`. The most recent few are kept."""
        import torch

        dev = torch.device(device)
        key = (self.cache_key(), str(dev))
        table = self._torch_luts.get(key[1])
        if table is not None:
            return table
        lut = self.lut()
        with _LUT_CACHE_LOCK:
            table = _DEVICE_LUTS.get(key)
            if table is None:
                table = torch.from_numpy(lut.reshape(-1, 3).copy()).to(dev)
                _DEVICE_LUTS[key] = table
                while len(_DEVICE_LUTS) > _LUT_CACHE_SIZE:
                    _DEVICE_LUTS.popitem(last=False)
            else:
                _DEVICE_LUTS.move_to_end(key)
        self._torch_luts[key[1]] = table
        return table

    # -- pickling --------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lut"] = None
        state["_torch_luts"] = {}
        state.pop("_cache_key", None)
        state.pop("_memo", None)  # a cache, as the table is
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class IdentityMap(ColorMap):
    """The identity (``--method none``): the benchmark baseline."""

    method: ClassVar[str] = "none"

    def _map_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        return [r, g, b]

    def apply(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Return a copy of ``rgb`` (no table needed)."""
        return _check_uint8_rgb(rgb).copy()

    __call__ = apply


class StainMatrixMap(ColorMap):
    """Macenko / Vahadane map: unmix with the source stains, rescale, remix with the target's.

    ``od = -log((rgb + 1) / (ws + 1))`` against the source white point ``ws``;
    ``conc = od @ pinv(M_src)``; ``conc *= max_conc_tgt / max_conc_src``;
    ``rgb' = (wt + 1) * exp(-conc @ M_tgt) - 1`` into the target white point ``wt``.
    The three steps are folded into one 3x3 matrix (``od' = od @ A``).  Glass
    (``rgb == ws``) has OD 0 and maps to ``wt`` exactly; a map from a slide's statistics
    to themselves is the identity on pixels that lie in the stain plane.

    Parameters
    ----------
    source_matrix, target_matrix : (2, 3) float, unit OD rows (H, E)
    source_max_conc, target_max_conc : (2,) float, > 0
    source_white, target_white : float or (3,) float, keyword-only
        White points (glass intensity per channel) of the source slide and of the target; 240.
    glass : GlassBlend, keyword-only, optional
        Only for ``mode="keep"`` (keep the source's glass); the map already takes glass to
        the target's white point.
    min_stain_angle_deg : float, keyword-only
        A source or target matrix whose rows are closer than this is singular.

    Raises
    ------
    FitError
        A singular stain matrix (nearly parallel rows) or non-positive maximum
        concentrations; the map would otherwise produce black or NaN.
    """

    method: ClassVar[str] = "stain_matrix"
    broadcasts: ClassVar[bool] = True

    def __init__(
        self,
        source_matrix: NDArray[np.float64],
        source_max_conc: NDArray[np.float64],
        target_matrix: NDArray[np.float64],
        target_max_conc: NDArray[np.float64],
        *,
        source_white: Any = DEFAULT_WHITE,
        target_white: Any = DEFAULT_WHITE,
        glass: GlassBlend | None = None,
        min_stain_angle_deg: float = 5.0,
    ) -> None:
        super().__init__(glass=glass)

        src = np.asarray(source_matrix, dtype=np.float64)
        tgt = np.asarray(target_matrix, dtype=np.float64)
        src_c = np.asarray(source_max_conc, dtype=np.float64)
        tgt_c = np.asarray(target_max_conc, dtype=np.float64)
        if src.shape != (2, 3) or tgt.shape != (2, 3) or src_c.shape != (2,) or tgt_c.shape != (2,):
            raise ValueError("stain matrices must be (2, 3) and max concentrations (2,)")
        check_stain_matrix(src, min_angle_deg=min_stain_angle_deg, what="colour map source")
        check_stain_matrix(tgt, min_angle_deg=min_stain_angle_deg, what="colour map target")
        if not (np.all(src_c > 0) and np.all(tgt_c > 0) and np.all(np.isfinite(src_c)) and np.all(np.isfinite(tgt_c))):
            raise FitError(f"colour map: max concentrations must be finite and > 0, got {src_c} and {tgt_c}")
        self.source_white = _white_channels(source_white)
        self.target_white = _white_channels(target_white)
        self.matrix = np.linalg.pinv(src) @ np.diag(tgt_c / src_c) @ tgt  # (3, 3): od' = od @ matrix
        if not np.all(np.isfinite(self.matrix)):
            raise FitError("colour map: the stain map is not finite (singular source stain matrix)")
        #: The exponential is taken per input channel (see ``_map_channels``) when no product of
        #: three factors can overflow or underflow: |od| <= log(256) for 8-bit input, so every
        #: exponent stays within +-_FACTOR_EXP_MAX when the matrix does (any plausible H&E map;
        #: a forced map from a degenerate fit takes the exponential of the sum).
        self.factorized = bool(3.0 * _MAX_ABS_OD * float(np.abs(self.matrix).max()) <= _FACTOR_EXP_MAX)

    def _map_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        m = self.matrix
        if not self.factorized:
            od = planar_od(xp, (r, g, b), self.source_white)
            mapped = [od[0] * float(m[0, j]) + od[1] * float(m[1, j]) + od[2] * float(m[2, j]) for j in range(3)]
            return planar_intensity(xp, mapped, self.target_white)
        # exp(-(od_r m_0j + od_g m_1j + od_b m_2j)) as the product of one exponential per input
        # channel, each looked up in a table of the 256 input levels: 9 exponentials of 256 values
        # per call instead of 3 per colour (the whole 256^3 table in 0.43 s instead of 0.87 on two
        # threads; a slide's pixels looked up, not exponentiated); the clip of the sum to
        # [_OD_MIN, _OD_MAX] becomes the same clip of the product
        if xp is np:
            levels, index = np.arange(256.0), [np.asarray(c).astype(np.intp) for c in (r, g, b)]
        else:  # torch: the tables on the planes' device, in their dtype
            levels = xp.arange(256, dtype=r.dtype, device=r.device)
            index = [c.long() for c in (r, g, b)]
        od = planar_od(xp, (levels, levels, levels), self.source_white)
        out = []
        for j, w in enumerate(self.target_white):
            e = (xp.exp(od[0] * -float(m[0, j]))[index[0]] * xp.exp(od[1] * -float(m[1, j]))[index[1]]
                 * xp.exp(od[2] * -float(m[2, j]))[index[2]])
            out.append((w + 1.0) * xp.clip(e, _E_MIN, _E_MAX) - 1.0)
        return out


class ReinhardMap(ColorMap):
    """Reinhard map: Lab ``(x - mean_src) / std_src * std_tgt + mean_tgt``, back to sRGB.

    Parameters
    ----------
    source_mean, source_std, target_mean, target_std : (3,) float, Lab statistics (std > 0)
    glass : GlassBlend, keyword-only, optional
        Hand glass over to the target's white (``mode="target"``) or keep it (``"keep"``).
    """

    method: ClassVar[str] = "reinhard"
    broadcasts: ClassVar[bool] = True
    memo_for_slides: ClassVar[bool] = True

    def __init__(
        self,
        source_mean: NDArray[np.float64],
        source_std: NDArray[np.float64],
        target_mean: NDArray[np.float64],
        target_std: NDArray[np.float64],
        *,
        glass: GlassBlend | None = None,
    ) -> None:
        super().__init__(glass=glass)
        sm, ss, tm, ts = (np.asarray(v, dtype=np.float64) for v in (source_mean, source_std, target_mean, target_std))
        if np.any(ss <= 0) or np.any(ts <= 0):
            raise FitError(f"colour map: Lab standard deviations must be > 0, got {ss} and {ts}")
        self.scale = ts / ss
        self.offset = tm - sm * self.scale

    def _map_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        if xp is np:  # 8-bit levels: their sRGB decoding looked up (the same values, 256 computed)
            table = srgb_linear_levels()
            lab = _lab_from_linear(np, *(table[np.asarray(c).astype(np.intp)] for c in (r, g, b)))
        else:
            lab = _lab_from_channels(xp, r / 255.0, g / 255.0, b / 255.0)
        lab = [lab[c] * float(self.scale[c]) + float(self.offset[c]) for c in range(3)]
        return [c * 255.0 for c in _channels_from_lab(xp, lab[0], lab[1], lab[2])]


class HistogramMap(ColorMap):
    """Histogram matching: one 256-entry table per channel.

    Parameters
    ----------
    tables : (3, 256) uint8; ``out[..., c] = tables[c][rgb[..., c]]``
    glass : GlassBlend, keyword-only, optional
        Hand glass over to the target's white (``mode="target"``) or keep it (``"keep"``).
    """

    method: ClassVar[str] = "histmatch"
    broadcasts: ClassVar[bool] = True

    def __init__(self, tables: NDArray[np.uint8], *, glass: GlassBlend | None = None) -> None:
        super().__init__(glass=glass)
        t = np.asarray(tables)
        if t.shape != (3, 256) or t.dtype != np.uint8:
            raise ValueError(f"tables must be (3, 256) uint8, got {t.shape} {t.dtype}")
        self.tables = t.copy()

    def _map_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        if xp is np:
            return [self.tables[c][ch.astype(np.intp)].astype(np.float64) for c, ch in enumerate((r, g, b))]
        tables = xp.as_tensor(self.tables, device=r.device).to(r.dtype)
        return [tables[c][ch.to(xp.int64)] for c, ch in enumerate((r, g, b))]
