"""StainNet training data from slides: teacher colour maps fitted slide-wide, or registered pairs.

StainNet (a per-pixel network) learns to imitate a colour map.  Here the training pairs come
from whole slides:

* :func:`teacher_pairs` -- tissue pixels sampled over the whole slide
  (:func:`~wsi_norm.tissue.sampling.sample_tissue_pixels`), the teacher's (Macenko or Vahadane)
  source statistics fitted on them, and the teacher's colour map to a target template
  applied to the same pixels;
* :func:`registered_pairs` -- the same pixel positions read from two registered slides (the
  same tissue scanned or stained twice);

and :func:`train_from_pairs` pools the pairs of many slides and trains with
:func:`~wsi_norm.stainnet.train.train_stainnet`, holding out whole slides when there are at
least three (a pixel fraction otherwise).  :func:`distill_stainnet` and
:func:`distill_from_pairs` chain the two steps.

Slide I/O happens in the pair functions (through dask, as in sampling); training is pure.
The same slides, template, settings and seed give the same model on CPU (see
:mod:`wsi_norm.stainnet.train` for determinism).

References
----------
Kang H, Luo D, Feng W, et al. "StainNet: A Fast and Robust Stain Normalization Network."
Frontiers in Medicine 8 (2021): 746307. doi:10.3389/fmed.2021.746307 (StainNet distilled from
a slide-wide teacher).
Macenko M, et al. "A method for normalizing histology slides for quantitative analysis."
ISBI 2009.  Vahadane A, et al. "Structure-preserving color normalization and sparse stain
separation for histological images." IEEE TMI 35(8), 2016.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_norm.colormap.stainnet import StainNetMetadata, StainNetWeights
from wsi_norm.errors import FitError, TemplateError
from wsi_norm.stain import STAIN_MATRIX_METHODS
from wsi_norm.stainnet.train import EpochRecord, Optimizer, TrainResult, train_stainnet

if TYPE_CHECKING:
    from wsi_norm.slide import Slide
    from wsi_norm.stain.template import Template

__all__ = [
    "DEFAULT_N_PIXELS_PER_SLIDE",
    "TEACHERS",
    "SlidePairs",
    "distill_from_pairs",
    "distill_stainnet",
    "heldout_l1",
    "registered_pairs",
    "target_summary",
    "teacher_pairs",
    "train_from_pairs",
]

log = logging.getLogger(__name__)

TEACHERS = STAIN_MATRIX_METHODS
"""Colour maps that can teach StainNet (stain-matrix methods)."""

DEFAULT_N_PIXELS_PER_SLIDE = 200_000
MIN_HOLDOUT_SLIDES = 3
"""With at least this many slides, whole slides are held out for validation."""

PathLike = str | os.PathLike[str]
Teacher = Literal["macenko", "vahadane"]
Holdout = Literal["auto", "slides", "pixels"]


@dataclass(frozen=True)
class SlidePairs:
    """Training pairs taken from one slide.

    Attributes
    ----------
    inputs : (N, 3) uint8
        Source tissue pixels.
    targets : (N, 3) uint8
        What they should become (teacher output or the registered target slide's pixels).
    identity : dict
        The source slide's :meth:`~wsi_norm.slide.Slide.identity` (name, path, size, header SHA-256).
    teacher : str
        ``"macenko"``, ``"vahadane"`` or ``"registered pairs"``.
    target_identity : dict or None
        For registered pairs, the target slide's identity.
    """

    inputs: NDArray[np.uint8]
    targets: NDArray[np.uint8]
    identity: dict[str, Any]
    teacher: str
    target_identity: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("inputs", "targets"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
                raise TypeError(f"{name} must be a uint8 array, got {getattr(arr, 'dtype', type(arr))}")
            if arr.ndim != 2 or arr.shape[1] != 3:
                raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
        if self.inputs.shape != self.targets.shape:
            raise ValueError(f"inputs {self.inputs.shape} and targets {self.targets.shape} differ in shape")

    @property
    def name(self) -> str:
        """The source slide's file name."""
        return str(self.identity.get("name", "?"))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


# --------------------------------------------------------------------------- pairs from slides


def _open(source: PathLike | Slide, backend: str | None) -> Slide:
    from wsi_norm.slide import Slide, open_slide

    return source if isinstance(source, Slide) else open_slide(source, backend=backend)  # type: ignore[arg-type]


def _resolve_target(target: Template | PathLike, teacher: str) -> Template:
    """The target template of ``teacher`` (loading a path); another method: TemplateError."""
    from wsi_norm.stain.template import Template, load_template

    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
    if isinstance(target, Template):
        if target.method != teacher:
            raise TemplateError(
                f"target template is for method {target.method!r}, but the teacher is {teacher!r}; "
                f"fit a {teacher} template (wsi-norm fit --method {teacher})"
            )
        return target
    return load_template(os.fspath(target), method=teacher)


def target_summary(template: Template) -> str:
    """Compact JSON describing a template (method, statistics, slides, seed) for model metadata."""
    doc = {
        "method": template.method,
        "stats": template.stats.to_dict(),
        "slides": [s.get("name") or s.get("path") for s in template.slides],
        "n_pixels": template.n_pixels,
        "seed": template.seed,
        "created": template.created,
    }
    return json.dumps(doc, separators=(",", ":"), default=_round_json)


def _round_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def teacher_pairs(
    source: PathLike | Slide,
    *,
    teacher: Teacher,
    target: Template | PathLike,
    n_pixels: int = DEFAULT_N_PIXELS_PER_SLIDE,
    seed: int = 0,
    params: Any = None,
    backend: str | None = None,
) -> SlidePairs:
    """Tissue pixels of one slide and the teacher's colours for them.

    The teacher's source statistics are fitted on tissue sampled over the whole slide (never
    one tile), the teacher's colour map to ``target`` is compiled, and the same pixels are
    mapped with it.

    Parameters
    ----------
    source : path or Slide
    teacher : {"macenko", "vahadane"}, keyword-only
    target : Template or path of a template JSON, keyword-only
        Target statistics; must be of the teacher's method.
    n_pixels : int, keyword-only
        Tissue pixels sampled from the slide.
    seed : int, keyword-only
        Seeds the sampling and the teacher's fit.
    params : mapping or StainParams, optional, keyword-only
        Teacher parameters (:func:`wsi_norm.pipeline.resolve_params`); default the defaults.
    backend : str, optional, keyword-only
        Slide reader.

    Returns
    -------
    SlidePairs
        ``inputs`` the sampled tissue pixels, ``targets`` the teacher's colours (uint8).

    Raises
    ------
    FitError
        The slide holds too little tissue, or the teacher's fit is degenerate.
    TemplateError
        ``target`` is unreadable or of another method.
    SlideOpenError
        The slide cannot be opened.
    """
    from wsi_norm.pipeline import fit_slide, resolve_params

    template = _resolve_target(target, teacher)
    slide = _open(source, backend)
    resolved = resolve_params(params, seed=seed)
    fit = fit_slide(slide, method=teacher, params=resolved, n_pixels=n_pixels, seed=seed)
    return _map_pairs(slide, _kept_pixels(fit.pixels), teacher, fit.stats, fit.white.array, template,
                      resolved)


#: Glass pairs added per tissue pair: the student must learn glass too (StainNet maps every pixel);
#: at 2 % a 2-epoch student left glass 16 levels off in green, at 15 % within 3.
_GLASS_SHARE = 0.15


def _glass_pixels(white: NDArray[np.float64], n: int, seed: int) -> NDArray[np.uint8]:
    """``n`` colours around a white point (+-3 levels per channel): the slide's glass."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(white + rng.uniform(-3.0, 3.0, (n, 3))), 0, 255).astype(np.uint8)


def _kept_pixels(pixels: NDArray[np.uint8] | None) -> NDArray[np.uint8]:
    """``SlideFit.pixels`` of a fresh :func:`~wsi_norm.pipeline.fit_slide`, which always keeps them."""
    assert pixels is not None, "fit_slide keeps the pixels it sampled"
    return pixels


def _map_pairs(
    slide: Slide, pixels: NDArray[np.uint8], teacher: str, source_stats: Any, source_white: NDArray[np.float64],
    template: Template, params: Any,
) -> SlidePairs:
    """The teacher's colours for ``pixels`` and for the slide's glass: the map from
    ``source_stats`` (white point ``source_white``) to the template (its white point)."""
    from wsi_norm.colormap import compile_colormap
    from wsi_norm.stainnet.train import pairs_from_teacher

    try:
        cmap = compile_colormap(teacher, source_stats, template.stats, params,
                                source_white=source_white, target_white=template.white.array)
    except FitError as exc:
        raise FitError(f"{slide.path}: {teacher} teacher map failed: {exc}") from exc
    glass = _glass_pixels(source_white, max(1, int(_GLASS_SHARE * len(pixels))), seed=len(pixels))
    inputs, targets = pairs_from_teacher(np.concatenate([pixels, glass]), cmap.evaluate_numpy)
    log.info("%s: %d %s teacher pairs", slide.path, len(inputs), teacher)
    return SlidePairs(inputs=inputs, targets=targets, identity=slide.identity(), teacher=teacher)


def registered_pairs(
    source: PathLike | Slide,
    target: PathLike | Slide,
    *,
    n_pixels: int = DEFAULT_N_PIXELS_PER_SLIDE,
    seed: int = 0,
    backend: str | None = None,
) -> SlidePairs:
    """Pixels at the same positions of two registered slides (the same tissue, two stainings).

    Windows are chosen on the source as by :func:`~wsi_norm.tissue.sampling.sample_tissue_pixels`
    (slide-wide, stratified, seeded); each is read from both slides at the same level-0
    origin, and a seeded subset of the positions that are tissue on the source is kept.

    Parameters
    ----------
    source, target : path or Slide
        Level-0 pixel grids must coincide (same dimensions; registration is the caller's job).
    n_pixels : int, keyword-only
        Pixel pairs wanted.
    seed : int, keyword-only
    backend : str, optional, keyword-only

    Returns
    -------
    SlidePairs
        ``teacher`` is ``"registered pairs"``.

    Raises
    ------
    FitError
        The slides differ in size, or the source holds too little tissue.
    """
    from dask.base import compute
    from dask.delayed import delayed

    from wsi_norm.tissue.sampling import sample_tissue_pixels

    src = _open(source, backend)
    tgt = _open(target, backend)
    if src.dimensions != tgt.dimensions:
        raise FitError(
            f"{tgt.path}: registered target is {tgt.dimensions[0]}x{tgt.dimensions[1]} px, "
            f"source {src.path} is {src.dimensions[0]}x{src.dimensions[1]} px"
        )
    sample = sample_tissue_pixels(src, n_pixels=n_pixels, seed=seed)
    windows, window_px = sample.windows, sample.window_px
    per_window = 4 * math.ceil(n_pixels / max(len(windows), 1))
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31, size=len(windows))
    tasks = [
        delayed(_paired_window)(src, tgt, int(x), int(y), window_px, per_window, int(s))
        for (x, y), s in zip(windows, seeds, strict=True)
    ]
    parts = compute(*tasks)  # type: ignore[no-untyped-call]  # dask.base.compute is unannotated
    inputs = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 3), np.uint8)
    targets = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, 3), np.uint8)
    if len(inputs) > n_pixels:
        keep = rng.choice(len(inputs), size=n_pixels, replace=False)
        inputs, targets = inputs[keep], targets[keep]
    if len(inputs) < 2:
        raise FitError(f"{src.path}: no tissue pixels found for registered pairs")
    log.info("%s + %s: %d registered pairs", src.path, tgt.path, len(inputs))
    return SlidePairs(
        inputs=np.ascontiguousarray(inputs),
        targets=np.ascontiguousarray(targets),
        identity=src.identity(),
        teacher="registered pairs",
        target_identity=tgt.identity(),
    )


def _paired_window(
    src: Slide, tgt: Slide, x: int, y: int, size: int, n: int, seed: int
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    from wsi_norm.tissue.mask import tissue_mask

    width, height = src.dimensions
    w, h = min(size, width - x), min(size, height - y)
    a = src.read_region(0, x=x, y=y, width=w, height=h)
    b = tgt.read_region(0, x=x, y=y, width=w, height=h)
    index = np.flatnonzero(tissue_mask(a))
    if len(index) > n:
        index = np.random.default_rng(seed).choice(index, size=n, replace=False)
    return a.reshape(-1, 3)[index], b.reshape(-1, 3)[index]


# --------------------------------------------------------------------------- training


def heldout_l1(model: StainNetWeights, inputs: NDArray[np.uint8], targets: NDArray[np.uint8]) -> float:
    """Mean L1 loss of ``model`` on pixel pairs, in the network's units (as in training).

    Parameters
    ----------
    model : StainNetWeights
    inputs, targets : (N, 3) uint8

    Returns
    -------
    float
        ``mean |y(x) - t|`` with ``x, t`` scaled to [-1, 1] and ``y`` the raw network output
        (multiply by 127.5 for grey levels).
    """
    x = inputs.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    t = targets.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    h = np.maximum(x @ model.conv0_weight.T + model.conv0_bias, np.float32(0.0))
    h = np.maximum(h @ model.conv1_weight.T + model.conv1_bias, np.float32(0.0))
    y = h @ model.conv2_weight.T + model.conv2_bias
    return float(np.abs(y - t).mean(dtype=np.float64))


def _slides_record(
    train: Sequence[SlidePairs], held: Sequence[SlidePairs], *, seed: int, holdout: str
) -> str:
    def entry(p: SlidePairs) -> dict[str, Any]:
        d: dict[str, Any] = {"name": p.name, "header_sha256": p.identity.get("header_sha256"), "n_pixels": len(p)}
        if p.target_identity is not None:
            d["target"] = {"name": p.target_identity.get("name"), "header_sha256": p.target_identity.get("header_sha256")}
        return d

    doc = {
        "slides": [entry(p) for p in train],
        "held_out_slides": [entry(p) for p in held],
        "holdout": holdout,
        "seed": seed,
    }
    return json.dumps(doc, separators=(",", ":"))


def train_from_pairs(
    pairs: Sequence[SlidePairs],
    *,
    target_template: str = "",
    holdout: Holdout = "auto",
    epochs: int = 20,
    batch_size: int = 4096,
    lr: float | None = None,
    optimizer: Optimizer = "adam",
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Pool the pairs of several slides and train StainNet, holding out slides or pixels.

    Parameters
    ----------
    pairs : sequence of SlidePairs
        One entry per slide, all with the same ``teacher``.
    target_template : str, keyword-only
        Summary of the target (stored in the model's metadata; see :func:`target_summary`).
    holdout : {"auto", "slides", "pixels"}, keyword-only
        ``"slides"``: the last ``max(1, round(val_fraction * n_slides))`` slides (in the
        given order) are held out whole, and the per-epoch held-out loss is theirs;
        ``"pixels"``: a seeded ``val_fraction`` of the pooled pixels; ``"auto"``: slides when
        there are at least 3, else pixels.
    epochs, batch_size, lr, optimizer, seed, device, progress
        Passed to :func:`~wsi_norm.stainnet.train.train_stainnet`.
    val_fraction : float in [0, 1), keyword-only
        Share of pixels (``"pixels"``) or slides (``"slides"``) held out; 0 holds out nothing.

    Returns
    -------
    TrainResult
        ``val_loss`` (and every ``EpochRecord.val_loss``) is the held-out L1 loss.  The
        metadata records the teacher, the target summary and every slide (name, header
        SHA-256, pixel count; held-out slides separately).

    Raises
    ------
    ValueError
        No pairs, mixed teachers, bad options.
    """
    if not pairs:
        raise ValueError("no slides to train on")
    teachers = {p.teacher for p in pairs}
    if len(teachers) != 1:
        raise ValueError(f"pairs from different teachers: {sorted(teachers)}")
    if holdout not in ("auto", "slides", "pixels"):
        raise ValueError(f"holdout must be 'auto', 'slides' or 'pixels', got {holdout!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    mode = holdout
    if mode == "auto":
        mode = "slides" if len(pairs) >= MIN_HOLDOUT_SLIDES else "pixels"
    if mode == "slides" and len(pairs) < 2:
        raise ValueError(f"holding out slides needs at least 2 slides, got {len(pairs)}")
    n_held = 0
    if mode == "slides" and val_fraction > 0:
        n_held = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
    train_part, held_part = list(pairs[: len(pairs) - n_held]), list(pairs[len(pairs) - n_held :])
    train_in = np.concatenate([p.inputs for p in train_part])
    train_out = np.concatenate([p.targets for p in train_part])
    metadata = StainNetMetadata(
        teacher=next(iter(teachers)),
        target_template=target_template,
        training_data=_slides_record(train_part, held_part, seed=seed, holdout=mode),
    )
    if not held_part:
        return train_stainnet(
            train_in, train_out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
            val_fraction=val_fraction if mode == "pixels" else 0.0, optimizer=optimizer,
            device=device, progress=progress, metadata=metadata,
        )
    held_in = np.concatenate([p.inputs for p in held_part])
    held_out = np.concatenate([p.targets for p in held_part])
    inputs, targets, fraction = _arrange_holdout(train_in, train_out, held_in, held_out, seed)
    result = train_stainnet(
        inputs, targets, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        val_fraction=fraction, optimizer=optimizer, device=device, progress=progress,
        metadata=metadata,
    )
    check = heldout_l1(result.model, held_in, held_out)
    if not math.isclose(check, result.val_loss, rel_tol=1e-3, abs_tol=1e-5):
        # train_stainnet's split changed: its per-epoch curve is not the held-out slides'
        log.warning(
            "held-out slides' L1 %.6f differs from the training run's validation L1 %.6f; "
            "the per-epoch validation curve is not the held-out slides'", check, result.val_loss,
        )
    return result


def _arrange_holdout(
    train_in: NDArray[np.uint8],
    train_out: NDArray[np.uint8],
    held_in: NDArray[np.uint8],
    held_out: NDArray[np.uint8],
    seed: int,
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], float]:
    """Place held-out pixels where :func:`train_stainnet`'s seeded split will take them.

    ``train_stainnet`` holds out ``order[:round(val_fraction * N)]`` of
    ``default_rng(seed).permutation(N)``; putting the held-out slides' pixels at exactly
    those indices makes its per-epoch validation loss the held-out slides' loss.
    :func:`train_from_pairs` verifies this after training (:func:`heldout_l1`).
    """
    n = len(train_in) + len(held_in)
    n_val = len(held_in)
    fraction = n_val / n
    if round(fraction * n) != n_val:  # float rounding: nudge to the value that rounds right
        fraction = (n_val + 0.25) / n
    order = np.random.default_rng(seed).permutation(n)
    inputs = np.empty((n, 3), np.uint8)
    targets = np.empty((n, 3), np.uint8)
    inputs[order[:n_val]], targets[order[:n_val]] = held_in, held_out
    inputs[order[n_val:]], targets[order[n_val:]] = train_in, train_out
    return inputs, targets, fraction


# --------------------------------------------------------------------------- end to end


def distill_stainnet(
    sources: Sequence[PathLike | Slide],
    *,
    teacher: Teacher,
    target: Template | PathLike,
    n_pixels_per_slide: int = DEFAULT_N_PIXELS_PER_SLIDE,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 4096,
    lr: float | None = None,
    optimizer: Optimizer = "adam",
    val_fraction: float = 0.1,
    holdout: Holdout = "auto",
    params: Any = None,
    device: str = "cpu",
    backend: str | None = None,
    progress: Callable[[EpochRecord], None] | None = None,
    scope: Literal["cohort", "slide"] = "cohort",
) -> TrainResult:
    """Train StainNet to imitate a slide-wide teacher (Macenko or Vahadane) over many slides.

    For each source slide, tissue pixels are sampled slide-wide and the teacher's statistics
    fitted on them. With ``scope="cohort"`` (default) the slides' statistics are aggregated
    into one source-cohort template (robust medians, as ``wsi-norm fit``) and the teacher is
    the single map from that cohort to ``target``: one function, which a per-pixel network can
    learn exactly and which generalises to unseen slides of the cohort. With ``scope="slide"``
    each slide is mapped with its own fit (the student then averages per-slide differences).
    The pairs of all slides are pooled and StainNet trained on them (:func:`train_from_pairs`).

    Parameters
    ----------
    sources : sequence of paths or Slides
        Source slides (for example one site's slides).
    teacher : {"macenko", "vahadane"}, keyword-only
    target : Template or path of a template JSON, keyword-only
        Target appearance, a template of the teacher's method.
    n_pixels_per_slide : int, keyword-only
        Tissue pixels sampled per slide.
    seed : int, keyword-only
        Seeds sampling, teacher fits, split, initial weights and batch order.
    epochs, batch_size, lr, optimizer, val_fraction, holdout, device, progress
        See :func:`train_from_pairs`.
    params : mapping or StainParams, optional, keyword-only
        Teacher parameters.
    backend : str, optional, keyword-only
        Slide reader.
    scope : {"cohort", "slide"}, keyword-only
        One cohort teacher map, or one map per slide.

    Returns
    -------
    TrainResult

    Raises
    ------
    FitError, TemplateError, SlideOpenError
        See :func:`teacher_pairs`.
    ValueError
        No sources, unknown teacher, bad training options.

    Examples
    --------
    >>> result = distill_stainnet(["b-1.tiff", "b-2.tiff", "b-3.tiff"], teacher="macenko",
    ...                           target="site-a.json", epochs=10)          # doctest: +SKIP
    >>> save_stainnet(result.model, "stainnet.safetensors")                # doctest: +SKIP
    """
    from wsi_norm.pipeline import fit_slide, resolve_params, template_from_fits

    if not sources:
        raise ValueError("no source slides given")
    if scope not in ("cohort", "slide"):
        raise ValueError(f"scope must be 'cohort' or 'slide', got {scope!r}")
    template = _resolve_target(target, teacher)
    resolved = resolve_params(params, seed=seed)
    slides = [_open(s, backend) for s in sources]
    fits = [fit_slide(sl, method=teacher, params=resolved, n_pixels=n_pixels_per_slide, seed=seed)
            for sl in slides]
    cohort = template_from_fits(fits, params=resolved, seed=seed).stats if scope == "cohort" else None
    pairs = [
        _map_pairs(sl, _kept_pixels(fit.pixels), teacher, cohort if cohort is not None else fit.stats,
                   fit.white.array, template, resolved)
        for sl, fit in zip(slides, fits, strict=True)
    ]
    return train_from_pairs(
        pairs, target_template=target_summary(template), holdout=holdout, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, val_fraction=val_fraction, seed=seed,
        device=device, progress=progress,
    )


def distill_from_pairs(
    source_paths: Sequence[PathLike | Slide],
    target_paths: Sequence[PathLike | Slide],
    *,
    n_pixels_per_slide: int = DEFAULT_N_PIXELS_PER_SLIDE,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 4096,
    lr: float | None = None,
    optimizer: Optimizer = "adam",
    val_fraction: float = 0.1,
    holdout: Holdout = "auto",
    device: str = "cpu",
    backend: str | None = None,
    progress: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train StainNet on registered slide pairs (source staining -> target staining).

    Parameters
    ----------
    source_paths, target_paths : sequences of paths or Slides, the same length
        Pair ``i`` is the same tissue in both stainings, registered at level 0.
    n_pixels_per_slide, seed, epochs, batch_size, lr, optimizer, val_fraction, holdout, device, backend, progress
        As in :func:`distill_stainnet`.

    Returns
    -------
    TrainResult
        Metadata ``teacher`` is ``"registered pairs"``; ``training_data`` names both slides of
        every pair.

    Raises
    ------
    ValueError
        Different numbers of sources and targets, or none.
    FitError
        A pair differs in size, or a source has no tissue.
    """
    if len(source_paths) != len(target_paths):
        raise ValueError(f"{len(source_paths)} source slides but {len(target_paths)} target slides")
    if not source_paths:
        raise ValueError("no slide pairs given")
    pairs = [
        registered_pairs(s, t, n_pixels=n_pixels_per_slide, seed=seed, backend=backend)
        for s, t in zip(source_paths, target_paths, strict=True)
    ]
    return train_from_pairs(
        pairs, target_template="registered target slides", holdout=holdout, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, val_fraction=val_fraction, seed=seed,
        device=device, progress=progress,
    )
