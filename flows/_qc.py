"""Per-slide QC of a normalized slide: metrics, and the artifacts that show them.

One report per slide (a markdown artifact under the stable key ``qc-<site>-<slide>``, so its
history across nightly runs is one click; the same files under ``<output_root>/qc/``):

* **SSIM Source** (Kang et al., StainNet, Front. Med. 2021): structural similarity between
  the normalized thumbnail and its source's, on grayscale; near 1 means structure is kept.
* **stain-vector angles to the template** (hematoxylin, eosin; degrees) and the **Lab
  distance** of tissue means to the template's reference, before and after, measured by
  :func:`flows._common.colour_stats` (textbook Macenko, a measurement independent of the
  fitting estimator) on the finest level of at most 4096 px a side: harmonize-sites measures
  the same way, so the numbers agree.
* the QC gate's verdict (✓ passed, ✗ failed or forced past, with its reasons); for a model's
  output (StainNet), whether it looks like H&E (measured, not gated: ⚠ with the reasons).
* PSNR needs a ground truth, which an archive does not have: not reported.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flows._artifacts import artifact_key, markdown_table, png_data_uri
from flows._common import ColourStats, colour_stats, read_output_thumbnail
from flows.manifest import Manifest, SlideEntry
from wsi_norm.stain.qc import gate_verdict

__all__ = ["labelled_pair", "publish_slide_qc", "ssim_source", "stain_plot", "summary_numbers"]

THUMB_PX = 512
REPORT_PX = 360
"""Longest side of each of the report's before/after images."""
REPORT_IMAGE_BYTES = 90_000
"""PNG budget of the report's before/after image (quantised and shrunk to fit)."""


def _gray(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    from wsi_norm.color import luma

    return np.asarray(luma(rgb), dtype=np.float64)


def ssim_source(source: NDArray[np.uint8], normalized: NDArray[np.uint8]) -> float:
    """SSIM between ``(H, W, 3) uint8`` images on ITU-R 601 grayscale (data range 255),
    with :func:`wsi_norm.metrics.ssim` (Gaussian window, as scikit-image's)."""
    from wsi_norm.metrics import ssim

    return float(ssim(_gray(source), _gray(normalized), data_range=255.0))


def _resize(rgb: NDArray[np.uint8], shape: tuple[int, int]) -> NDArray[np.uint8]:
    from PIL import Image

    if rgb.shape[:2] == shape:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _template_stain_matrix(target: Any) -> NDArray[np.float64] | None:
    stats = getattr(target, "stats", None)
    matrix = getattr(stats, "stain_matrix", None)
    return None if matrix is None else np.asarray(matrix, dtype=np.float64)


def _angles(a: Any, b: Any) -> list[float]:
    from wsi_norm.stain.base import stain_angles_deg

    return [float(x) for x in stain_angles_deg(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))]


_PLOT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
"""Entry colours of the stain plot (matplotlib's first tab10 colours); the template is black."""


