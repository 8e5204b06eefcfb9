"""Prefect flow ``harmonize-sites``: bring every site of a manifest to one target's colours.

Per site, a cohort template is fitted slide-wide from all its slides; the target is a named
site (its cohort template) or a template of the manifest.  Every slide of every site is
normalized to the target (outputs as in ``normalize-archive``, skipped when current), and
per-site colour statistics are measured before and after on the full-resolution tissue pixels
each slide's fit sampled (each slide is sampled and fitted once): Macenko stain vectors, CIE
Lab mean and 99th-percentile concentrations.  The distances to the target (stain-vector angles in
degrees, Lab distance) go into a table artifact and a plot (image artifact).

Run::

    python -m flows.harmonize_sites --manifest data_manifest.yaml --target site-a
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows._artifacts import figure_data_uri, markdown_table
from flows._common import (
    ColourStats,
    colour_stats,
    generate_missing,
    resolve_template,
    scheduler_address,
)
from flows._qc import _angles
from wsi_norm.manifest import Manifest, SlideEntry, load_manifest
from wsi_norm.pipeline import template_from_fits

__all__ = ["distance_rows", "harmonize_sites", "main", "site_colour_stats"]

FLOW_NAME = "harmonize-sites"
TABLE_KEY = "harmonize-sites-distances"


def _tissue(rgb: np.ndarray) -> np.ndarray:
    from wsi_norm.stain.base import tissue_pixels

    return tissue_pixels(np.ascontiguousarray(rgb.reshape(-1, 3)))


@task(name="fit-site", cache_policy=NO_CACHE)
def fit_site(entries: list[SlideEntry], manifest: Manifest) -> list[Any]:
    """Slide-wide fits of one site's slides (each keeps the tissue pixels it sampled)."""
    from wsi_norm.pipeline import fit_slide

    m = manifest.model
    return [
        fit_slide(e.source, method=manifest.method, params=manifest.params, n_pixels=m.fit.n_pixels,
                  seed=m.fit.seed)
        for e in entries
    ]


@task(name="measure-site", cache_policy=NO_CACHE)
def site_colour_stats(fits: list[Any], manifest: Manifest, target: Any) -> tuple[ColourStats, ColourStats]:
    """Colour statistics of one site's tissue before and after normalization to ``target``.

    "Before" are the tissue pixels each slide's slide-wide fit sampled (full resolution, the
    manifest's fit settings). Because the normalization is a pure per-pixel map, the
    normalized values of those pixels are the map applied to them: the "after" statistics are
    those of exactly the pixels written to the (lossless) OME-Zarr output.
    """
    from wsi_norm.pipeline import resolve_params
    from wsi_norm.stain import compile_colormap

    params = resolve_params(manifest.params, seed=manifest.model.fit.seed)
    before = [f.pixels for f in fits]
    after = [
        _tissue(compile_colormap(manifest.method, f.stats, target.stats, params).apply(f.pixels[None])[0])
        for f in fits
    ]
    return colour_stats(np.concatenate(before, axis=0)), colour_stats(np.concatenate(after, axis=0))


@task(name="normalize-to-target", cache_policy=NO_CACHE)
def normalize_to_target(entry: SlideEntry, manifest: Manifest, target: Any, source_fit: Any) -> str:
    """Normalize one slide to the target (all formats), unless its outputs are current;
    ``source_fit`` is the slide's fit from :func:`fit_site` (not fitted again)."""
    from wsi_norm.pipeline import normalize_slide, output_is_current

    done = []
    for fmt, out in entry.outputs.items():
        if output_is_current(out, source=entry.source, method=manifest.method, params=manifest.params,
                             target=target, weights=manifest.weights, seed=manifest.model.fit.seed):
            done.append(f"{fmt}: current")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        normalize_slide(entry.source, out, method=manifest.method, target=target, params=manifest.params,
                        weights=manifest.weights, overwrite=True, fmt=fmt, source_fit=source_fit,
                        n_pixels=manifest.model.fit.n_pixels, seed=manifest.model.fit.seed)
        done.append(f"{fmt}: written")
    return ", ".join(done)


def distance_rows(
    before: dict[str, ColourStats], after: dict[str, ColourStats], target: ColourStats
) -> list[dict[str, Any]]:
    """Per site: stain-vector angles (H, E; degrees) and Lab distance to the target, before and after."""
    rows = []
    for site in before:
        row: dict[str, Any] = {"site": site}
        for when, stats in (("before", before[site]), ("after", after[site])):
            h, e = _angles(stats.stain_matrix, target.stain_matrix)
            row[f"h_angle_{when}_deg"] = round(h, 3)
            row[f"e_angle_{when}_deg"] = round(e, 3)
            row[f"lab_dist_{when}"] = round(float(np.linalg.norm(np.subtract(stats.lab_mean, target.lab_mean))), 3)
        row["lab_mean_before"] = [round(v, 2) for v in before[site].lab_mean]
        row["lab_mean_after"] = [round(v, 2) for v in after[site].lab_mean]
        row["conc_p99_before"] = [round(v, 3) for v in (before[site].conc_p99 or [])]
        row["conc_p99_after"] = [round(v, 3) for v in (after[site].conc_p99 or [])]
        rows.append(row)
    return rows


