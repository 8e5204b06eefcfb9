"""One slide end to end: fit slide-wide, compile the colour map, apply per chunk, write.

This is the layer the CLI and the Prefect flows call. The math lives in :mod:`wsi_norm.stain`
and :mod:`wsi_norm.colormap.maps`, reading in :mod:`wsi_norm.slide`, writing in
:mod:`wsi_norm.writers`; here they are put in order:

1. :func:`fit_slide`: sample tissue pixels over the whole slide (seeded) and fit the method's
   statistics once (never per tile).
2. :func:`fit_template`: the same for a reference slide or a cohort, aggregated robustly into a
   versioned :class:`~wsi_norm.stain.template.Template`.
3. :func:`normalize_slide`: compile the per-pixel colour map from source and target
   statistics, map it over the slide's chunks through dask, and stream the result into a
   pyramidal OME-Zarr or TIFF, recording everything that decided the result.

Because the map is a pure function of each pixel's RGB value, the output cannot depend on the
chunk size or chunk borders: there are no seams.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_norm.errors import FitError, OutputError, OutputExistsError, QCError, TemplateError
from wsi_norm.slide import Backend, Slide, open_slide
from wsi_norm.stain import ALL_METHODS, METHODS
from wsi_norm.stain.qc import (
    ColourReference,
    QCReport,
    check_fit,
    check_mapped,
    check_model_output,
    colour_reference,
    tissue_lab_mean,
)
from wsi_norm.tissue.sampling import (
    DEFAULT_N_PIXELS,
    MIN_TISSUE_PIXELS,
    TissueSample,
    sample_tissue_pixels,
)
from wsi_norm.tissue.whitepoint import WhitePoint
from wsi_norm.writers import WriterOptions
from wsi_norm.writers.atomic import refuse_overwriting_input

if TYPE_CHECKING:
    import dask.array as da

    from wsi_norm.stain.template import Template

__all__ = [
    "ALL_METHODS",
    "STAT_METHODS",
    "FitOptions",
    "NormalizeResult",
    "SlideFit",
    "WriterOptions",
    "fit_slide",
    "fit_template",
    "normalize_slide",
    "output_is_current",
    "request_fingerprint",
    "runs_in_memory",
    "runs_on_threads",
    "template_from_fits",
]

log = logging.getLogger(__name__)

#: Methods fitted from slides (the stain registry, :data:`wsi_norm.stain.METHODS`).
STAT_METHODS = METHODS
# A slide with fewer pixels than the 256^3 table has entries is evaluated directly, chunk by
# chunk; a larger one through a table: filled with its own colours on demand
# (ColorMap.memo_for_slides), else built whole once before the graph runs.
_LUT_WORTH_PX = 256**3
Device = Literal["cpu", "cuda", "auto"]
Glass = Literal["target", "keep"]
PathLike = str | Path
#: Version of the colour model an output was computed with; part of every fingerprint, so outputs
#: of an older model (glass passed through, fixed Io = 240) are never "current".
COLOUR_MODEL = 2


def _as_slide(source: PathLike | Slide, backend: Backend | None) -> Slide:
    return source if isinstance(source, Slide) else open_slide(source, backend=backend)


def _params_dict(params: Any) -> dict[str, Any]:
    """Parameters as recorded: every field except where the work ran (``device``)."""
    if params is None:
        return {}
    d = dict(params) if isinstance(params, Mapping) else dict(params.to_dict())
    d.pop("device", None)
    return d


def resolve_params(params: Any, *, seed: int | None = None, device: str | None = None) -> Any:
    """A :class:`~wsi_norm.stain.base.StainParams` from a mapping (unknown names raise),
    a StainParams, or None (the defaults); ``seed``/``device`` override when given."""
    import dataclasses

    from wsi_norm.stain.base import StainParams

    if params is None:
        resolved = StainParams()
    elif isinstance(params, StainParams):
        resolved = params
    elif isinstance(params, Mapping):
        try:
            resolved = StainParams.from_dict({**StainParams().to_dict(), **dict(params)})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method parameters: {exc}") from exc
    else:
        raise TypeError(f"params must be a mapping or StainParams, got {type(params).__name__}")
    changes: dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = seed
    if device is not None:
        changes["device"] = device
    return dataclasses.replace(resolved, **changes) if changes else resolved


@dataclass(frozen=True)
class FitOptions:
    """How a slide's statistics are sampled: one value from the command line or a manifest to
    :func:`fit_slide` (whose ``n_pixels`` and ``seed`` these are).

    Attributes
    ----------
    n_pixels : int
        Tissue pixels sampled slide-wide (:func:`wsi_norm.tissue.sample_tissue_pixels`).
    seed : int
        Seed of the sampling (and of the stochastic estimators).
    """

    n_pixels: int = DEFAULT_N_PIXELS
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.n_pixels, int) and self.n_pixels >= MIN_TISSUE_PIXELS):
            raise ValueError(f"n_pixels must be an integer >= {MIN_TISSUE_PIXELS} (the fewest tissue pixels a fit "
                             f"takes), got {self.n_pixels!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True)
class SlideFit:
    """Statistics of one slide, fitted slide-wide.

    Attributes
    ----------
    method : str
    stats : object
        The method's frozen statistics dataclass (``to_dict()``).
    identity : dict
        Source identity (name, size, header SHA-256) and the level-0 ``mpp`` ``[x, y]`` the slide
        was read with (the file's, or the one the caller assumed; None when neither).
    n_pixels : int
        Tissue pixels the fit used.
    seed : int
    tissue_fraction : float
        Coarse-mask tissue share (an upper estimate).
    params : dict
    white : WhitePoint
        The slide's white point (glass intensity per channel), measured or the fallback.
    reference : ColourReference
        Tissue Lab mean and default-Macenko stain vectors (what the QC gate checks).
    timings : dict
        Seconds spent sampling and fitting.
    pixels : (N, 3) uint8 or None
        The tissue pixels the fit sampled (kept so callers can measure them without sampling
        the slide again; not part of :meth:`to_dict`).
    blocks : (M, 3) float32 or None
        The 2 x 2 tissue block means sampled with them (not part of :meth:`to_dict`).
    n_pixels_requested : int or None
        The sampling size asked for (``n_pixels`` holds what the slide gave); None when
        unknown (a fit rebuilt from a record).
    codec : dict or None
        Macenko and Vahadane: what the codec-aware correction did
        (:class:`wsi_norm.stain.codec.CodecCorrection`); None for the other methods.
    non_stain_fraction : float
        Share of the sampled tissue pixels left out as not stain (black fill, black or green ink:
        :func:`wsi_norm.tissue.sampling.non_stain_absorbers`).
    """

    method: str
    stats: Any
    identity: dict[str, Any]
    n_pixels: int
    seed: int
    tissue_fraction: float
    params: dict[str, Any]
    white: WhitePoint
    reference: ColourReference
    timings: dict[str, float] = field(default_factory=dict)
    pixels: NDArray[np.uint8] | None = field(default=None, repr=False, compare=False)
    blocks: NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    n_pixels_requested: int | None = None
    codec: dict[str, Any] | None = None
    non_stain_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used in provenance)."""
        return {
            "codec_correction": self.codec,
            "method": self.method,
            "stats": self.stats.to_dict(),
            "identity": self.identity,
            "n_pixels": self.n_pixels,
            "n_pixels_requested": self.n_pixels_requested,
            "non_stain_fraction": self.non_stain_fraction,
            "seed": self.seed,
            "tissue_fraction": self.tissue_fraction,
            "params": self.params,
            "white_point": self.white.to_dict(),
            "reference": self.reference.to_dict(),
        }


def fit_slide(
    source: PathLike | Slide,
    *,
    method: str,
    params: Any = None,
    n_pixels: int = DEFAULT_N_PIXELS,
    seed: int = 0,
    backend: Backend | None = None,
) -> SlideFit:
    """Fit a method's statistics from tissue sampled over the whole slide.

    Parameters
    ----------
    source : path or Slide
    method : {"macenko", "vahadane", "reinhard", "histmatch", "gmm"}
    params : method parameters (dataclass or mapping), optional
    n_pixels : int
        Tissue pixels to sample.
    seed : int
        Seeds the sampling (and stochastic solvers): the same call gives the same numbers.
    backend : str, optional
        Slide reader.

    Returns
    -------
    SlideFit

    Raises
    ------
    FitError
        No or too little tissue, or a degenerate fit.

    Notes
    -----
    Macenko and Vahadane are fitted on the sample's 2 x 2 tissue block means (robust to JPEG's
    chroma subsampling, see :mod:`wsi_norm.tissue.sampling`), in optical density against the slide's
    white point (``params.white_point`` overrides the measured one); Reinhard, histogram
    matching and gmm on its tissue pixels (gmm in HSD against the same white point).
    """
    from concurrent.futures import ThreadPoolExecutor

    from wsi_norm.stain import STAIN_MATRIX_METHODS, StainParams, fit_stats
    from wsi_norm.stain.codec import CODEC_WINDOWS, codec_corrected

    if method not in STAT_METHODS:
        raise ValueError(f"cannot fit method {method!r}; choose one of {', '.join(STAT_METHODS)}")
    slide = _as_slide(source, backend)
    resolved = resolve_params(params, seed=seed)
    start = time.perf_counter()
    correct = method in STAIN_MATRIX_METHODS and resolved.codec_correction
    sample = sample_tissue_pixels(slide, n_pixels=n_pixels, seed=seed, keep_windows=CODEC_WINDOWS if correct else 0)
    if method != "histmatch" and _all_grey(sample.pixels):
        raise FitError(f"{slide.path}: every sampled tissue pixel is grey (R = G = B): a grayscale or "
                       f"single-channel image holds no stain colour for {method} to fit")
    white = sample.white if resolved.white_point is None else WhitePoint.fixed(resolved.white_point)
    sampled = time.perf_counter()
    data = sample.blocks if method in STAIN_MATRIX_METHODS and resolved.fit_on == "blocks" else sample.pixels
    codec: dict[str, Any] | None = None
    # the colour reference's stain vectors are the default Macenko estimate: reuse this fit's
    # when it is that estimate (same estimator settings, same blocks, same white point)
    default_fit = method == "macenko" and _estimator_settings(resolved) == _estimator_settings(StainParams())
    # the QC reference needs no fit of the method: its Lab mean, and for any other method its own
    # Macenko estimate, on a second thread while the method fits (numpy releases the GIL in both)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-norm-reference") as reference_pool:
        lab_mean = reference_pool.submit(tissue_lab_mean, sample.pixels)
        own_reference = None if default_fit else reference_pool.submit(
            lambda: colour_reference(sample.pixels, white=white, blocks=sample.blocks, lab_mean=lab_mean.result()))
        try:
            stats = fit_stats(method, data, resolved, white=white.array)
            if method in STAIN_MATRIX_METHODS:
                if correct:
                    stats, record = codec_corrected(
                        stats, lambda blocks: fit_stats(method, blocks, resolved, white=white.array), data=data,
                        windows=sample.kept_windows, white=white.array, coding=slide.jpeg_coding(), params=resolved,
                        seed=seed)
                    codec = record.to_dict()
                else:
                    codec = {"applied": False, "reason": "turned off (codec_correction: false)"}
            reference = own_reference.result() if own_reference is not None else colour_reference(
                sample.pixels, white=white, blocks=sample.blocks, stain_matrix=stats.stain_matrix,
                lab_mean=lab_mean.result())
        except FitError as exc:
            raise FitError(f"{slide.path}: {method} fit failed: {exc}") from exc
    done = time.perf_counter()
    log.info("%s: fitted %s on %d pixels (white point %s, %s)", slide.path, method, len(data),
             white.rgb, white.source)
    return SlideFit(
        method=method,
        stats=stats,
        identity={**slide.identity(), "mpp": list(slide.mpp) if slide.mpp else None},
        n_pixels=len(sample.pixels),
        seed=seed,
        tissue_fraction=sample.coarse_fraction,
        params=_params_dict(resolved),
        white=white,
        reference=reference,
        timings={"sample_s": sampled - start, "fit_s": done - sampled},
        pixels=sample.pixels,
        blocks=sample.blocks,
        n_pixels_requested=n_pixels,
        codec=codec,
        non_stain_fraction=sample.non_stain_fraction,
    )


def _all_grey(pixels: NDArray[np.uint8]) -> bool:
    """Every pixel has R = G = B (a grayscale slide, read as RGB)."""
    return bool(np.array_equal(pixels[:, 0], pixels[:, 1]) and np.array_equal(pixels[:, 1], pixels[:, 2]))


def _estimator_settings(p: Any) -> tuple[Any, ...]:
    """The StainParams fields that decide a Macenko estimate (given the pixels and white point)."""
    return (p.macenko_variant, p.alpha, p.beta, p.edge_band, p.edge_strong, p.max_od,
            p.max_conc_percentile, p.min_pixels, p.min_stain_angle_deg, p.codec_correction, p.fit_on)


def fit_template(
    sources: Sequence[PathLike | Slide],
    *,
    method: str,
    params: Any = None,
    n_pixels: int = DEFAULT_N_PIXELS,
    seed: int = 0,
    backend: Backend | None = None,
    force: bool = False,
) -> Template:
    """Fit a target template from one reference slide or a cohort.

    Each slide is fitted slide-wide; several are aggregated by :func:`wsi_norm.stain.aggregate_stats`
    (robust medians, see there).

    Returns
    -------
    Template

    Raises
    ------
    QCError
        The template is not plausible H&E or its white point is implausible (unless ``force``).
    """
    if not sources:
        raise ValueError("fit_template needs at least one slide")
    fits = [
        fit_slide(s, method=method, params=params, n_pixels=n_pixels, seed=seed, backend=backend)
        for s in sources
    ]
    template = template_from_fits(fits, params=params, seed=seed)
    report = check_template(template)
    if not report.passed and not force:
        names = ", ".join(str(f.identity.get("name")) for f in fits)
        raise QCError(f"{names}: template refused by the QC gate: {'; '.join(report.problems)} "
                      "(pass force=True / --force to keep it)")
    return template


def check_template(template: Template) -> QCReport:
    """The QC gate's fit check (:func:`wsi_norm.stain.qc.check_fit`) applied to a template."""
    from wsi_norm.stain import STAIN_MATRIX_METHODS

    if template.method in STAIN_MATRIX_METHODS:
        return check_fit(template.stats.stain_matrix, white=template.white, max_conc=template.stats.max_conc)
    if template.reference is not None:
        return check_fit(template.reference.matrix, white=template.white)
    return check_fit(None, white=template.white)


def _aggregate_white(fits: Sequence[SlideFit]) -> WhitePoint:
    """One slide's white point, or the per-channel median of the slides' white points that are not
    the fallback (measured from glass, or fixed by the ``white_point`` parameter, with that source);
    the median of all of them (source "fallback") only when every slide fell back.

    A fallback is a guess (240 in every channel: 14 grey levels off at the median on the
    benchmark's glass-free crops, against a 95th percentile of 4.6 for a white point measured from
    glass), so it does not dilute the measured ones: a cohort of scans and glass-free patches takes
    the scans' glass.
    """
    if len(fits) == 1:
        return fits[0].white
    used = [f for f in fits if f.white.source != "fallback"] or list(fits)
    rgb = np.median(np.stack([f.white.array for f in used]), axis=0)
    sources = {f.white.source for f in used}
    source = sources.pop() if len(sources) == 1 else "glass"
    return WhitePoint(tuple(rgb), source, sum(f.white.n_pixels for f in used))


def template_from_fits(fits: Sequence[SlideFit], *, params: Any = None, seed: int = 0) -> Template:
    """A template from slide fits already made: one slide's statistics, white point and colour
    reference, or the robust aggregate (:func:`wsi_norm.stain.aggregate_stats`, medians) of several.

    The template records each slide by file name and content hashes
    (:func:`wsi_norm.stain.template.slide_entry`; never its path) and only the parameters the
    method reads (:func:`wsi_norm.stain.method_params`).

    Raises
    ------
    ValueError
        No fits, or fits of different methods.
    """
    from wsi_norm import __version__
    from wsi_norm.stain import aggregate_stats, method_params
    from wsi_norm.stain.template import Template, slide_entry

    if not fits:
        raise ValueError("a template needs at least one slide fit")
    method = fits[0].method
    if any(f.method != method for f in fits):
        raise ValueError(f"fits of several methods: {sorted({f.method for f in fits})}")
    stats = fits[0].stats if len(fits) == 1 else aggregate_stats(method, [f.stats for f in fits])
    return Template(
        method=method,
        stats=stats,
        white=_aggregate_white(fits),
        reference=ColourReference.median([f.reference for f in fits]),
        params=method_params(method, resolve_params(params, seed=seed)),
        slides=[{**slide_entry(f.identity), **({"codec_correction": f.codec} if f.codec is not None else {})}
                for f in fits],
        n_pixels=sum(f.n_pixels for f in fits),
        seed=seed,
        wsi_norm_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        aggregation=None if len(fits) == 1 else "median",
    )


@dataclass(frozen=True)
class NormalizeResult:
    """What :func:`normalize_slide` did.

    Attributes
    ----------
    out : Path
        The finished output.
    source_fit : SlideFit or None
        Source statistics (None for ``none`` and ``stainnet``).
    target : Template or None
    provenance : dict
        What was recorded in the output.
    timings : dict
        Seconds per step (``fit_s``, ``write_s``, ``total_s``).
    shape : (rows, cols)
        Level-0 size.
    """

    out: Path
    source_fit: SlideFit | None
    target: Template | None
    provenance: dict[str, Any]
    timings: dict[str, float]
    shape: tuple[int, int]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def request_fingerprint(
    identity: Mapping[str, Any],
    *,
    method: str,
    params: Mapping[str, Any],
    target: Mapping[str, Any] | None,
    weights_sha256: str | None = None,
    glass: Glass = "target",
    fit: Mapping[str, Any] | None = None,
    writer: Mapping[str, Any] | None = None,
    reading: Mapping[str, Any] | None = None,
) -> str:
    """SHA-256 of what decides an output: source identity, method, parameters, target, glass
    handling, the colour model's version (:data:`COLOUR_MODEL`), the fit's sampling (size and
    seed), the writer options that change the stored pixels or format, and how the source
    was read (backend, MPP).

    The source is identified by size, modification time and sampled hash
    (:meth:`wsi_norm.slide.Slide.identity`; not its name or folder), the target by its whole
    document except creation time and tool version.
    """
    key = {
        "colour_model": COLOUR_MODEL,
        "glass": glass,
        "source": {k: identity.get(k) for k in ("size_bytes", "mtime_ns", "sampled_sha256")},
        "reading": None if reading is None else dict(reading),
        "fit": None if fit is None else dict(fit),
        "writer": None if writer is None else dict(writer),
        "method": method,
        "params": dict(params),
        "target": None
        if target is None
        else {k: v for k, v in target.items() if k not in ("created", "wsi_norm_version")},
        "weights": weights_sha256,
    }
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _request_parts(
    slide: Slide, out: Path, *, method: str, fit: FitOptions, glass: str, writer: WriterOptions
) -> dict[str, Any]:
    """The fingerprint's ``fit``, ``writer`` and ``reading`` parts of one request."""
    fit_part: dict[str, Any] | None = None
    if method in STAT_METHODS:
        fit_part = {"n_pixels": fit.n_pixels, "seed": fit.seed}
    elif method == "stainnet" and glass == "keep":
        fit_part = {"seed": fit.seed, "white_point_sample": {"n_pixels": 10_000, "n_windows": 32}}
    reading = {"backend": slide.backend, "mpp": None if slide.mpp is None else list(slide.mpp)}
    return {"fit": fit_part, "writer": writer.record(out), "reading": reading}


def output_is_current(
    out: PathLike,
    *,
    source: PathLike | Slide,
    method: str,
    params: Any = None,
    target: Template | None = None,
    weights: PathLike | None = None,
    fit: FitOptions = FitOptions(),
    writer: WriterOptions = WriterOptions(),
    backend: Backend | None = None,
    glass: Glass = "target",
) -> bool:
    """True when ``out`` is a complete output that records the same request.

    The arguments are those of :func:`normalize_slide`; everything that changes the output
    is compared through :func:`request_fingerprint` (source identity, method, parameters,
    target, weights, glass, sampling size and seed, writer options, reader and MPP).  The
    output is then checked from its metadata alone (:func:`wsi_norm.writers.verify.output_facts`:
    every level with its recorded shape, every chunk/shard or tile present).

    A missing, partial, damaged or foreign output is not current (the reason is logged).
    """
    from wsi_norm.writers import read_provenance
    from wsi_norm.writers.verify import output_facts

    out = Path(out)
    if not out.exists():
        return False
    try:
        record = read_provenance(out)
    except (OSError, ValueError, KeyError) as exc:
        log.info("%s: no readable provenance (%s); treating as stale", out, exc)
        return False
    slide = _as_slide(source, backend)
    resolved = {} if method in ("none", "stainnet") else _params_dict(resolve_params(params, seed=fit.seed))
    expected = request_fingerprint(
        slide.identity(),
        method=method,
        params=resolved,
        target=None if target is None else target.to_dict(),
        weights_sha256=_file_sha256(Path(weights)) if weights else None,
        glass=glass,
        **_request_parts(slide, out, method=method, fit=fit, glass=glass, writer=writer),
    )
    if record.get("fingerprint") != expected:
        log.info("%s: records another request (source, settings or target changed)", out)
        return False
    try:
        output_facts(out)
    except OutputError as exc:
        log.warning("%s: damaged, will be written again: %s", out, exc)
        return False
    return True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_device(device: Device) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return device


def _apply_block_torch(block: NDArray[np.uint8], cmap: Any, device: str) -> NDArray[np.uint8]:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(block)).to(device, non_blocking=True)
    return np.asarray(cmap.apply_torch(tensor).cpu().numpy())