def stain_plot(stats: dict[str, ColourStats], *, target: NDArray[np.float64] | None, title: str) -> str:
    """A PNG data URI: the hematoxylin and eosin vectors (optical density: red - green against
    blue) of each entry (circles) and of the template (black crosses), every point labelled H or E.

    Drawn with Pillow (a few milliseconds; matplotlib took ~0.4 s a slide, most of a small
    slide's QC).
    """
    from PIL import Image, ImageDraw, ImageFont

    entries = [(label, np.asarray(s.stain_matrix)) for label, s in stats.items() if s.stain_matrix is not None]
    if target is not None:
        entries.append(("template", np.asarray(target)))
    width, height, left, right, top, bottom = 520, 340, 62, 100, 30, 44
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)
    small = ImageFont.load_default(size=10)
    points = np.array([[m[k, 0] - m[k, 1], m[k, 2]] for _, m in entries for k in range(2)]).reshape(-1, 2)
    lo = points.min(axis=0) if len(points) else np.array([-0.5, 0.0])
    hi = points.max(axis=0) if len(points) else np.array([0.5, 0.5])
    pad = np.maximum((hi - lo) * 0.12, 0.05)
    lo, hi = lo - pad, hi + pad

    def xy(p: NDArray[np.float64]) -> tuple[float, float]:
        fx = (p[0] - lo[0]) / (hi[0] - lo[0])
        fy = (p[1] - lo[1]) / (hi[1] - lo[1])
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for axis in (0, 1):
        for value in np.linspace(lo[axis], hi[axis], 5):
            x, y = xy(np.array([value, lo[1]]) if axis == 0 else np.array([lo[0], value]))
            label = f"{value:.2f}"
            if axis == 0:
                draw.line((x, height - bottom, x, height - bottom + 4), fill="black")
                draw.text((x, height - bottom + 6), label, fill="black", font=small, anchor="mt")
            else:
                draw.line((left - 4, y, left, y), fill="black")
                draw.text((left - 6, y), label, fill="black", font=small, anchor="rm")
    draw.text(((left + width - right) / 2, height - 6), "OD red - OD green", fill="black", font=font, anchor="md")
    ylabel = Image.new("RGB", (height - top - bottom, 14), "white")
    ImageDraw.Draw(ylabel).text(((height - top - bottom) / 2, 7), "OD blue", fill="black", font=font, anchor="mm")
    img.paste(ylabel.rotate(90, expand=True), (2, top))
    draw.text(((left + width - right) / 2, 8), f"{title}: stain vectors (H hematoxylin, E eosin)", fill="black", font=font, anchor="mt")
    for n, (label, m) in enumerate(entries):
        colour = (0, 0, 0) if label == "template" else _PLOT_COLOURS[n % len(_PLOT_COLOURS)]
        for k, stain in enumerate(("H", "E")):
            x, y = xy(np.array([m[k, 0] - m[k, 1], m[k, 2]]))
            if label == "template":
                draw.line((x - 5, y - 5, x + 5, y + 5), fill=colour, width=2)
                draw.line((x - 5, y + 5, x + 5, y - 5), fill=colour, width=2)
            else:
                draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
            draw.text((x + 7, y - 7), stain, fill="black", font=small, anchor="lb")
        # legend, right of the axes
        lx, ly = width - right + 12, top + 8 + 15 * n
        if label == "template":
            draw.line((lx, ly - 4, lx + 8, ly + 4), fill=colour, width=2)
            draw.line((lx, ly + 4, lx + 8, ly - 4), fill=colour, width=2)
        else:
            draw.ellipse((lx, ly - 4, lx + 8, ly + 4), fill=colour)
        draw.text((lx + 14, ly), label, fill="black", font=small, anchor="lm")
    return png_data_uri(np.asarray(img), max_px=width)


