"""Prefect flow ``harmonize-sites``: bring every site of a manifest to one target's colours.

Per site, a cohort template is fitted slide-wide from all its slides (each slide is sampled and
fitted once); the target is a named site (its cohort template) or a template of the manifest.
Every slide of every site is normalized to the target through the QC gate (outputs as in
``normalize-archive``, skipped when current); a slide that fails (unreadable, or refused by the
gate: "needs review") is reported with its reason while every other slide and site finishes.

Per site, colour statistics are then **measured**, before on the source slides and after on the
written outputs, by an estimator independent of the one that fitted them
(:func:`flows._common.colour_stats`: textbook Macenko against each image's own glass, and the CIE
Lab mean of tissue), on the finest pyramid level no larger than 4096 px a side. The distances to
the target site's sources (stain-vector angles in degrees, Lab distance) go into a table artifact
and a plot (image artifact). With a template target (not a site), the template's own colour
reference is the target.

Run::

    python -m flows.harmonize_sites --manifest data_manifest.yaml --target site-a
"""

from __future__ import annotations

if __name__ == "__main__":  # a program: Prefect's temporary API starts while the rest imports
    from flows._api import start as start_prefect_api

    start_prefect_api()

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import configure_process
from flows._api import prefect_api
from flows._artifacts import figure_data_uri, markdown_table
from flows._common import (
    ColourStats,
    RunFailed,
    colour_stats,
    fetch_samples,
    generate_missing,
    quiet_thread_timeout_notice,
    read_output_for_measure,
    read_source_for_measure,
    resolve_template,
    scheduler_address,
    state_rows,
)
from flows._qc import _angles
from flows.manifest import Manifest, SlideEntry, load_manifest
from wsi_norm.errors import QCError
from wsi_norm.pipeline import FitOptions, Glass, template_from_fits
from wsi_norm.runtime import return_freed_memory

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

__all__ = ["distance_rows", "harmonize_sites", "main", "measure_site"]

FLOW_NAME = "harmonize-sites"
TABLE_KEY = "harmonize-sites-distances"


@task(name="fit-site", cache_policy=NO_CACHE)
def fit_site(entries: list[SlideEntry], manifest: Manifest) -> list[Any]:
    """Slide-wide fits of one site's slides (each keeps the tissue pixels it sampled).

    A slide that cannot be fitted (unreadable, no tissue) is returned as its error, so one bad
    slide does not cost its site, nor the other sites, their fits.
    """
    from wsi_norm.errors import WsiNormError
    from wsi_norm.pipeline import fit_slide

    m = manifest.model
    fits: list[Any] = []
    for e in entries:
        try:
            fits.append(fit_slide(e.source, method=manifest.method, params=manifest.params,
                                  n_pixels=m.fit.n_pixels, seed=m.fit.seed))
        except (WsiNormError, OSError) as exc:
            get_run_logger().error("%s: cannot fit: %s", e.source, exc)
            fits.append(exc)
    return fits


@task(name="measure-site", cache_policy=NO_CACHE)
def measure_site(paths: list[str], *, outputs: bool) -> ColourStats | None:
    """Colour statistics of a site's source slides (``outputs=False``) or written outputs."""
    if not paths:
        return None
    read = read_output_for_measure if outputs else read_source_for_measure
    return colour_stats([read(p) for p in paths])


@task(name="normalize-to-target", cache_policy=NO_CACHE)
def normalize_to_target(entry: SlideEntry, manifest: Manifest, target: Any, source_fit: Any) -> list[str]:
    """Normalize one slide to the target (all formats) unless its outputs are current; returns
    the written (or current) outputs. ``source_fit`` is the slide's fit from :func:`fit_site`."""
    from wsi_norm.pipeline import normalize_slide, output_is_current

    m = manifest.model
    glass: Glass = "keep" if m.keep_glass else "target"
    done = []
    for fmt, out in entry.outputs.items():
        if not output_is_current(
            out,
            source=entry.source,
            method=manifest.method,
            params=manifest.params,
            target=target,
            weights=manifest.weights,
            glass=glass,
            fit=FitOptions(n_pixels=m.fit.n_pixels, seed=m.fit.seed),
            writer=manifest.writer(fmt),
        ):
            manifest.confine(out).parent.mkdir(parents=True, exist_ok=True)
            normalize_slide(
                entry.source,
                out,
                method=manifest.method,
                target=target,
                params=manifest.params,
                weights=manifest.weights,
                overwrite=True,
                source_fit=source_fit,
                glass=glass,
                force=m.force,
                fit=FitOptions(n_pixels=m.fit.n_pixels, seed=m.fit.seed),
                writer=manifest.writer(fmt),
            )
        done.append(str(out))
    return done


