"""StainNet distilled from slide-wide teachers: library, CLI and the ``train-stainnet`` flow.

Generated Beer-Lambert slides: the same seed rendered with two stain presets is the same
tissue, i.e. a registered pair whose site-a rendering is the ground truth of normalizing the
site-b rendering to site-a.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_norm.color import is_background
from wsi_norm.metrics import psnr, ssim
from wsi_norm.slide import open_slide

SIDE_PX = 1536
N_PIXELS = 200_000


def _generate(folder: Path, site: str, seed: int) -> Path:
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    path = folder / f"{site}-{seed}.tiff"
    if not path.exists():
        generate_slide(path, width=SIDE_PX, height=SIDE_PX, stain_matrix=SITE_STAINS[site], seed=seed, tile_px=512)
    return path


def _full(path: Path) -> np.ndarray:
    with open_slide(path) as slide:
        return slide.read_region(0, x=0, y=0, width=SIDE_PX, height=SIDE_PX)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Site-b sources (seeds 1-3), a held-out site-b slide (seed 4) with its site-a truth, and a
    site-a Macenko template fitted from the site-a renderings of seeds 1-3."""
    from wsi_norm.pipeline import fit_template
    from wsi_norm.stain.template import save_template

    folder = tmp_path_factory.mktemp("distill")
    sources = [_generate(folder, "site-b", s) for s in (1, 2, 3)]
    references = [_generate(folder, "site-a", s) for s in (1, 2, 3)]
    template = fit_template(references, method="macenko", n_pixels=N_PIXELS)
    template_path = folder / "site-a.macenko.json"
    save_template(template, template_path)
    return {
        "folder": folder,
        "sources": sources,
        "template": template,
        "template_path": template_path,
        "heldout": _generate(folder, "site-b", 4),
        "truth": _generate(folder, "site-a", 4),
    }


@pytest.fixture(scope="module")
def distilled(cohort: dict[str, Any]) -> Any:
    from wsi_norm.stainnet.teacher import distill_stainnet

    records: list[Any] = []
    result = distill_stainnet(
        cohort["sources"], teacher="macenko", target=cohort["template"], n_pixels_per_slide=N_PIXELS,
        seed=0, epochs=10, batch_size=2048, progress=records.append,
    )
    return result, records


def _cohort_teacher(cohort: dict[str, Any]) -> Any:
    """The teacher, computed independently: one Macenko map from the source cohort (median of
    the sources' slide-wide fits, as ``wsi-norm fit``) to the target template."""
    from wsi_norm.colormap import compile_colormap
    from wsi_norm.pipeline import fit_template, resolve_params

    source = fit_template(cohort["sources"], method="macenko", n_pixels=N_PIXELS)
    params = resolve_params(None, seed=0)
    return compile_colormap("macenko", source.stats, cohort["template"].stats, params,
                            source_white=source.white.array, target_white=cohort["template"].white.array)


# --------------------------------------------------------------------------- library


def test_student_imitates_teacher_and_matches_truth_on_heldout_slide(cohort: dict[str, Any], distilled: Any) -> None:
    from wsi_norm.colormap.stainnet import StainNetMap

    result, records = distilled
    student = StainNetMap(result.model)
    teacher_map = _cohort_teacher(cohort)

    # on a training slide the student reproduces its teacher (distillation fidelity)
    train_img = _full(cohort["sources"][0])
    train_tissue = ~is_background(train_img)
    fit_psnr = psnr(student.apply(train_img), teacher_map.apply(train_img), mask=train_tissue)

    # on a slide it never saw: against the teacher's output there, and against the truth
    img = _full(cohort["heldout"])
    tissue = ~is_background(img)
    teacher = teacher_map.apply(img)
    out = student.apply(img)
    truth = _full(cohort["truth"])
    vs_teacher, vs_teacher_ssim = psnr(out, teacher, mask=tissue), ssim(out, teacher, mask=tissue)
    student_truth, teacher_truth = psnr(out, truth, mask=tissue), psnr(teacher, truth, mask=tissue)
    print(
        f"\ntraining slide: student vs teacher PSNR {fit_psnr:.2f} dB\n"
        f"held-out slide: student vs teacher PSNR {vs_teacher:.2f} dB, SSIM {vs_teacher_ssim:.4f}; "
        f"vs truth: student {student_truth:.2f} dB, teacher {teacher_truth:.2f} dB, "
        f"source {psnr(img, truth, mask=tissue):.2f} dB; held-out L1 {result.val_loss * 127.5:.2f} grey"
    )
    assert fit_psnr >= 35.0
    assert vs_teacher >= 35.0 and vs_teacher_ssim >= 0.98
    assert student_truth >= teacher_truth - 1.0
    assert len(records) == 10 and tuple(records) == result.history