def _apply_block(block: NDArray[np.uint8], cmap: Any) -> NDArray[np.uint8]:
    return np.asarray(cmap.apply(block))


def _evaluate_block(block: NDArray[np.uint8], cmap: Any) -> NDArray[np.uint8]:
    # the map's definition; its table holds exactly these values, so a table built meanwhile
    # (another slide's run in this process) gives the same bytes
    return np.asarray(cmap.apply(block) if cmap.has_cached_lut() else cmap.evaluate_direct(block))


def _memo_block(block: NDArray[np.uint8], cmap: Any) -> NDArray[np.uint8]:
    # each distinct colour evaluated once per process; the same bytes as the table (see above)
    return np.asarray(cmap.apply(block) if cmap.has_cached_lut() else cmap.evaluate_memo(block))


def apply_colormap(array: da.Array, cmap: Any, *, device: str = "cpu", direct: bool = False,
                   memo: bool = False) -> da.Array:
    """Map a colour map over every chunk of an ``(H, W, 3) uint8`` dask array (lazy).

    On ``cuda`` each chunk is moved to the GPU as uint8, mapped there, and moved back;
    the tasks ask for the ``GPU`` worker resource when the cluster declares one. On the CPU,
    all three ways give the same bytes (the table is built from the same evaluation,
    :meth:`~wsi_norm.colormap.ColorMap.lut`):

    * default: a gather from the map's 256^3 table (built on first use);
    * ``direct=True``: the map evaluated on each chunk's pixels
      (:meth:`~wsi_norm.colormap.ColorMap.evaluate_direct`), for an image of fewer than 256^3
      pixels;
    * ``memo=True``: each distinct colour evaluated once per process into a table filled on
      demand (:meth:`~wsi_norm.colormap.ColorMap.evaluate_memo`), for a slide of any size.
    """
    from dask.base import annotate

    # dask types Array.map_blocks through functools.wraps of the unannotated da.map_blocks
    if device == "cpu":
        apply = _memo_block if memo else _evaluate_block if direct else _apply_block
        return array.map_blocks(apply, cmap, dtype=np.uint8)  # type: ignore[arg-type,no-any-return]
    gpu = annotate(resources={"GPU": 1}) if _cluster_has_gpu() else contextlib.nullcontext()
    with gpu:
        return array.map_blocks(_apply_block_torch, cmap, device, dtype=np.uint8)  # type: ignore[arg-type,no-any-return]


