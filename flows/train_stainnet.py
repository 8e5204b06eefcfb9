"""Prefect flow ``train-stainnet``: distill StainNet from a slide-wide teacher over many slides.

One run: resolve the source slides and the target template (from a manifest: every slide of
the sites other than the template's own site, and the manifest's ``target`` template; or
explicit ``slides`` + a template JSON), then one task per slide samples tissue slide-wide and
maps it with the teacher (Macenko/Vahadane fitted on that slide, to the target), one task
trains StainNet on the pooled pairs (whole slides held out when there are >= 3), and one
task writes the model (``.safetensors`` with its metadata) and publishes the loss curve as a
markdown artifact and a table artifact.  A slide that fails (unreadable, no tissue) is
reported and left out; the run fails only when no slide is left.

Run::

    python -m flows.train_stainnet --manifest data_manifest.yaml --out models/stainnet.safetensors
    python -m flows.train_stainnet --slides b-1.tiff b-2.tiff b-3.tiff --target site-a.json --out m.safetensors
"""

from __future__ import annotations

if __name__ == "__main__":  # a program: Prefect's temporary API starts while the rest imports
    from flows._api import start as start_prefect_api

    start_prefect_api()

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import configure_process
from flows._api import prefect_api
from flows._artifacts import markdown_table
from flows._common import fetch_samples, generate_missing, resolve_template, scheduler_address
from flows.manifest import Manifest, load_manifest
from wsi_norm.errors import ManifestError, OutputError, WsiNormError
from wsi_norm.runtime import return_freed_memory
from wsi_norm.stainnet.teacher import DEFAULT_N_PIXELS_PER_SLIDE, TEACHERS, SlidePairs
from wsi_norm.stainnet.train import TrainResult

__all__ = [
    "FLOW_NAME",
    "loss_rows",
    "main",
    "manifest_sources",
    "manifest_target",
    "publish_task",
    "teach_slide_task",
    "train_stainnet_flow",
    "train_task",
]

FLOW_NAME = "train-stainnet"
LOSSES_KEY = "train-stainnet-losses"
SUMMARY_KEY = "train-stainnet-summary"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- plain helpers


def manifest_sources(manifest: Manifest, target_name: str, sites: list[str] | None = None) -> list[Path]:
    """Source slides of ``manifest``: the slides of ``sites`` (default: every site except the
    target template's own site), in manifest order."""
    if sites is not None:
        unknown = [s for s in sites if s not in manifest.sites]
        if unknown:
            raise manifest.error(("sites",), f"unknown site(s) {', '.join(unknown)}; known: {', '.join(manifest.sites)}")
        chosen = set(sites)
    else:
        own = manifest.templates[target_name].site
        chosen = {s for s in manifest.sites if s != own}
    return [entry.source for entry in manifest.slides if entry.site in chosen]


def manifest_target(manifest: Manifest, name: str | None, teacher: str) -> Any:
    """The target :class:`~wsi_norm.stain.template.Template` named ``name`` (default: the manifest's
    ``target``), of the teacher's method: a template of another method declared by site or
    slides is fitted again with the teacher (same sampling settings)."""
    from wsi_norm.pipeline import fit_template

    name = name or manifest.model.target
    if name is None:
        raise manifest.error(("target",), "no target template: declare one under 'templates' and name it in 'target'")
    if name not in manifest.templates:
        raise manifest.error(("target",), f"unknown template {name!r}; declared: {', '.join(manifest.templates)}")
    spec = manifest.templates[name]
    if manifest.method == teacher or spec.path is not None:
        return resolve_template(manifest, name)  # a JSON of another method: TemplateError below
    fit = manifest.model.fit
    return fit_template(list(spec.slides), method=teacher, params=manifest.params, n_pixels=fit.n_pixels, seed=fit.seed)


def loss_rows(result: TrainResult) -> list[dict[str, Any]]:
    """One row per epoch: losses in network units and in grey levels (x 127.5)."""

    def num(value: float, digits: int) -> float | None:
        return None if math.isnan(value) else round(value, digits)

    return [
        {
            "epoch": r.epoch,
            "train_l1": num(r.train_loss, 6),
            "heldout_l1": num(r.val_loss, 6),
            "train_grey": num(r.train_loss * 127.5, 3),
            "heldout_grey": num(r.val_loss * 127.5, 3),
            "lr": float(f"{r.lr:.3g}"),
            "seconds": round(r.seconds, 2),
        }
        for r in result.history
    ]


# --------------------------------------------------------------------------- tasks