def test_three_slides_hold_out_the_last_slide_and_metadata_names_everything(
    cohort: dict[str, Any], distilled: Any
) -> None:
    from wsi_norm.stainnet.teacher import heldout_l1, teacher_pairs

    result, _ = distilled
    meta = result.metadata
    assert meta.teacher == "macenko" and meta.epochs == 10
    target = json.loads(meta.target_template)
    assert target["method"] == "macenko"
    np.testing.assert_allclose(target["stats"]["stain_matrix"], cohort["template"].stats.stain_matrix)
    data = json.loads(meta.training_data)
    assert data["holdout"] == "slides"
    assert [s["name"] for s in data["slides"]] == ["site-b-1.tiff", "site-b-2.tiff"]
    assert [s["name"] for s in data["held_out_slides"]] == ["site-b-3.tiff"]
    with open_slide(cohort["sources"][2]) as slide:
        assert data["held_out_slides"][0]["header_sha256"] == slide.identity()["header_sha256"]
    # the per-epoch validation loss is exactly the held-out slide's loss
    # (the teacher is the cohort map; teacher_pairs, one slide's own map, is a different one)
    from wsi_norm.colormap import compile_colormap
    from wsi_norm.pipeline import fit_slide, fit_template
    from wsi_norm.stainnet.teacher import _glass_pixels
    from wsi_norm.stainnet.train import pairs_from_teacher

    held = fit_slide(cohort["sources"][2], method="macenko", n_pixels=N_PIXELS, seed=0)
    cohort_stats = fit_template(cohort["sources"], method="macenko", n_pixels=N_PIXELS).stats
    teacher = compile_colormap("macenko", cohort_stats, cohort["template"].stats, source_white=held.white.array,
                               target_white=cohort["template"].white.array)
    # the slide's tissue and, 15 % as many, its glass (the student learns glass too)
    assert held.pixels is not None  # narrows SlideFit.pixels (None only when the fit keeps no pixels)
    glass = _glass_pixels(held.white.array, int(0.15 * len(held.pixels)), seed=len(held.pixels))
    inputs, targets = pairs_from_teacher(np.concatenate([held.pixels, glass]), teacher.evaluate_numpy)
    assert heldout_l1(result.model, inputs, targets) == pytest.approx(result.val_loss, rel=1e-4)
    own = teacher_pairs(cohort["sources"][2], teacher="macenko", target=cohort["template"], n_pixels=N_PIXELS, seed=0)
    assert np.array_equal(own.inputs, inputs) and not np.array_equal(own.targets, targets)
    assert meta.val_loss == pytest.approx(result.val_loss)
    assert math.isfinite(meta.final_loss) and meta.final_loss < 0.03  # < 3.8 grey levels


def test_two_slides_hold_out_pixels_and_registered_pairs_train(cohort: dict[str, Any]) -> None:
    from wsi_norm.stainnet.teacher import distill_from_pairs, registered_pairs

    pairs = registered_pairs(cohort["heldout"], cohort["truth"], n_pixels=20_000, seed=3)
    assert len(pairs) == 20_000 and pairs.teacher == "registered pairs"
    # the same positions: the site-b and site-a renderings of one tissue are strongly related
    assert np.corrcoef(pairs.inputs[:, 1].astype(float), pairs.targets[:, 1].astype(float))[0, 1] > 0.8
    result = distill_from_pairs(
        [cohort["sources"][0], cohort["heldout"]], [cohort["folder"] / "site-a-1.tiff", cohort["truth"]],
        n_pixels_per_slide=20_000, epochs=2, batch_size=1024,
    )
    data = json.loads(result.metadata.training_data)
    assert data["holdout"] == "pixels" and data["held_out_slides"] == []
    assert data["slides"][1]["target"]["name"] == "site-a-4.tiff"
    assert result.metadata.teacher == "registered pairs" and math.isfinite(result.val_loss)


def test_wrong_target_method_and_mismatched_pairs_raise(cohort: dict[str, Any], tmp_path: Path) -> None:
    from wsi_norm.errors import FitError, TemplateError
    from wsi_norm.stainnet.teacher import distill_stainnet, registered_pairs
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    with pytest.raises(TemplateError, match="template is for method 'macenko', but 'vahadane'"):
        distill_stainnet(cohort["sources"][:1], teacher="vahadane", target=cohort["template_path"], epochs=1)
    with pytest.raises(TemplateError, match="teacher is 'vahadane'"):
        distill_stainnet(cohort["sources"][:1], teacher="vahadane", target=cohort["template"], epochs=1)
    small = tmp_path / "small.tiff"
    generate_slide(small, width=1024, height=1024, stain_matrix=SITE_STAINS["site-a"], seed=1, tile_px=512)
    with pytest.raises(FitError, match=r"small\.tiff: registered target is 1024x1024 px"):
        registered_pairs(cohort["heldout"], small)


# --------------------------------------------------------------------------- CLI