def labelled_pair(before: NDArray[np.uint8], after: NDArray[np.uint8], *, side: int = REPORT_PX) -> NDArray[np.uint8]:
    """``before | after`` side by side, each at most ``side`` px and captioned above."""
    from PIL import Image, ImageDraw

    def fit(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        h, w = rgb.shape[:2]
        scale = min(1.0, side / max(h, w))
        return _resize(rgb, (max(1, round(h * scale)), max(1, round(w * scale))))

    a, b = fit(before), fit(after)
    band, gap = 18, 8
    canvas = Image.new("RGB", (a.shape[1] + gap + b.shape[1], band + max(a.shape[0], b.shape[0])), "white")
    canvas.paste(Image.fromarray(a), (0, band))
    canvas.paste(Image.fromarray(b), (a.shape[1] + gap, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), "before (source)", fill="black")
    draw.text((a.shape[1] + gap + 2, 3), "after (normalized)", fill="black")
    return np.asarray(canvas)


def _non_stain_note(fraction: float) -> str:
    """The report's note on sampled pixels the fit left out as not stain (black fill, ink)."""
    if fraction <= 0:
        return ""
    flag = " **check the slide for pen marks or fill**" if fraction > 0.01 else ""
    return f"; {fraction:.2%} of the sampled tissue left out of the fit as not stain (black fill, black or green ink){flag}"


def _fmt(value: Any) -> str:
    """A value for a person: numbers rounded (3 significant digits, at most 2 decimals),
    sequences as ``a, b, c``, mappings as ``k: v; ...``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 100 else f"{round(value, 2):g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def summary_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """The key QC numbers of one slide for the run's table (rounded, with the gate's mark)."""
    return {
        "qc_gate": metrics["qc_gate"],
        "ssim_source": metrics["ssim_source"],
        "lab_dist_after": metrics.get("lab_dist_after", ""),
        "angles_after_deg": metrics.get("angle_to_template_after_deg", ""),
    }


def publish_slide_qc(
    entry: SlideEntry, *, manifest: Manifest, target: Any, results: list[Any], seconds: float
) -> dict[str, Any]:
    """Compute QC of one normalized slide, publish its one report artifact, write its files.

    The colour numbers come from :func:`flows._common.colour_stats` of
    :func:`~flows._common.read_source_for_measure` / ``read_output_for_measure``: the same
    measurement, at the same resolution, that harmonize-sites reports. SSIM compares the
    display thumbnails.
    Returns the metrics.
    """
    from prefect.artifacts import create_markdown_artifact

    from flows._common import read_output_for_measure, read_source_for_qc

    start = time.perf_counter()
    measured, before = read_source_for_qc(entry.source, thumb_px=THUMB_PX)
    first_out = next(iter(entry.outputs.values()))
    after = _resize(read_output_thumbnail(first_out, min_px=THUMB_PX), before.shape[:2])
    target_matrix = _template_stain_matrix(target)
    src = colour_stats(measured)
    del measured
    out = colour_stats(read_output_for_measure(first_out))
    metrics: dict[str, Any] = {
        "ssim_source": round(ssim_source(before, after), 3),
        "lab_mean_before": [round(v, 1) for v in src.lab_mean],
        "lab_mean_after": [round(v, 1) for v in out.lab_mean],
    }
    ref = getattr(target, "reference", None)
    if ref is not None:
        for when, stats in (("before", src), ("after", out)):
            metrics[f"lab_dist_{when}"] = round(float(np.linalg.norm(np.subtract(stats.lab_mean, ref.lab_mean))), 2)
    if target_matrix is not None and src.stain_matrix is not None and out.stain_matrix is not None:
        metrics["angle_to_template_before_deg"] = [round(a, 1) for a in _angles(src.stain_matrix, target_matrix)]
        metrics["angle_to_template_after_deg"] = [round(a, 1) for a in _angles(out.stain_matrix, target_matrix)]
    gate = results[0].provenance.get("qc", {}) if results else {}
    metrics["qc_gate"] = gate_verdict(gate)
    for name in ("source_white_point", "mapped_lab_distance", "mapped_overshoot_deg"):
        if name in gate.get("measures", {}):
            metrics[f"gate_{name}"] = gate["measures"][name]
    metrics["qc_seconds"] = round(time.perf_counter() - start, 2)

    pair = labelled_pair(before, after)
    thumbs = png_data_uri(pair, max_px=pair.shape[1], max_bytes=REPORT_IMAGE_BYTES)
    plot = stain_plot({"source": src, "output": out}, target=target_matrix, title=entry.source.name)
    fit = getattr(results[0], "source_fit", None) if results else None
    timings = getattr(results[0], "timings", {}) if results else {}
    rows = [{"measure": k, "value": _fmt(v)} for k, v in metrics.items()]
    lines = [
        f"# {entry.site} / {entry.source.name}",
        "",
        (f"- method **{manifest.method}**, template **{manifest.model.target or 'method default'}**; "
         f"QC gate: **{metrics['qc_gate']}**"),
        f"- tissue: {getattr(fit, 'tissue_fraction', float('nan')):.1%} of the slide (gray <= 200, as `wsi-norm info`)"
        + _non_stain_note(getattr(fit, "non_stain_fraction", 0.0)),
        (f"- time: {seconds:.1f} s (fit + normalize + write; fit {timings.get('fit_s', float('nan')):.1f} s), "
         f"QC {metrics['qc_seconds']:.1f} s"),
        "- outputs: " + ", ".join(f"`{p}`" for p in entry.outputs.values()),
        "",
        markdown_table(rows),
        "",
        ("Colour numbers: textbook Macenko and CIE Lab of tissue, measured on the source and on the output "
         "(the same measurement harmonize-sites reports); angles are to the template's stain vectors, degrees."),
        "",
        f"![before | after]({thumbs})",
        "",
        f"![stain vectors]({plot})",
    ]
    create_markdown_artifact("\n".join(lines), key=artifact_key("qc", entry.site, entry.name),
                             description=f"QC report of {entry.site}/{entry.source.name}")
    metrics["qc_dir"] = str(_write_qc_files(manifest, entry, pair=pair, plot=plot, metrics=metrics,
                                            summary=lines[:-4]))
    return metrics


def _write_qc_files(
    manifest: Manifest, entry: SlideEntry, *, pair: NDArray[np.uint8], plot: str,
    metrics: dict[str, Any], summary: list[str],
) -> Any:
    """The same QC on disk, for runs without a Prefect UI: ``<output_root>/qc/<site>/<slide>/``."""
    import base64
    import json

    from PIL import Image

    qc_dir = manifest.confine(manifest.qc_dir(entry))
    qc_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pair).save(qc_dir / "before_after.png")
    (qc_dir / "stain_vectors.png").write_bytes(base64.b64decode(plot.split(",", 1)[1]))
    (qc_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    (qc_dir / "summary.md").write_text(
        "\n".join([*summary, "", "![before | after](before_after.png)", "",
                   "![stain vectors](stain_vectors.png)", ""])
    )
    return qc_dir