def _no_cluster() -> bool:
    """No ``distributed`` client is active (dask would run on the threads of this process)."""
    from wsi_norm.cluster import active_client

    return active_client() is None


_BAND_PX = 1 << 20  # pixels per band of a small slide mapped in memory


def runs_in_memory(source: Slide, out: PathLike, *, device: str = "cpu",
                   writer: WriterOptions | None = None) -> bool:
    """True when :func:`normalize_slide` holds the slide in memory: fewer than 16.7 MP, written
    as TIFF, on the CPU, with no ``distributed`` client active. Such a run imports neither
    ``dask.array`` nor numba, and (given no scheduler) ``dask`` at all.

    Parameters
    ----------
    source : Slide
    out : path
        The output; its suffix (or ``writer.fmt``) gives the format.
    device : {"cpu", "cuda"}
        The resolved device (``"auto"`` counts as not ``"cpu"``).
    writer : WriterOptions, optional
    """
    width, height = source.dimensions
    fmt = (writer or WriterOptions()).format_of(out)
    return width * height < _LUT_WORTH_PX and device == "cpu" and fmt == "tiff" and _no_cluster()


#: Blocks of a :class:`~wsi_norm.pyramid.LazyLevel` level 0 computed at once, at most: each
#: holds ~24 MiB while it is read and mapped (a 1024 x 4096 block and its mapped copy).
_MAX_BLOCK_THREADS = 8