def test_cli_trains_model_that_normalize_uses_and_refuses_overwrite(
    cohort: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsi_norm.cli import main
    from wsi_norm.colormap.stainnet import load_stainnet
    from wsi_norm.writers import read_level

    model = tmp_path / "student.safetensors"
    argv = ["stainnet", "train", *map(str, cohort["sources"][:2]), "--teacher", "macenko",
            "--target", str(cohort["template_path"]), "-o", str(model), "--epochs", "2",
            "--n-pixels", "30000", "--batch-size", "1024"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "epoch 1/2: train L1" in captured.err and "epoch 2/2" in captured.err
    assert "StainNet distilled from macenko on 2 slide(s)" in captured.out
    weights = load_stainnet(model)
    assert weights.metadata.teacher == "macenko" and weights.metadata.epochs == 2
    assert "site-b-1.tiff" in weights.metadata.training_data

    assert main(argv) == 2
    assert f"{model}: exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "-q"]) == 0

    out = tmp_path / "out.ome.zarr"
    source = cohort["sources"][0]
    assert main(["normalize", str(source), "--method", "stainnet", "--weights", str(model), "-o", str(out), "-q"]) == 0
    normalized, original = read_level(out, 0), _full(source)
    tissue = ~is_background(original)
    diff = np.abs(normalized.astype(int) - original.astype(int)).mean(axis=-1)
    assert normalized.shape == original.shape
    assert diff[tissue].mean() > 5.0  # tissue restained towards site-a
    # glass is rendered in the target's white point, as the teacher renders it
    target_white = np.array(cohort["template"].white.rgb)
    assert np.abs(np.median(normalized[~tissue], axis=0) - target_white).max() <= 3.0


# --------------------------------------------------------------------------- flow


def test_flow_tasks_via_fn(cohort: dict[str, Any], tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger

    from flows.train_stainnet import loss_rows, teach_slide_task, train_task
    from wsi_norm.stainnet.teacher import target_summary

    with disable_run_logger():
        pairs = [teach_slide_task.fn(str(s), "macenko", cohort["template"], 20_000, 0) for s in cohort["sources"]]
        result = train_task.fn(pairs, target_summary(cohort["template"]), 2, 1024, 0, "cpu")
    assert [len(p) for p in pairs] == [23_000] * 3  # 20,000 tissue pixels and 15 % glass
    rows = loss_rows(result)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["heldout_grey"] == pytest.approx(result.val_loss * 127.5, abs=1e-3)


@pytest.fixture()
def prefect_api(tmp_path: Path) -> Iterator[Path]:
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path / "prefect-home"
    home.mkdir()
    with (
        temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield home


def test_flow_run_writes_model_and_artifacts(cohort: dict[str, Any], tmp_path: Path, prefect_api: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    from flows._common import read_flow_run_artifacts
    from flows.train_stainnet import LOSSES_KEY, SUMMARY_KEY, train_stainnet_flow
    from wsi_norm.colormap.stainnet import load_stainnet

    out = tmp_path / "models" / "flow.safetensors"
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide")
    state = train_stainnet_flow(
        slides=[*map(str, cohort["sources"]), str(bad)], target=str(cohort["template_path"]),
        teacher="macenko", epochs=2, out=str(out), n_pixels=20_000, batch_size=1024, return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["held_out"] == ["site-b-3.tiff"] and len(summary["failed"]) == 1
    assert "bad.svs" in summary["failed"][0]
    assert load_stainnet(out).metadata.teacher == "macenko"

    run_id = state.state_details.flow_run_id
    assert run_id is not None  # narrows the Optional for the client call

    async def read() -> list[Any]:
        async with get_client() as client:
            return await read_flow_run_artifacts(client, run_id)

    artifacts = {a.key: a for a in asyncio.run(read()) if a.key}
    assert {LOSSES_KEY, SUMMARY_KEY} <= set(artifacts)
    assert "## Loss curve" in artifacts[SUMMARY_KEY].data and "bad.svs" in artifacts[SUMMARY_KEY].data
    table = artifacts[LOSSES_KEY].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["epoch"] for r in rows] == [1, 2]


def test_manifest_sources_and_teacher_template(cohort: dict[str, Any]) -> None:
    from flows.manifest import load_manifest
    from flows.train_stainnet import manifest_sources, manifest_target
    from wsi_norm.errors import ManifestError

    path = cohort["folder"] / "manifest.yaml"
    path.write_text(
        "version: 1\noutput_root: out\nmethod: macenko\nfit: {n_pixels: 20000}\n"
        "sites:\n  site-a: {slides: ['site-a-*.tiff']}\n  site-b: {slides: ['site-b-*.tiff']}\n"
        "templates:\n  ref: {site: site-a}\ntarget: ref\n",
        encoding="utf-8",
    )
    m = load_manifest(path)
    assert [p.name for p in manifest_sources(m, "ref")] == [f"site-b-{s}.tiff" for s in (1, 2, 3, 4)]
    assert manifest_sources(m, "ref", ["site-a"])[0].name == "site-a-1.tiff"
    with pytest.raises(ManifestError, match="unknown site"):
        manifest_sources(m, "ref", ["site-z"])
    assert manifest_target(m, None, "macenko").method == "macenko"
    vahadane = manifest_target(m, "ref", "vahadane")  # the manifest's method is macenko: fitted again
    assert vahadane.method == "vahadane" and len(vahadane.slides) == 4