def _plot(rows: list[dict[str, Any]], target_name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [r["site"] for r in rows]
    x = np.arange(len(sites))
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.0))
    for ax, (label, keys) in zip(
        axes, (("stain angle to target (deg, H+E max)", ("h_angle", "e_angle")), ("Lab distance to target", ("lab_dist",))),
        strict=True,
    ):
        for offset, when, colour in ((-0.2, "before", "tab:red"), (0.2, "after", "tab:green")):
            values = [max(r[f"{k}_{when}" + ("_deg" if k != "lab_dist" else "")] for k in keys) for r in rows]
            ax.bar(x + offset, values, width=0.4, color=colour, label=when)
        ax.set_xticks(x, sites, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"harmonized to {target_name}", fontsize=10)
    fig.tight_layout()
    return figure_data_uri(fig)


@flow(name=FLOW_NAME, log_prints=False)
def harmonize_sites(manifest: str = "data_manifest.yaml", target: str | None = None, scheduler: str | None = None) -> list[dict[str, Any]]:
    """Normalize every site of ``manifest`` to one target and report colour distances.

    Parameters
    ----------
    manifest : str
        Path of the data manifest.
    target : str, optional
        A site name (its cohort template) or a template name of the manifest; default the
        manifest's ``target``, else its first site.
    scheduler : str, optional
        Dask scheduler address; default ``WSI_NORM_SCHEDULER``, else a local cluster.

    Returns
    -------
    list of dict
        One row per site (see :func:`distance_rows`).
    """
    from wsi_norm.cluster import dask_client

    logger = get_run_logger()
    m = load_manifest(manifest)
    generate_missing(m)
    name = target or m.model.target or m.sites[0]
    if name not in m.sites and name not in m.templates:
        raise ValueError(f"{m.path}: target {name!r} is neither a site ({', '.join(m.sites)}) nor a template")
    with dask_client(scheduler_address(scheduler)):
        entries = {site: list(m.site_slides(site)) for site in m.sites}
        fit_futures = {site: fit_site.submit(entries[site], m) for site in m.sites}
        fits = {site: f.result() for site, f in fit_futures.items()}
        for site, site_fits in fits.items():
            logger.info("site %s cohort template: %s", site,
                        template_from_fits(site_fits, params=m.params, seed=m.model.fit.seed).stats.to_dict())
        if name in m.sites:
            target_template = template_from_fits(fits[name], params=m.params, seed=m.model.fit.seed)
        else:
            target_template = resolve_template(m, name)
        measured = {site: site_colour_stats.submit(fits[site], m, target_template) for site in m.sites}
        futures = [
            normalize_to_target.submit(e, m, target_template, fit)
            for site in m.sites
            for e, fit in zip(entries[site], fits[site], strict=True)
        ]
        for f in futures:
            f.result()
        before_stats = {s: f.result()[0] for s, f in measured.items()}
        after_stats = {s: f.result()[1] for s, f in measured.items()}
        if name in m.sites:
            target_stats = before_stats[name]
        else:
            stats = target_template.stats
            target_stats = ColourStats(np.asarray(stats.stain_matrix).tolist(), [float("nan")] * 3, None, 0)
    rows = distance_rows(before_stats, after_stats, target_stats)
    create_table_artifact(rows, key=TABLE_KEY, description=f"colour distance of each site to {name}, before/after")
    plot = _plot(rows, name)
    create_image_artifact(plot, key="harmonize-sites-plot", description=f"distance to {name} before/after")
    create_markdown_artifact(
        f"# harmonize-sites: target `{name}`, method `{m.method}`\n\n{markdown_table(rows)}\n\n![distances]({plot})",
        key="harmonize-sites-summary",
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: run once and print the distance table."""
    parser = argparse.ArgumentParser(prog="python -m flows.harmonize_sites", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="data_manifest.yaml")
    parser.add_argument("--target", default=None, help="site or template name")
    parser.add_argument("--scheduler", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state = harmonize_sites(manifest=args.manifest, target=args.target, scheduler=args.scheduler, return_state=True)
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, list):
        print(markdown_table(rows))
    print(f"state: {state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