@task(name="teach-slide", cache_policy=NO_CACHE)
def teach_slide_task(source: str, teacher: str, target: Any, n_pixels: int, seed: int) -> SlidePairs:
    """Sample one slide's tissue slide-wide and map it with the teacher (``teacher_pairs``)."""
    from wsi_norm.stainnet.teacher import teacher_pairs

    pairs = teacher_pairs(source, teacher=teacher, target=target, n_pixels=n_pixels, seed=seed)  # type: ignore[arg-type]
    get_run_logger().info("%s: %d %s teacher pairs", Path(source).name, len(pairs), teacher)
    return pairs


@task(name="train-stainnet", cache_policy=NO_CACHE, tags=["stainnet-train"])
def train_task(
    pairs: list[SlidePairs], target_summary: str, epochs: int, batch_size: int, seed: int, device: str
) -> TrainResult:
    """Train StainNet on the pooled pairs (``train_from_pairs``), logging every epoch."""
    from wsi_norm.stainnet.teacher import train_from_pairs

    logger = get_run_logger()

    def progress(record: Any) -> None:
        logger.info(
            "epoch %d/%d: train L1 %.5f, held-out L1 %.5f (%.2f grey levels)",
            record.epoch, epochs, record.train_loss, record.val_loss, record.val_loss * 127.5,
        )

    return train_from_pairs(
        pairs, target_template=target_summary, epochs=epochs, batch_size=batch_size, seed=seed,
        device=device, progress=progress,
    )


@task(name="publish-model", cache_policy=NO_CACHE)
def publish_task(result: TrainResult, out: str, overwrite: bool, failed: list[str]) -> dict[str, Any]:
    """Write the model file and publish the loss curve (markdown) and per-epoch losses (table)."""
    import json

    from wsi_norm.colormap.stainnet import save_stainnet

    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot create the output folder: {exc}") from exc
    save_stainnet(result.model, path, overwrite=overwrite)
    rows = loss_rows(result)
    meta = result.metadata
    data = json.loads(meta.training_data or "{}")
    trained = [s["name"] for s in data.get("slides", [])]
    held = [s["name"] for s in data.get("held_out_slides", [])]
    create_table_artifact(rows, key=LOSSES_KEY, description=f"per-epoch L1 losses of {path.name}")
    final_held = "n/a" if math.isnan(result.val_loss) else f"{result.val_loss * 127.5:.2f}"
    lines = [
        f"# {FLOW_NAME}",
        "",
        f"model `{path}`: StainNet distilled from **{meta.teacher}**, {meta.epochs} epochs, {meta.optimizer}",
        "",
        f"- trained on {len(trained)} slide(s): {', '.join(trained)}",
        f"- held out ({data.get('holdout', '?')}): {', '.join(held) or 'a pixel fraction'}",
        f"- final train L1 {result.history[-1].train_loss * 127.5:.2f}, held-out L1 {final_held} grey levels",
    ]
    if failed:
        lines.append(f"- left out (failed): {'; '.join(failed)}")
    lines += ["", "## Loss curve", "", markdown_table(rows)]
    create_markdown_artifact("\n".join(lines), key=SUMMARY_KEY, description=f"StainNet training of {path.name}")
    get_run_logger().info("%s: written (%d epochs, held-out L1 %s grey levels)", path, meta.epochs, final_held)
    return {
        "out": str(path),
        "teacher": meta.teacher,
        "slides": trained,
        "held_out": held,
        "failed": failed,
        "final_train_l1": result.history[-1].train_loss,
        "val_loss": None if math.isnan(result.val_loss) else result.val_loss,
        "epochs": meta.epochs,
    }


# --------------------------------------------------------------------------- flow