def distance_rows(
    before: dict[str, ColourStats | None], after: dict[str, ColourStats | None], target: ColourStats
) -> list[dict[str, Any]]:
    """Per site: stain-vector angles (H, E; degrees) and Lab distance to the target, before and after."""
    rows = []
    for site, b in before.items():
        row: dict[str, Any] = {"site": site}
        a = after[site]
        if b is None or a is None or target.stain_matrix is None:
            rows.append({**row, "note": "no slide of this site could be measured"})
            continue
        for when, stats in (("before", b), ("after", a)):
            # too little stained tissue to measure stain vectors: reported as nan, not a crash
            h, e = (float("nan"),) * 2 if stats.stain_matrix is None else _angles(stats.stain_matrix, target.stain_matrix)
            row[f"h_angle_{when}_deg"] = round(h, 3)
            row[f"e_angle_{when}_deg"] = round(e, 3)
            row[f"lab_dist_{when}"] = round(float(np.linalg.norm(np.subtract(stats.lab_mean, target.lab_mean))), 3)
        row["lab_mean_before"] = [round(v, 2) for v in b.lab_mean]
        row["lab_mean_after"] = [round(v, 2) for v in a.lab_mean]
        row["white_point_before"] = [round(v, 1) for v in (b.white_point or [])]
        row["white_point_after"] = [round(v, 1) for v in (a.white_point or [])]
        rows.append(row)
    return rows


