"""One slide end to end: fit slide-wide, normalize through dask, write, and the CLI over it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_norm import FitError, OutputExistsError, TemplateError, open_slide
from wsi_norm.cli import main
from wsi_norm.metrics import psnr, ssim
from wsi_norm.pipeline import FitOptions, fit_template, normalize_slide, output_is_current
from wsi_norm.stain.template import load_template, save_template
from wsi_norm.tissue.mask import is_background
from wsi_norm.writers import read_level, read_provenance


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registered pair: the same generated tissue rendered with two stain sets (JPEG q90)."""
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    folder = tmp_path_factory.mktemp("pair")
    a, b = folder / "site-a.tiff", folder / "site-b.tiff"
    generate_slide(a, width=2048, height=1536, seed=5, stain_matrix=SITE_STAINS["site-a"], tile_px=256)
    generate_slide(b, width=2048, height=1536, seed=5, stain_matrix=SITE_STAINS["site-b"], tile_px=256)
    return a, b


def test_none_copies_level0_exactly(sample_svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.ome.zarr"
    result = normalize_slide(sample_svs, out, method="none")
    assert result.out == out
    source = open_slide(sample_svs).read_region(0, x=0, y=0, width=2220, height=2967)
    np.testing.assert_array_equal(read_level(out, 0), source)
    record = read_provenance(out)
    assert record["method"] == "none"
    assert record["source"]["header_sha256"] == open_slide(sample_svs).identity()["header_sha256"]
    assert record["written"]["mpp"] == pytest.approx([0.499, 0.499])


@pytest.mark.parametrize("method", ["macenko", "vahadane", "reinhard", "histmatch"])
def test_no_seams_tile_size_does_not_change_output(
    sample_svs: Path, shared_data: Path, tmp_path: Path, method: str
) -> None:
    template = fit_template([shared_data / "he" / "torchstain-target.png"], method=method,
                            n_pixels=100_000)
    outs = []
    for tile in (256, 1024):
        out = tmp_path / f"{method}-{tile}.ome.zarr"
        result = normalize_slide(
            sample_svs,
            out,
            method=method,
            target=template,
            chunk_px=tile,
            fit=FitOptions(n_pixels=100_000),
        )
        assert result.provenance["chunk_px"] == ([240, 240] if tile == 256 else [960, 960])
        outs.append(read_level(out, 0))
    np.testing.assert_array_equal(outs[0], outs[1])
    source = open_slide(sample_svs).read_region(0, x=0, y=0, width=2220, height=2967)
    tissue = ~is_background(source)
    assert np.abs(outs[0][tissue].astype(int) - source[tissue]).mean() > 1  # it did change colour
    # glass is mapped too: the slide's white point (246, 243, 243) goes to the target's (fallback 240)
    assert result.provenance["white_point"]["source"]["source"] == "glass"
    glass = np.all(np.abs(source.astype(int) - [246, 243, 243]) <= 1, axis=-1)
    assert np.abs(np.median(outs[0][glass], axis=0) - np.array(template.white.rgb)).max() <= 2


@pytest.mark.parametrize("method", ["macenko", "reinhard", "histmatch", "gmm"])
def test_small_slide_direct_map_equals_the_table(sample_svs: Path, shared_data: Path, method: str) -> None:
    # a slide under 256^3 px is mapped by direct evaluation per chunk, a larger one through a
    # table filled with its own colours (each distinct colour evaluated once, into a memo the
    # dask threads fill together) or the whole 256^3 table: the same bytes, here on uneven
    # chunks of the real slide
    from wsi_norm.pipeline import apply_colormap, compile_checked, fit_slide

    template = fit_template([shared_data / "he" / "torchstain-target.png"], method=method, n_pixels=100_000)
    slide = open_slide(sample_svs)
    cmap, _ = compile_checked(fit_slide(slide, method=method, n_pixels=100_000), template)
    level0 = slide.to_dask(0, chunk_px=500)
    direct = apply_colormap(level0, cmap, direct=True).compute()  # type: ignore[no-untyped-call]
    memo = apply_colormap(level0, cmap, memo=True).compute()  # type: ignore[no-untyped-call]
    cmap.lut()
    table = apply_colormap(level0, cmap).compute()  # type: ignore[no-untyped-call]
    assert direct.shape == (2967, 2220, 3) and np.array_equal(direct, table) and np.array_equal(memo, table)


@pytest.mark.parametrize("method", ["reinhard", "gmm"])
def test_a_large_slide_is_mapped_without_the_whole_table(sample_svs: Path, shared_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # a slide holds far fewer colours than the 256^3 cube, so a large slide evaluates only its
    # own colours (memo) rather than all 256^3 first where the table is costly (gmm: 3.7 CPU-s,
    # Reinhard 1.4-2.4); the same file as through the whole table
    from wsi_norm import pipeline
    from wsi_norm.colormap import clear_lut_cache
    from wsi_norm.colormap.maps import _LUT_CACHE

    monkeypatch.setattr(pipeline, "_LUT_WORTH_PX", 1 << 20)  # CMU (6.6 MP) counts as a large slide
    template = fit_template([shared_data / "he" / "torchstain-target.png"], method=method, n_pixels=50_000)
    source_fit = pipeline.fit_slide(sample_svs, method=method, n_pixels=50_000)
    map_class = type(pipeline.compile_checked(source_fit, template)[0])
    assert map_class.memo_for_slides
    outs = []
    for memo in (True, False):
        clear_lut_cache()
        monkeypatch.setattr(map_class, "memo_for_slides", memo)
        out = normalize_slide(sample_svs, tmp_path / f"memo-{memo}.tiff", method=method, target=template,
                              source_fit=source_fit, chunk_px=512, fit=FitOptions(n_pixels=50_000)).out
        assert bool(_LUT_CACHE) is not memo  # the whole table is built only without the memo
        outs.append(read_level(out, 0))
    assert outs[0].shape == (2967, 2220, 3) and np.array_equal(outs[0], outs[1])


def test_a_cluster_evaluates_each_colour_once_not_once_per_task(shared_data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # on a distributed cluster each block of the pyramid is a task whose graph is pickled on its
    # own, so each holds its own copy of the map, even on the embedded in-process cluster; the
    # colours must still be evaluated into one table per map and process (each copy had filled
    # its own: 64 tables and 2.4 GiB on a 268-MP slide), and the file must be the threaded run's
    from wsi_norm import pipeline
    from wsi_norm.cluster import dask_client
    from wsi_norm.colormap import clear_lut_cache, memo
    from wsi_norm.testing.synthetic import generate_slide

    slide = tmp_path / "slide.tiff"
    generate_slide(slide, width=3072, height=3072, seed=3, tile_px=512)
    monkeypatch.setattr(pipeline, "_LUT_WORTH_PX", 1 << 20)  # 9.4 MP counts as a large slide
    tables: list[object] = []
    plain_init = memo.MemoTable.__init__

    def counted(self: memo.MemoTable, evaluate: Any) -> None:
        tables.append(self)
        plain_init(self, evaluate)

    monkeypatch.setattr(memo.MemoTable, "__init__", counted)
    template = fit_template([shared_data / "he" / "torchstain-target.png"], method="reinhard", n_pixels=50_000)
    source_fit = pipeline.fit_slide(slide, method="reinhard", n_pixels=50_000)
    outs = []
    for name in ("threads", "cluster"):
        clear_lut_cache()
        tables.clear()
        with dask_client(threads=2) if name == "cluster" else contextlib.nullcontext():
            out = normalize_slide(slide, tmp_path / f"{name}.tiff", method="reinhard", target=template,
                                  source_fit=source_fit, fit=FitOptions(n_pixels=50_000)).out
        assert len(tables) == 1, f"{name}: {len(tables)} tables filled"
        outs.append(read_level(out, 0))
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("method", ["none", "macenko"])
def test_small_slide_in_memory_equals_the_chunked_path(
    sample_svs: Path, shared_data: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a small slide written as TIFF without a cluster is held in memory (no dask.array, no
    # numba); with a cluster it streams in chunks: the same tiles, byte for byte
    from wsi_norm import pipeline

    reference = shared_data / "he" / "torchstain-target.png"
    kwargs = {} if method == "none" else {"reference": reference}
    paths = {}
    for name, no_cluster in (("memory", True), ("chunked", False)):
        monkeypatch.setattr(pipeline, "_no_cluster", lambda flag=no_cluster: flag)
        paths[name] = normalize_slide(sample_svs, tmp_path / f"{name}.tiff", method=method,
                                      fit=FitOptions(n_pixels=50_000), **kwargs).out

    memory, chunked = _tile_bytes(paths["memory"]), _tile_bytes(paths["chunked"])
    assert len(memory) > 100 and memory == chunked


def _tile_bytes(path: Path) -> list[bytes]:
    """Every encoded tile of a TIFF, as stored, level after level."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        out = []
        for page in tif.pages:
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                tif.filehandle.seek(offset)
                out.append(tif.filehandle.read(count))
        return out


@pytest.mark.parametrize("method", ["none", "macenko", "reinhard"])
def test_a_large_slide_on_threads_equals_the_dask_path(
    sample_svs: Path, shared_data: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a slide too large to hold in memory, written as TIFF without a cluster, is computed block
    # by block on plain threads (LazyLevel: no dask graph, no dask.array); through dask's
    # threaded scheduler it is the same tiles, byte for byte (Reinhard: through its memo)
    from wsi_norm import pipeline

    monkeypatch.setattr(pipeline, "_LUT_WORTH_PX", 1 << 20)  # CMU (6.6 MP) counts as a large slide
    kwargs = {} if method == "none" else {"reference": shared_data / "he" / "torchstain-target.png"}
    paths = {}
    for name, on_threads in (("threads", True), ("dask", False)):
        monkeypatch.setattr(pipeline, "runs_on_threads", lambda flag=on_threads, **k: flag)
        paths[name] = normalize_slide(sample_svs, tmp_path / f"{name}.tiff", method=method, chunk_px=512,
                                      fit=FitOptions(n_pixels=50_000), **kwargs).out
    threads, dask = _tile_bytes(paths["threads"]), _tile_bytes(paths["dask"])
    assert len(threads) > 100 and threads == dask
    if method == "macenko":  # an OME-Zarr alike: every level the same pixels
        zarrs = {}
        for name, on_threads in (("threads", True), ("dask", False)):
            monkeypatch.setattr(pipeline, "runs_on_threads", lambda flag=on_threads, **k: flag)
            zarrs[name] = normalize_slide(sample_svs, tmp_path / f"{name}.ome.zarr", method=method, chunk_px=512,
                                          fit=FitOptions(n_pixels=50_000), **kwargs).out
        for level in range(3):
            np.testing.assert_array_equal(read_level(zarrs["threads"], level), read_level(zarrs["dask"], level))


def test_a_large_slide_run_imports_no_dask_array(
        shared_data: Path, tmp_path: Path,
        cli_imports: Callable[[list[str], tuple[str, ...]], tuple[int, list[bool]]]) -> None:
    # dask.array costs 0.4-0.7 s of imports (scipy.sparse, scipy.fft) and a graph per block; a
    # slide written without a cluster needs neither, nor dask itself (the sample's windows run on
    # a plain thread pool), as TIFF or OME-Zarr
    from wsi_norm.testing.synthetic import generate_slide

    slide = tmp_path / "large.tiff"
    generate_slide(slide, width=4352, height=4096, seed=5, tile_px=512)  # 17.8 MP: not held in memory
    for out in ("o.tiff", "o.ome.zarr"):
        rc, imported = cli_imports(
            ["normalize", str(slide), "--method", "macenko", "--reference",
             str(shared_data / "he" / "torchstain-target.png"), "-o", str(tmp_path / out), "-q"],
            ("dask", "dask.array"))
        assert (rc, imported) == (0, [False, False]), out


def test_small_slide_run_imports_no_dask_numba_or_ndimage(
        sample_svs: Path, shared_data: Path, tmp_path: Path,
        cli_imports: Callable[[list[str], tuple[str, ...]], tuple[int, list[bool]]]) -> None:
    # the start-up a biopsy pays: dask.array (with scipy.fft and scipy.sparse), numba and
    # scipy.ndimage cost ~0.6 s of imports that a slide held in memory does not need, and dask
    # itself (its scheduler set up for nothing) 0.08 s
    rc, imported = cli_imports(
        ["normalize", str(sample_svs), "--method", "macenko", "--reference",
         str(shared_data / "he" / "torchstain-target.png"), "-o", str(tmp_path / "o.tiff"), "-q"],
        ("dask", "dask.array", "numba", "scipy.ndimage"))
    assert (rc, imported) == (0, [False, False, False, False])


def test_registered_pair_through_the_pipeline(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    template = fit_template([b], method="macenko", n_pixels=200_000)
    out = tmp_path / "a-to-b.ome.zarr"
    normalize_slide(a, out, method="macenko", target=template, fit=FitOptions(n_pixels=200_000))
    got = read_level(out, 0)
    want = open_slide(b).read_region(0, x=0, y=0, width=2048, height=1536)
    before = open_slide(a).read_region(0, x=0, y=0, width=2048, height=1536)
    tissue = ~is_background(want)
    p_after, s_after = psnr(got, want, mask=tissue), ssim(got, want, mask=tissue)
    p_before, s_before = psnr(before, want, mask=tissue), ssim(before, want, mask=tissue)
    print(f"registered pair: before PSNR {p_before:.1f} dB SSIM {s_before:.3f}; "
          f"after PSNR {p_after:.1f} dB SSIM {s_after:.3f}")
    assert p_after >= 30 and s_after >= 0.95
    assert p_after > p_before


def test_slide_wide_macenko_recovers_the_true_stains(pair: tuple[Path, Path]) -> None:
    """Beer-Lambert slides with known stains, JPEG q90 4:2:0 tiles (site-b's eosin has red OD 0.07)."""
    from wsi_norm.pipeline import fit_slide
    from wsi_norm.stain.base import stain_angles_deg
    from wsi_norm.testing.synthetic import SITE_STAINS

    for path, site in zip(pair, ("site-a", "site-b"), strict=True):
        fit = fit_slide(path, method="macenko", n_pixels=200_000)
        h, e = stain_angles_deg(fit.stats.stain_matrix, SITE_STAINS[site])
        print(f"macenko {site}: H {h:.2f} deg, E {e:.2f} deg off the truth")
        assert h < 2.0 and e < 2.0, (site, h, e)


def test_output_is_current_tracks_the_request(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    template = fit_template([b], method="reinhard", n_pixels=50_000)
    out = tmp_path / "a.tiff"
    normalize_slide(a, out, method="reinhard", target=template, fit=FitOptions(n_pixels=50_000))
    assert output_is_current(out, source=a, method="reinhard", target=template, fit=FitOptions(n_pixels=50_000))
    # the sampling size decides the fit: another one is another request
    assert not output_is_current(out, source=a, method="reinhard", target=template)
    other = fit_template([a], method="reinhard", n_pixels=50_000)
    assert not output_is_current(out, source=a, method="reinhard", target=other, fit=FitOptions(n_pixels=50_000))
    assert not output_is_current(out, source=b, method="reinhard", target=template, fit=FitOptions(n_pixels=50_000))
    assert not output_is_current(tmp_path / "missing.tiff", source=a, method="reinhard",
                                 target=template)


def test_refuses_existing_output_before_work(sample_svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.tiff"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match=r"exists\.tiff: exists"):
        normalize_slide(sample_svs, out, method="none")
    assert out.read_bytes() == b"precious"


def test_glass_only_slide_is_a_fit_error(tmp_path: Path, shared_data: Path) -> None:
    glass = tmp_path / "glass.png"
    Image.fromarray(np.full((512, 512, 3), 238, np.uint8)).save(glass)
    with pytest.raises(FitError, match=r"glass\.png: no tissue found"):
        normalize_slide(glass, tmp_path / "out.ome.zarr", method="macenko",
                        reference=shared_data / "he" / "torchstain-target.png")
    assert not (tmp_path / "out.ome.zarr").exists()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("method", ["macenko", "reinhard", "gmm"])
def test_grayscale_slide_is_a_fit_error_that_says_so(tmp_path: Path, shared_data: Path, method: str) -> None:
    # a single-channel TIFF is read as R = G = B: no stain colour to fit; the error says why
    rgb = np.asarray(Image.open(shared_data / "he" / "torchstain-target.png").convert("RGB"))
    grey = tmp_path / "grey.tiff"
    tifffile.imwrite(grey, np.tile(rgb[..., 1], (2, 2)), tile=(256, 256))
    with pytest.raises(FitError, match=r"grey\.tiff: every sampled tissue pixel is grey \(R = G = B\)"):
        normalize_slide(grey, tmp_path / "out.tiff", method=method,
                        reference=shared_data / "he" / "torchstain-target.png")
    assert not (tmp_path / "out.tiff").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_template_of_another_method_is_refused(shared_data: Path, tmp_path: Path) -> None:
    template = fit_template([shared_data / "he" / "torchstain-target.png"], method="reinhard")
    path = tmp_path / "reinhard.json"
    save_template(template, path)
    with pytest.raises(TemplateError, match="reinhard"):
        normalize_slide(shared_data / "he" / "torchstain-source.png", tmp_path / "o.ome.zarr",
                        method="macenko", target=path)


# ------------------------------------------------------------------ CLI
def test_cli_fit_then_normalize(shared_data: Path, sample_svs: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "target.json"
    assert main(["fit", str(shared_data / "he" / "torchstain-target.png"), "--method", "macenko",
                 "-o", str(template), "--n-pixels", "50000"]) == 0
    doc = json.loads(template.read_text())
    assert doc["method"] == "macenko"
    assert np.allclose(np.linalg.norm(doc["stain_matrix"], axis=1), 1.0)
    assert len(doc["max_concentrations"]) == 2
    again = tmp_path / "again.json"
    assert main(["fit", str(shared_data / "he" / "torchstain-target.png"), "--method", "macenko",
                 "-o", str(again), "--n-pixels", "50000"]) == 0
    assert json.loads(again.read_text())["stain_matrix"] == doc["stain_matrix"]  # seeded

    out = tmp_path / "cmu.tiff"
    assert main(["normalize", str(sample_svs), "--method", "macenko", "--target", str(template),
                 "-o", str(out), "-q"]) == 0
    import openslide

    with openslide.OpenSlide(str(out)) as osr:
        assert osr.dimensions == (2220, 2967)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.499)
    capsys.readouterr()
    assert main(["normalize", str(sample_svs), "--method", "macenko", "--target", str(template),
                 "-o", str(out), "-q"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert load_template(template, method="macenko").method == "macenko"


def test_cli_missing_target_is_one_line(sample_svs: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["normalize", str(sample_svs), "--method", "vahadane", "-o",
                 str(tmp_path / "x.tiff")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wsi-norm: error: --method vahadane needs --target or --reference"]


def test_overwrite_never_replaces_the_slide_being_read(shared_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``overwrite`` replaces an earlier output, not an input: the source or the reference as the
    output (however spelled, or through a link to it), or a folder holding the source, is
    refused before anything is written, and the file is unchanged. A link at the output path is
    replaced, not followed, so writing there is allowed and leaves the source intact."""
    import hashlib

    from wsi_norm.errors import OutputError
    from wsi_norm.writers import WriterOptions

    src = tmp_path / "patch.tiff"
    Image.open(shared_data / "he" / "torchstain-source.png").convert("RGB").save(src)
    ref = tmp_path / "ref.tiff"
    Image.open(shared_data / "he" / "torchstain-target.png").convert("RGB").save(ref)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, ref)}
    via_link = tmp_path / "via-link.tiff"
    via_link.symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for out, source, reference, says in (
        (src, src, ref, "is the source slide"),
        (Path("patch.tiff"), src, ref, "is the source slide"),  # a relative spelling
        (src, via_link, ref, "is the source slide"),  # the source read through a link
        (ref, src, ref, "is the reference slide"),
    ):
        with pytest.raises(OutputError, match=says):
            normalize_slide(source, out, method="macenko", reference=reference, overwrite=True)
    folder = tmp_path / "run"
    folder.mkdir()
    inner = folder / "patch.tiff"
    inner.write_bytes(src.read_bytes())
    with pytest.raises(OutputError, match="lies inside"):
        normalize_slide(inner, folder, method="none", overwrite=True, writer=WriterOptions(fmt="ome-zarr"))
    assert inner.read_bytes() == src.read_bytes()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, ref)} == digest

    link_out = tmp_path / "link-out.tiff"
    link_out.symlink_to(src)
    normalize_slide(src, link_out, method="none", overwrite=True)
    assert not link_out.is_symlink() and hashlib.sha256(src.read_bytes()).hexdigest() == digest[src]


@pytest.mark.gpu
def test_normalize_on_cuda_matches_the_cpu_run(sample_svs: Path, shared_data: Path, tmp_path: Path) -> None:
    """The pipeline's CUDA path (each chunk mapped by ``ColorMap.apply_torch`` on the device,
    float32) writes level 0 within one grey level of the CPU run's table gather, nearly all
    pixels equal; lossless tiles, so the comparison sees the map and not the codec."""
    from wsi_norm.writers import WriterOptions

    ref = shared_data / "he" / "torchstain-target.png"
    lossless = WriterOptions(compression="deflate")
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.tiff"
        normalize_slide(sample_svs, out, method="macenko", reference=ref, device=device,
                        fit=FitOptions(n_pixels=200_000), writer=lossless)
        runs[device] = read_level(out, 0).astype(np.int16)
        assert read_provenance(out)["device"] == device
    diff = np.abs(runs["cuda"] - runs["cpu"])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