@flow(name=FLOW_NAME, log_prints=False)
def train_stainnet_flow(
    manifest: str | None = None,
    slides: list[str] | None = None,
    target: str | None = None,
    teacher: str = "macenko",
    epochs: int = 20,
    out: str = "models/stainnet.safetensors",
    sites: list[str] | None = None,
    n_pixels: int | None = None,
    batch_size: int = 4096,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Distill StainNet from a slide-wide teacher over a manifest's sites or listed slides.

    Parameters
    ----------
    manifest : str, optional
        Data manifest; sources are the slides of ``sites`` (default: all sites but the
        target template's), ``target`` names one of its templates (default its ``target``).
    slides : list of str, optional
        Explicit source slides (instead of ``manifest``); ``target`` is then a template JSON.
    target : str, optional
        Template name (with ``manifest``) or template JSON path (with ``slides``).
    teacher : {"macenko", "vahadane"}
    epochs : int
    out : str
        Model file to write (``.safetensors``).
    sites : list of str, optional
        Source sites of the manifest.
    n_pixels : int, optional
        Tissue pixels per slide (default: the manifest's ``fit.n_pixels``, else 200,000).
    batch_size, seed, device
        Training options (:func:`wsi_norm.stainnet.teacher.train_from_pairs`).
    overwrite : bool
        Replace an existing model file.
    scheduler : str, optional
        Dask scheduler address; default ``WSI_NORM_SCHEDULER``, else dask's threaded scheduler
        in this process.

    Returns
    -------
    dict
        Model path, teacher, trained / held-out / failed slides, final losses.
    """
    return_freed_memory()  # slides stream through this process (see wsi_norm.runtime)
    from wsi_norm.cluster import dask_scheduler
    from wsi_norm.stainnet.teacher import target_summary

    logger = get_run_logger()
    if (manifest is None) == (slides is None):
        raise ValueError("give exactly one of manifest and slides")
    if Path(out).exists() and not overwrite:
        from wsi_norm.errors import OutputExistsError

        raise OutputExistsError(f"{out}: exists; pass overwrite=True to replace it")
    # the teacher only samples each slide (windows, not the whole slide): dask's threaded
    # scheduler unless a scheduler is given, no local cluster to start
    with dask_scheduler(scheduler_address(scheduler), embedded_cluster=False):
        if manifest is not None:
            m = fetch_samples(load_manifest(manifest))
            if m.generated:
                generate_missing(m)
            name = target or m.model.target
            template = manifest_target(m, name, teacher)
            sources = [str(p) for p in manifest_sources(m, name or "", sites)]
            n_pixels = n_pixels or m.model.fit.n_pixels
        else:
            if target is None:
                raise ValueError("explicit slides need target (a template JSON)")
            from wsi_norm.stain.template import load_template

            template = load_template(target, method=teacher)
            sources = list(slides or [])
        n_pixels = n_pixels or DEFAULT_N_PIXELS_PER_SLIDE
        if not sources:
            raise ManifestError(f"{manifest}: no source slides (sites {sites or 'other than the target'})")
        logger.info("distilling %s to %d slide(s) into %s", teacher, len(sources), out)
        futures = {s: teach_slide_task.submit(s, teacher, template, n_pixels, seed) for s in sources}
        pairs: list[SlidePairs] = []
        failed: list[str] = []
        for source, future in futures.items():
            try:
                pairs.append(future.result())
            except WsiNormError as exc:
                logger.error("%s: left out: %s", source, exc)
                failed.append(f"{Path(source).name}: {exc}")
    if not pairs:
        raise WsiNormError(f"no slide gave training pairs ({len(failed)} failed)")
    result = train_task(pairs, target_summary(template), epochs, batch_size, seed, device)
    return publish_task(result, out, overwrite, failed)


def main(argv: list[str] | None = None) -> int:
    """Command line: one run of the flow."""
    parser = argparse.ArgumentParser(prog="python -m flows.train_stainnet", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="data manifest (sources: the sites other than the target's)")
    source.add_argument("--slides", nargs="+", help="explicit source slides (needs --target JSON)")
    parser.add_argument("--target", default=None, help="template name (manifest) or template JSON (slides)")
    parser.add_argument("--sites", nargs="+", default=None, help="source sites of the manifest")
    parser.add_argument("--teacher", choices=TEACHERS, default=TEACHERS[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n-pixels", type=int, default=None, help="tissue pixels per slide")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="models/stainnet.safetensors")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--scheduler", default=None, help="dask scheduler address (default: WSI_NORM_SCHEDULER or local)")
    args = parser.parse_args(argv)
    configure_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with prefect_api():
        state = train_stainnet_flow(
            manifest=args.manifest, slides=args.slides, target=args.target, teacher=args.teacher,
            epochs=args.epochs, out=args.out, sites=args.sites, n_pixels=args.n_pixels, seed=args.seed,
            device=args.device, overwrite=args.overwrite, scheduler=args.scheduler, return_state=True,
        )
        if not state.is_completed():
            print(f"state: {state.name}: {state.message}", file=sys.stderr)
            return 1
        summary = state.result()
    print(f"{summary['out']}: StainNet from {summary['teacher']}, {len(summary['slides'])} slide(s) trained, "
          f"held out {', '.join(summary['held_out']) or 'a pixel fraction'}, "
          f"{len(summary['failed'])} failed; artifacts {SUMMARY_KEY!r}, {LOSSES_KEY!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
