"""Per-slide QC of a normalized slide: metrics, and the artifacts that show them.

Metrics, on the source thumbnail and the output's matching pyramid level:

* **SSIM Source** (Kang et al., StainNet, Front. Med. 2021): structural similarity between
  the normalized image and its source, on grayscale; near 1 means structure is kept.
* **stain-vector angle to the template**: Macenko vectors measured on the output's tissue
  pixels against the template's, degrees (hematoxylin, eosin).
* **Lab distance to the template**: Euclidean distance of tissue Lab means, when the
  template records one.
* PSNR needs a ground truth, which an archive does not have: reported as ``n/a``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flows._artifacts import artifact_key, figure_data_uri, markdown_table, png_data_uri
from flows._common import ColourStats, colour_stats, read_output_thumbnail, seq_str
from flows.manifest import Manifest, SlideEntry

__all__ = ["publish_slide_qc", "slide_qc_metrics", "ssim_source", "stain_plot"]

THUMB_PX = 512


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


def slide_qc_metrics(
    before: NDArray[np.uint8], after: NDArray[np.uint8], *, target_matrix: NDArray[np.float64] | None
) -> tuple[dict[str, Any], ColourStats, ColourStats]:
    """QC metrics of one slide from its source and output thumbnails (same shape)."""
    src = colour_stats(before)
    out = colour_stats(after)
    metrics: dict[str, Any] = {
        "ssim_source": round(ssim_source(before, after), 4),
        "psnr_gt_db": "n/a (no ground truth)",
        "lab_mean_before": seq_str(src.lab_mean, 2),
        "lab_mean_after": seq_str(out.lab_mean, 2),
    }
    if target_matrix is not None and src.stain_matrix is not None and out.stain_matrix is not None:
        metrics["angle_to_template_before_deg"] = seq_str(_angles(src.stain_matrix, target_matrix), 2)
        metrics["angle_to_template_after_deg"] = seq_str(_angles(out.stain_matrix, target_matrix), 2)
    return metrics, src, out


def stain_plot(stats: dict[str, ColourStats], *, target: NDArray[np.float64] | None, title: str) -> str:
    """A PNG data URI: stain vectors (OD, red-green vs blue) of each entry and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.0, 3.2))
    # matplotlib's stubs type cm.tab10 as Colormap; it is a ListedColormap (a tuple of colours)
    for (label, s), colour in zip(stats.items(), plt.cm.tab10.colors, strict=False):  # type: ignore[attr-defined]
        if s.stain_matrix is None:
            continue
        m = np.asarray(s.stain_matrix)
        ax.scatter(m[:, 0] - m[:, 1], m[:, 2], color=colour, label=label, s=30)
    if target is not None:
        ax.scatter(target[:, 0] - target[:, 1], target[:, 2], marker="x", color="k", s=60, label="template")
    ax.set_xlabel("OD red - OD green")
    ax.set_ylabel("OD blue")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_data_uri(fig)


def publish_slide_qc(
    entry: SlideEntry, *, manifest: Manifest, target: Any, results: list[Any], seconds: float
) -> dict[str, Any]:
    """Compute QC of one normalized slide and publish its artifacts; returns the metrics."""
    from prefect.artifacts import (
        create_image_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    from wsi_norm.slide import open_slide

    start = time.perf_counter()
    with open_slide(entry.source) as slide:
        before = np.asarray(slide.thumbnail(THUMB_PX))
    first_out = next(iter(entry.outputs.values()))
    after = _resize(read_output_thumbnail(first_out, min_px=THUMB_PX), before.shape[:2])
    target_matrix = _template_stain_matrix(target)
    metrics, src, out = slide_qc_metrics(before, after, target_matrix=target_matrix)
    gate = results[0].provenance.get("qc", {}) if results else {}
    metrics["qc_gate"] = ("forced past: " if gate.get("forced") else "failed: ") + "; ".join(gate["problems"]) \
        if gate.get("problems") else "passed"
    for name in ("source_white_point", "mapped_lab_distance", "mapped_overshoot_deg"):
        if name in gate.get("measures", {}):
            metrics[f"gate_{name}"] = gate["measures"][name]
    metrics["qc_seconds"] = round(time.perf_counter() - start, 2)

    key = artifact_key("qc", entry.site, entry.name)
    pair = np.concatenate([before, np.full((before.shape[0], 8, 3), 255, np.uint8), after], axis=1)
    thumbs = png_data_uri(pair, max_px=2 * 200 + 8)
    plot = stain_plot({"source": src, "output": out}, target=target_matrix, title=entry.source.name)
    create_image_artifact(thumbs, key=key + "-thumbs", description=f"{entry.source.name}: before | after")
    create_image_artifact(plot, key=key + "-stains", description=f"{entry.source.name}: stain vectors")
    create_table_artifact([{"metric": k, "value": v} for k, v in metrics.items()], key=key + "-metrics",
                          description=f"QC of {entry.source.name}")

    fit = getattr(results[0], "source_fit", None) if results else None
    fit_stats = fit.stats.to_dict() if fit is not None else {}
    lines = [
        f"# {entry.site} / {entry.source.name}",
        "",
        f"- method: `{manifest.method}`, params: `{manifest.params}`",
        f"- template: `{manifest.model.target or 'method default'}`",
        f"- tissue fraction: {getattr(fit, 'tissue_fraction', float('nan')):.3f}",
        f"- fitted source statistics: `{fit_stats}`",
        f"- wall time: {seconds:.1f} s (fit + normalize + write), QC {metrics['qc_seconds']} s",
        f"- timings: `{getattr(results[0], 'timings', {}) if results else {}}`",
        "- outputs: " + ", ".join(f"`{p}`" for p in entry.outputs.values()),
        "",
        markdown_table([{"metric": k, "value": v} for k, v in metrics.items()]),
        "",
        f"![before | after]({thumbs})",
        "",
        f"![stain vectors]({plot})",
    ]
    create_markdown_artifact("\n".join(lines), key=key, description=f"QC summary of {entry.source.name}")
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