def runs_on_threads(*, device: str = "cpu") -> bool:
    """True when :func:`normalize_slide` computes a slide too large to hold in memory on this
    process's threads without dask (:class:`~wsi_norm.pyramid.LazyLevel`): on the CPU, with no
    ``distributed`` client active. Each block of level 0 is read in one piece and mapped; the
    run imports no ``dask.array``, and the output is the same bytes (TIFF and OME-Zarr alike)."""
    return device == "cpu" and _no_cluster()


def _lazy_level0(slide: Slide, cmap: Any, *, chunk_px: int, identity: bool, direct: bool,
                 memo: bool) -> Any:
    """Level 0 of ``slide`` mapped by ``cmap``, computed block by block on threads (see
    :func:`runs_on_threads`): the chunks of :meth:`Slide.to_dask`, the maps of
    :func:`apply_colormap` on the CPU."""
    from wsi_norm.pyramid import LazyLevel, regular_chunks
    from wsi_norm.runtime import usable_cpus

    width, height = slide.dimensions
    rows, cols = slide.chunk_shape(0, chunk_px=chunk_px)
    apply = _memo_block if memo else _evaluate_block if direct else _apply_block

    def compute(r0: int, r1: int, c0: int, c1: int) -> NDArray[np.uint8]:
        pixels = slide.read_region(0, x=c0, y=r0, width=c1 - c0, height=r1 - r0)
        return pixels if identity else apply(pixels, cmap)

    return LazyLevel((height, width, 3), regular_chunks(height, width, rows, cols), compute,
                     threads=max(2, min(_MAX_BLOCK_THREADS, usable_cpus())))