def _plot(rows: list[dict[str, Any]], target_name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "h_angle_before_deg" in r]
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
def harmonize_sites(
    manifest: str = "data_manifest.yaml", target: str | None = None, scheduler: str | None = None, dashboard: bool = False
) -> Any:
    """Normalize every site of ``manifest`` to one target and report colour distances.

    Parameters
    ----------
    manifest : str
        Path of the data manifest.
    target : str, optional
        A site name (its cohort template) or a template name of the manifest; default the
        manifest's ``target``, else its first site.
    scheduler : str, optional
        Dask scheduler address; default ``WSI_NORM_SCHEDULER``, else this process's threads
        (:class:`flows.normalize_archive.ArrayWork`).
    dashboard : bool
        Start a local cluster and serve its dask dashboard on 127.0.0.1 (default: none).

    Returns
    -------
    list of dict, or a Failed state
        One row per site (see :func:`distance_rows`); the run ends Failed (rows attached)
        when any slide failed, timed out (the manifest's ``slide_timeout_s``) or needs review.
    """
    return_freed_memory()  # slides stream through this process (see wsi_norm.runtime)
    from prefect.states import Completed, Failed

    from flows.normalize_archive import ArrayWork
    from wsi_norm.cluster import dashboard_url

    logger = get_run_logger()
    quiet_thread_timeout_notice()  # the per-slide timeout is ours and documented
    m = fetch_samples(load_manifest(manifest))
    fitted = m.method not in ("none", "stainnet")  # those fit nothing: a fixed (identity or learned) map
    timeout_s = m.model.slide_timeout_s
    generate_missing(m)
    name = target or m.model.target or m.sites[0]
    if name not in m.sites and name not in m.templates:
        raise ValueError(f"{m.path}: target {name!r} is neither a site ({', '.join(m.sites)}) nor a template")
    problems: list[str] = []
    with ExitStack() as stack:
        # this process's threads unless a scheduler or a dashboard is asked for (as
        # normalize-archive decides)
        threads = max(1, (os.cpu_count() or 1) // m.model.concurrency)
        work = ArrayWork(stack, scheduler_address(scheduler), dashboard=dashboard, threads=threads)
        if dashboard:
            logger.info("dask dashboard: %s", dashboard_url(work.client))
        entries = {site: list(m.site_slides(site)) for site in m.sites}
        fit_futures = {
            site: fit_site.with_options(timeout_seconds=timeout_s * len(entries[site]),
                                        task_run_name=f"fit site {site}", tags=[f"site:{site}"]).submit(entries[site], m)
            for site in (m.sites if fitted else ())
        }
        # none / stainnet: every slide goes to normalization as it is (the target is measured
        # from its site's sources, or read from the named template, for the distances only)
        fits: dict[str, list[tuple[SlideEntry, Any]]] = (
            {} if fitted else {site: [(entry, None) for entry in entries[site]] for site in m.sites}
        )
        for site, future in fit_futures.items():
            fits[site] = []
            try:
                site_fits = future.result()
            except Exception as exc:  # noqa: BLE001 - a site whose fits did not finish is reported, others go on
                reason = _failure(exc, timeout_s * len(entries[site]))
                problems.extend(f"{site}/{e.source.name}: failed: fitting the site: {reason}" for e in entries[site])
                continue
            for entry, fit in zip(entries[site], site_fits, strict=True):
                if isinstance(fit, Exception):
                    problems.append(f"{site}/{entry.source.name}: failed: {fit}")
                else:
                    fits[site].append((entry, fit))
        for site, pairs in fits.items():
            if pairs and fitted:
                logger.info("site %s cohort template: %s", site, template_from_fits(
                    [f for _, f in pairs], params=m.params, seed=m.model.fit.seed).stats.to_dict())
        target_template = None
        if name not in m.sites:
            target_template = resolve_template(m, name)
        elif fitted:
            if not fits[name]:
                raise ValueError(f"{m.path}: target site {name!r} has no slide that could be fitted")
            target_template = template_from_fits([f for _, f in fits[name]], params=m.params, seed=m.model.fit.seed)
        jobs = {
            (site, entry.source.name): normalize_to_target.with_options(
                timeout_seconds=timeout_s, task_run_name=f"normalize {site}/{entry.source.name}",
                tags=[f"site:{site}", f"method:{m.method}"],
            ).submit(entry, m, target_template if fitted else None, fit)
            for site in m.sites
            for entry, fit in fits[site]
        }
        written: dict[str, list[str]] = {site: [] for site in m.sites}
        for (site, slide_name), job in jobs.items():
            try:
                written[site].extend(job.result())
            except QCError as exc:
                problems.append(f"{site}/{slide_name}: needs review: {exc}")
            except Exception as exc:  # noqa: BLE001 - one slide's failure is reported, the others finish
                problems.append(f"{site}/{slide_name}: failed: {_failure(exc, timeout_s)}")
        for p in problems:
            logger.error("%s", p)
        first_fmt = {site: [p for p in paths if p.endswith(".ome.zarr")] or paths for site, paths in written.items()}
        before = {site: measure_site.with_options(task_run_name=f"measure {site} sources").submit(
            [str(e.source) for e, _ in fits[site]], outputs=False) for site in m.sites}
        after = {site: measure_site.with_options(task_run_name=f"measure {site} outputs").submit(
            first_fmt[site], outputs=True) for site in m.sites}
        before_stats = {s: f.result() for s, f in before.items()}
        after_stats = {s: f.result() for s, f in after.items()}
    if name in m.sites:
        target_stats = before_stats[name]
    else:
        assert target_template is not None  # a named template
        ref = target_template.reference
        target_stats = ColourStats(
            None if ref is None else ref.matrix.tolist(),
            [float("nan")] * 3 if ref is None else list(ref.lab_mean), None, 0,
        )
    rows = distance_rows(before_stats, after_stats, target_stats) if target_stats is not None else []
    create_table_artifact(rows, key=TABLE_KEY, description=f"colour distance of each site to {name}, before/after")
    plot = _plot(rows, name) if rows else ""
    if plot:
        create_image_artifact(plot, key="harmonize-sites-plot", description=f"distance to {name} before/after")
    failures = "".join(f"\n- {p}" for p in problems)
    create_markdown_artifact(
        f"# harmonize-sites: target `{name}`, method `{m.method}`\n\n{markdown_table(rows)}\n\n"
        + (f"![distances]({plot})\n\n" if plot else "")
        + (f"## Slides that failed or need review{failures}\n" if problems else ""),
        key="harmonize-sites-summary",
    )
    if problems:
        message = f"{len(problems)} slide(s) failed or need review: {'; '.join(problems)}"
        return Failed(message=message, data=RunFailed(message, rows))
    return Completed(message=f"{len(rows)} sites harmonized to {name}", data=rows)


def _failure(exc: BaseException, timeout_s: float) -> str:
    """One line for a failed task: a timeout in words, else the error's type and message."""
    if isinstance(exc, TimeoutError):
        return f"timed out: took longer than {timeout_s:g} s (slide_timeout_s)"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Command line: run once and print the distance table."""
    parser = argparse.ArgumentParser(prog="python -m flows.harmonize_sites", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="data_manifest.yaml")
    parser.add_argument("--target", default=None, help="site or template name")
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--dashboard", action="store_true", help="serve the local dask dashboard on 127.0.0.1")
    args = parser.parse_args(argv)
    configure_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Prefect's overloads type a flow returning Any, called with return_state=True, as an
    # Awaitable; this flow is sync and returns its final State
    with prefect_api():
        state = cast("State[Any]", harmonize_sites(manifest=args.manifest, target=args.target,
                                                   scheduler=args.scheduler, dashboard=args.dashboard,
                                                   return_state=True))
    print(markdown_table(state_rows(state)))
    print(f"state: {state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