def _evaluate_in_bands(rgb: NDArray[np.uint8], cmap: Any) -> NDArray[np.uint8]:
    """The map evaluated over an in-memory image, in bands of rows on two threads: each pixel's
    value is the chunked path's (the map is per pixel). A map that costs more a colour than a
    lookup (``memo_for_slides``: Reinhard, gmm) evaluates the image's distinct colours once
    each instead (:meth:`~wsi_norm.colormap.ColorMap.evaluate_distinct`, the same values)."""
    from concurrent.futures import ThreadPoolExecutor

    if getattr(cmap, "memo_for_slides", False) and not cmap.has_cached_lut():
        return np.asarray(cmap.evaluate_distinct(rgb))
    rows = max(1, _BAND_PX // max(1, rgb.shape[1]))
    out = np.empty_like(rgb)

    def band(r0: int) -> None:
        out[r0 : r0 + rows] = _evaluate_block(rgb[r0 : r0 + rows], cmap)

    with ThreadPoolExecutor(2, thread_name_prefix="wsi-norm-map") as pool:
        list(pool.map(band, range(0, rgb.shape[0], rows)))
    return out


def _cluster_has_gpu() -> bool:
    from wsi_norm.cluster import active_client, has_gpu_workers

    client = active_client()
    return client is not None and has_gpu_workers(client)


def _load_target(
    method: str,
    target: Template | PathLike | None,
    reference: PathLike | Slide | None,
    *,
    params: Any,
    n_pixels: int,
    seed: int,
    backend: Backend | None,
    force: bool = False,
) -> Template:
    from wsi_norm.stain.template import Template, load_template

    if target is not None and reference is not None:
        raise ValueError("give either a target template or a reference slide, not both")
    if isinstance(target, Template):
        if target.method != method:
            raise TemplateError(f"template is for method {target.method!r}, not {method!r}")
        return target
    if target is not None:
        return load_template(target, method=method)
    if reference is not None:
        return fit_template([reference], method=method, params=params, n_pixels=n_pixels,
                            seed=seed, backend=backend, force=force)
    raise ValueError(f"method {method!r} needs a target template or a reference slide")


def _check_source_fit(fit: SlideFit, slide: Slide, method: str, params: Mapping[str, Any],
                      *, n_pixels: int, seed: int) -> None:
    """A reused fit must be this slide's fit of this method with these parameters and sampling."""
    problems = []
    if fit.method != method:
        problems.append(f"it is a {fit.method!r} fit, not {method!r}")
    identity = slide.identity()
    keys = ("size_bytes", "mtime_ns", "sampled_sha256")
    if any(fit.identity.get(k) != identity.get(k) for k in keys):
        problems.append(f"it was fitted on {fit.identity.get('path') or fit.identity.get('name')!r} "
                        f"({', '.join(f'{k} {fit.identity.get(k)}' for k in keys)}), not on this file "
                        f"({', '.join(f'{k} {identity.get(k)}' for k in keys)})")
    if dict(fit.params) != dict(params):
        differ = sorted(k for k in set(fit.params) | set(params) if fit.params.get(k) != params.get(k))
        problems.append("it was fitted with other parameters ("
                        + ", ".join(f"{k}: {fit.params.get(k)!r} vs {params.get(k)!r}" for k in differ) + ")")
    if fit.seed != seed:
        problems.append(f"it was sampled with seed {fit.seed}, this request uses {seed}")
    if fit.n_pixels_requested is not None and fit.n_pixels_requested != n_pixels:
        problems.append(f"it sampled n_pixels={fit.n_pixels_requested}, this request asks for {n_pixels}")
    if problems:
        raise ValueError(f"{slide.path}: source_fit does not belong to this request: {'; '.join(problems)}")


def compile_checked(
    fit: SlideFit,
    template: Template,
    params: Any = None,
    *,
    glass: Glass = "target",
    force: bool = False,
    what: str = "slide",
) -> tuple[Any, QCReport]:
    """Compile a slide's colour map to a template, through the QC gate.

    Checks the source fit and the template (:func:`wsi_norm.stain.qc.check_fit`), compiles the map,
    pushes the fit's sampled tissue through it and checks where it lands
    (:func:`wsi_norm.stain.qc.check_mapped`, skipped for templates without a colour reference).

    Parameters
    ----------
    fit : SlideFit
    template : Template
    params : StainParams or mapping, optional
    glass : {"target", "keep"}, keyword-only
    force : bool, keyword-only
        Return the map even when a check fails (the report says ``forced``).
    what : str, keyword-only
        The slide's name for messages.

    Returns
    -------
    (ColorMap, QCReport)

    Raises
    ------
    QCError
        A check failed and ``force`` is False; the message names the slide and the numbers.
    FitError
        The map cannot be compiled (a singular stain matrix).
    """
    from wsi_norm.colormap import compile_colormap
    from wsi_norm.stain import STAIN_MATRIX_METHODS

    stain_params = resolve_params(params)
    source_check = check_fit(
        fit.stats.stain_matrix if fit.method in STAIN_MATRIX_METHODS else fit.reference.matrix,
        white=fit.white,
        max_conc=fit.stats.max_conc if fit.method in STAIN_MATRIX_METHODS else None,
    )
    report = QCReport([f"source: {p}" for p in source_check.problems],
                      {f"source_{k}": v for k, v in source_check.measures.items()})
    target_check = check_template(template)
    report = report.merged(QCReport([f"target: {p}" for p in target_check.problems],
                                    {f"target_{k}": v for k, v in target_check.measures.items()}))
    try:
        cmap = compile_colormap(fit.method, fit.stats, template.stats, stain_params,
                                source_white=fit.white.array, target_white=template.white.array, glass=glass)
    except FitError as exc:
        raise FitError(f"{what}: cannot map to the target: {exc}") from exc
    if template.reference is not None and fit.pixels is not None:
        mapped = cmap.evaluate_numpy(_qc_subsample(fit.pixels))
        stains = template.stats.stain_matrix if template.method in STAIN_MATRIX_METHODS else None
        report = report.merged(check_mapped(mapped, template.reference, target_white=template.white,
                                            target_stains=stains, gate_overshoot=stains is not None))
    else:
        report = report.merged(QCReport(measures={"mapped_check": "skipped: the template has no colour reference"}))
    if not report.passed:
        if not force:
            raise QCError(f"{what}: QC gate refused the normalization ({fit.method}): "
                          f"{'; '.join(report.problems)}; pass --force (force=True) to write it anyway")
        log.warning("%s: QC gate failed but forced: %s", what, "; ".join(report.problems))
        report = QCReport(report.problems, report.measures, forced=True)
    return cmap, report


def _model_sample(slide: Slide, *, seed: int, required: bool) -> TissueSample | None:
    """The tissue sample a model's run needs: 10,000 pixels, from 32 tissue and 16 glass windows
    when it is ``required`` (the white point of kept glass), else from 16 and 4 (only for
    :func:`_check_model_output`: ~0.2 s on a 6.6-MP slide, most of it the coarse mask). A slide
    without tissue gives None, unless the sample is ``required``."""
    try:
        if required:
            return sample_tissue_pixels(slide, n_pixels=10_000, n_windows=32, seed=seed)
        return sample_tissue_pixels(slide, n_pixels=10_000, n_windows=16, n_glass_windows=4, seed=seed)
    except FitError:
        if required:
            raise
        return None


def _check_model_output(cmap: Any, sample: TissueSample | None, *, what: str) -> QCReport:
    """:func:`wsi_norm.stain.qc.check_model_output` of the sample through ``cmap``; a problem is
    logged as a warning (the output is written as the model computes it)."""
    if sample is None:
        return QCReport(measures={"gate": "not measured: no tissue sampled (every pixel has gray > 200)"})
    glass = cmap.evaluate_numpy(np.asarray([np.rint(sample.white.array)], dtype=np.uint8))[0]
    report = check_model_output(cmap.evaluate_numpy(sample.pixels), white=glass.astype(np.float64))
    if not report.passed:
        log.warning("%s: the model's output does not look like H&E: %s (written as the model computes "
                    "it: is the model made for this kind of slide?)", what, "; ".join(report.problems))
    return report


def _qc_subsample(pixels: NDArray[np.uint8], n: int = 200_000) -> NDArray[np.uint8]:
    if len(pixels) <= n:
        return pixels
    return pixels[np.random.default_rng(0).choice(len(pixels), n, replace=False)]


def _claims_output(fn: Callable[..., NormalizeResult]) -> Callable[..., NormalizeResult]:
    """Run ``fn(source, out, **options)`` holding the claim on ``out`` from the start (before
    the fit), so a second writer of the same output is refused at once, not after its fit."""
    import functools

    @functools.wraps(fn)
    def claimed(source: PathLike | Slide, out: PathLike, **options: Any) -> NormalizeResult:
        from wsi_norm.writers.atomic import claim_output

        with claim_output(Path(out)):
            return fn(source, out, **options)

    return claimed


@_claims_output
def normalize_slide(
    source: PathLike | Slide,
    out: PathLike,
    *,
    method: str,
    target: Template | PathLike | None = None,
    reference: PathLike | Slide | None = None,
    params: Any = None,
    weights: PathLike | None = None,
    fit: FitOptions = FitOptions(),
    writer: WriterOptions = WriterOptions(),
    device: Device = "cpu",
    chunk_px: int = 1024,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    backend: Backend | None = None,
    source_fit: SlideFit | None = None,
    glass: Glass = "target",
    force: bool = False,
) -> NormalizeResult:
    """Normalize a slide and write it as a pyramidal OME-Zarr or TIFF.

    Parameters
    ----------
    source : path or Slide
    out : path
        ``*.ome.zarr`` / ``*.zarr`` or ``*.tif`` / ``*.tiff`` (or pass ``fmt``). Written as
        ``out.partial`` and renamed when complete.
    method : {"macenko", "vahadane", "reinhard", "histmatch", "gmm", "stainnet", "none"}
        ``none`` copies the slide through the same read and write path (the baseline).
    target : Template or path, optional
        Target statistics (a template JSON from ``wsi-norm fit``).
    reference : path or Slide, optional
        A reference slide or image to fit the target from instead.
    params : optional
        Method parameters (dataclass or mapping); defaults per method.
    weights : path, optional
        StainNet weights (``.pth`` or ``.safetensors``).
    device : {"cpu", "cuda", "auto"}
    chunk_px : int
        Level-0 chunk side (rounded to whole source tiles). Does not change the output.
    fit : FitOptions
        Slide-wide sampling for the fits (and the target's, when fitted from ``reference``).
    writer : WriterOptions
        Format, TIFF tile, compression and quality, zarr format.
    overwrite : bool
        Replace an existing ``out``.
    progress : callable ``(done_chunks, total_chunks)``, optional
    backend : str, optional
        Slide reader.
    source_fit : SlideFit, optional
        Reuse a fit already made (the flows fit in their own task); it must be this slide's
        fit of ``method``.
    glass : {"target", "keep"}
        ``target`` (default): glass is rendered in the target's white point (StainNet: as the
        published model maps it); ``keep``: the source's glass is kept, blended smoothly.
    force : bool
        Write even when the QC gate fails (the failure is recorded in provenance).

    Returns
    -------
    NormalizeResult

    Raises
    ------
    OutputExistsError
        ``out`` exists and ``overwrite`` is False (checked before any work).
    OutputBusyError
        Another run is writing ``out`` (checked before any work: the whole call holds the
        claim on ``out``, see :func:`wsi_norm.writers.atomic.claim_output`).
    QCError
        The source fit, the target or the compiled map fails the QC gate (before any pixel
        is written), unless ``force``.
    SlideOpenError, SlideReadError, FitError, TemplateError, WeightsError, OutputError
    """
    from wsi_norm import __version__
    from wsi_norm.writers import write_pyramid

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    dev = _resolve_device(device)
    slide = _as_slide(source, backend)
    refuse_overwriting_input(out, slide.path, "source slide")
    if reference is not None:
        refuse_overwriting_input(out, reference.path if isinstance(reference, Slide) else Path(reference),
                                 "reference slide")
    identity = slide.identity()
    if glass not in ("target", "keep"):
        raise ValueError(f"glass must be 'target' or 'keep', got {glass!r}")
    width, height = slide.dimensions
    small = width * height < _LUT_WORTH_PX
    # a small slide written as TIFF without a cluster is held in memory: its tiles are decoded
    # once for the fit's windows and the write, and it is written without dask.array or numba
    # (0.5 s of imports for a biopsy); the same pixels and the same file as the chunked path
    in_memory = runs_in_memory(slide, out, device=dev, writer=writer)
    with slide.hold_level0() if in_memory else contextlib.nullcontext() as held:
        template: Template | None = None
        slide_fit: SlideFit | None = None
        weights_sha: str | None = None
        resolved: dict[str, Any] = {}
        qc = QCReport(measures={"gate": "not applicable (no fitted statistics)"})
        whites: dict[str, Any] = {}
        if method == "none":
            from wsi_norm.colormap.maps import IdentityMap

            cmap: Any = IdentityMap()
        elif method == "stainnet":
            from wsi_norm.colormap.maps import GlassBlend
            from wsi_norm.colormap.stainnet import load_stainnet_map

            if weights is None:
                raise ValueError("method 'stainnet' needs weights (--weights FILE)")
            blend = None
            # a small sample: the white point (kept glass) and the output's plausibility check
            sample = _model_sample(slide, seed=fit.seed, required=glass == "keep")
            if glass == "keep":
                assert sample is not None
                whites = {"source": sample.white.to_dict()}
                blend = GlassBlend.for_whites("keep", sample.white.array, sample.white.array)
            cmap = load_stainnet_map(weights, glass=blend)
            weights_sha = _file_sha256(Path(weights))
            qc = _check_model_output(cmap, sample, what=str(slide.path))
        else:
            stain_params = resolve_params(params, seed=fit.seed)
            resolved = _params_dict(stain_params)
            template = _load_target(method, target, reference, params=params, n_pixels=fit.n_pixels,
                                    seed=fit.seed, backend=backend, force=force)
            if source_fit is not None:
                _check_source_fit(source_fit, slide, method, resolved, n_pixels=fit.n_pixels, seed=fit.seed)
            slide_fit = source_fit or fit_slide(slide, method=method, params=params, n_pixels=fit.n_pixels,
                                                seed=fit.seed)
            cmap, qc = compile_checked(slide_fit, template, stain_params, glass=glass, force=force,
                                       what=str(slide.path))
            whites = {"source": slide_fit.white.to_dict(), "target": template.white.to_dict()}
        # a small slide's pixels are evaluated directly: fewer than the table's 256^3 entries; a
        # larger slide's distinct colours once each (a slide holds far fewer than 256^3), unless
        # the map keeps its whole table; the identity is no work at all (the copy streams the
        # slide's own chunks)
        direct = small
        memo = not small and bool(getattr(cmap, "memo_for_slides", False))
        if dev == "cpu" and not (direct or memo) and method != "none":
            cmap.lut()  # compile once here; every copy of the map in this process reuses it
        elif dev == "cpu" and memo and slide_fit is not None and slide_fit.pixels is not None:
            # the sample's colours (the slide's commonest) in one batch: the chunks then meet
            # fewer new colours, evaluated in small batches at ~10 x the cost a colour
            cmap.evaluate_memo(slide_fit.pixels)
        t_fit = time.perf_counter()

        normalized: Any
        if held is not None:
            level0: Any = held
            normalized = level0 if method == "none" else _evaluate_in_bands(level0, cmap)
        elif runs_on_threads(device=dev):
            level0 = normalized = _lazy_level0(slide, cmap, chunk_px=chunk_px, identity=method == "none",
                                               direct=direct, memo=memo)
        else:
            level0 = slide.to_dask(0, chunk_px=chunk_px)
            normalized = level0 if method == "none" else apply_colormap(level0, cmap, device=dev, direct=direct, memo=memo)
        provenance: dict[str, Any] = {
            "tool": "wsi-norm",
            "wsi_norm_version": __version__,
            "fingerprint": request_fingerprint(
                identity,
                method=method,
                params=resolved,
                target=None if template is None else template.to_dict(),
                weights_sha256=weights_sha,
                glass=glass,
                **_request_parts(slide, out, method=method, fit=fit, glass=glass, writer=writer),
            ),
            "method": method,
            "params": resolved,
            "source": {**identity, "backend": slide.backend, "vendor": slide.vendor,
                       "dimensions": list(slide.dimensions),
                       "mpp": list(slide.mpp) if slide.mpp else None,
                       "objective_power": slide.objective_power,
                       "scanner": slide.scanner_metadata()},
            "source_fit": None if slide_fit is None else slide_fit.to_dict(),
            "target": None if template is None else template.to_dict(),
            "weights": None if weights is None else {"path": str(weights), "sha256": weights_sha},
            "device": dev,
            "chunk_px": list(slide.chunk_shape(0, chunk_px=chunk_px)),
            "colour_model": COLOUR_MODEL,
            "white_point": whites,
            "glass": glass,
            "qc": qc.to_dict(),
            "map": cmap.notes(),
            "background_rule": "gray > 200 (rounded ITU-R 601 luma) chooses the pixels statistics are "
            "fitted on; every pixel is mapped by one continuous map",
        }
        written = write_pyramid(
            normalized,
            out,
            mpp=slide.mpp,
            provenance=provenance,
            overwrite=overwrite,
            progress=progress,
            chunk_shape=slide.chunk_shape(0, chunk_px=chunk_px) if held is not None else None,
            # a copy keeps the source's colours, so it keeps what they mean; a map's output is
            # the target's RGB, which no profile of the source describes
            icc_profile=slide.icc_profile if method == "none" else None,
            **writer.kwargs(),
        )
        t_end = time.perf_counter()
        timings = {"fit_s": t_fit - t0, "write_s": t_end - t_fit, "total_s": t_end - t0}
        log.info("%s -> %s (%s) in %.1f s", slide.path, written, method, timings["total_s"])
        return NormalizeResult(
            out=written,
            source_fit=slide_fit,
            target=template,
            provenance=provenance,
            timings=timings,
            shape=(int(level0.shape[0]), int(level0.shape[1])),
        )
