"""The ``wsi-norm`` command's options: every user error is one line and exit 2 before any work
(also with ``--dry-run``), ``--mpp`` is honoured and recorded, the method-parameter help comes
from :class:`~wsi_norm.stain.base.StainParams`, sizes are named alike (old spellings still work),
defaults show in ``--help``, and progress reaches its total for TIFF and OME-Zarr."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from wsi_norm.cli import build_parser, main
from wsi_norm.stain.base import StainParams


class _WorkStarted(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every path to real work (a dask cluster for fits and writes, the generator, the
    tissue mask) fail loudly, and record which was reached."""
    # imported first: modules that bind these names at import must keep the real functions
    import wsi_norm.pipeline
    import wsi_norm.tissue.sampling  # noqa: F401

    reached: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            reached.append(name)
            raise _WorkStarted(f"{name} ran")

        return call

    monkeypatch.setattr("wsi_norm.cluster.dask_client", refuse("dask_client"))
    monkeypatch.setattr("wsi_norm.testing.synthetic.generate_slide", refuse("generate_slide"))
    monkeypatch.setattr("wsi_norm.tissue.mask.coarse_mask", refuse("coarse_mask"))
    return reached


def _usage_error_cases(tmp: Path, shared: Path) -> list[tuple[list[str], str]]:
    svs = str(shared / "slides" / "CMU-1-Small-Region.svs")
    png = str(shared / "he" / "torchstain-target.png")
    out = str(tmp / "x.tiff")
    fit = ["fit", png, "--method", "macenko", "-o", str(tmp / "t.json")]
    norm = ["normalize", svs, "--method", "macenko", "--reference", png, "-o", out]
    none = ["normalize", svs, "--method", "none", "-o", out]
    gen = ["generate", str(tmp / "g.tiff"), "--width", "512", "--height", "512"]
    own = tmp / "inputs"  # inputs of this test's own, given as outputs
    own_png, own_tiff = own / "own.png", own / "own.tiff"
    if not own_tiff.exists():
        own.mkdir()
        Image.open(png).convert("RGB").save(own_png)
        Image.open(png).convert("RGB").save(own_tiff)
    return [
        ([*fit, "--param", "foo=1"], "foo"),
        ([*fit, "--param", "l1_penalty=abc"], "l1_penalty"),
        ([*fit, "--param", "l1_penalty=-1"], "l1_penalty"),
        ([*fit, "--param", "macenko_variant=robust"], "macenko_variant"),
        ([*fit, "--param", "debias=3"], "debias"),
        ([*fit, "--param", "seed=3"], "--seed"),
        ([*fit, "--param", "novalue"], "NAME=VALUE"),
        ([*fit, "--n-pixels", "-5"], "--n-pixels"),
        ([*fit, "--n-pixels", "0"], "--n-pixels"),
        ([*fit, "--n-pixels", "999"], "--n-pixels: must be >= 1000"),
        ([*fit, "--seed", "-1"], "--seed"),
        ([*fit, "--mpp", "0"], "--mpp"),
        ([*fit, str(tmp / "nope.svs")], "nope.svs"),
        (["fit", png, "--method", "macenko", "-o", str(tmp / "missing" / "t.json")], "does not exist"),
        ([*norm, "--param", "foo=1"], "foo"),
        ([*norm, "--n-pixels", "-5"], "--n-pixels"),
        ([*norm, "--n-pixels", "500"], "--n-pixels: must be >= 1000"),
        ([*none, "--quality", "150"], "--quality"),
        ([*none, "--quality", "0"], "--quality"),
        ([*none, "--chunk-px", "100"], "--chunk-px"),
        ([*none, "--chunk-px", "0"], "--chunk-px"),
        ([*none, "--tile-px", "100"], "--tile-px"),
        ([*none, "--tile-size", "-16"], "--tile-size"),
        ([*none, "--mpp", "-1"], "--mpp"),
        ([*none, "--param", "alpha=1"], "--param"),
        ([*none, "--weights", png], "--weights"),
        (["normalize", svs, "--method", "none", "-o", str(tmp / "x.png")], "x.png"),
        (["normalize", svs, "--method", "none", "-o", str(tmp / "missing" / "x.tiff")], "does not exist"),
        (["normalize", str(tmp / "nope.svs"), "--method", "none", "-o", out], "nope.svs"),
        (["normalize", svs, "--method", "macenko", "--target", str(tmp / "nope.json"), "-o", out], "nope.json"),
        (["normalize", svs, "--method", "macenko", "--reference", str(tmp / "nope.png"), "-o", out], "nope.png"),
        (["normalize", svs, "--method", "stainnet", "--weights", str(tmp / "w.safetensors"), "-o", out],
         "w.safetensors"),
        ([*gen, "--quality", "150"], "--quality"),
        ([*gen, "--tile-px", "100"], "--tile-px"),
        ([*gen, "--width", "0"], "--width"),
        ([*gen, "--tissue-fraction", "2"], "--tissue-fraction"),
        ([*gen, "--mpp", "0"], "--mpp"),
        (["generate", str(tmp / "g.png")], "g.png"),
        (["generate", str(tmp / "missing" / "g.tiff")], "does not exist"),
        (["stainnet", "train", png, "--teacher", "macenko", "--target", str(tmp / "nope.json"),
          "-o", str(tmp / "m.safetensors")], "nope.json"),
        (["stainnet", "train", png, "--teacher", "macenko", "--target", str(tmp / "t.json"),
          "-o", str(tmp / "m.safetensors"), "--epochs", "0"], "--epochs"),
        (["info", svs, "--mpp", "-1"], "--mpp"),
        (["mask", svs, "-o", str(tmp / "m.xyz")], "m.xyz"),
        (["mask", svs, "-o", str(tmp / "m.png"), "--max-px", "0"], "--max-px"),
        (["mask", svs, "-o", str(tmp / "missing" / "m.png")], "does not exist"),
        (["normalize", svs, "--method", "bogus", "-o", out], "--method"),
        (["normalize", svs, "--method", "none"], "--output"),
        ([*none, "--zarr-format", "5"], "--zarr-format"),
        (["fit", png, "--method", "macenko", "-o", str(tmp / "t.txt")], "t.txt"),
        (["mask", str(own_png), "-o", str(own_png), "--overwrite"], "is the input"),
        (["normalize", str(own_tiff), "--method", "none", "-o", str(own_tiff), "--overwrite"], "is the input"),
        (["normalize", svs, "--method", "macenko", "--reference", str(own_tiff), "-o", str(own_tiff),
          "--overwrite"], "is the input"),
    ]


_CASE_IDS = [
    "param-unknown", "param-type", "param-range", "param-choice", "param-bool", "param-seed",
    "param-syntax", "fit-n-pixels-negative", "fit-n-pixels-zero", "fit-n-pixels-below-a-fit", "fit-seed", "fit-mpp",
    "fit-second-slide-missing", "fit-output-folder", "normalize-param-unknown",
    "normalize-n-pixels", "normalize-n-pixels-below-a-fit", "quality-high", "quality-zero", "chunk-px-16", "chunk-px-zero",
    "tile-px-16", "tile-size-alias-negative", "normalize-mpp", "param-for-none", "weights-for-none",
    "output-suffix", "output-folder", "slide-missing", "target-missing", "reference-missing",
    "weights-missing", "generate-quality", "generate-tile-px", "generate-width",
    "generate-tissue-fraction", "generate-mpp", "generate-suffix", "generate-folder",
    "train-target-missing", "train-epochs", "info-mpp", "mask-suffix", "mask-max-px",
    "mask-folder", "method-choice", "output-required", "zarr-format-choice",
    "fit-template-suffix", "mask-input-as-output", "normalize-source-as-output",
    "normalize-reference-as-output",
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("index", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_user_error_is_one_line_exit_2_before_any_work(
    index: int, dry_run: bool, tmp_path: Path, shared_data: Path, no_work: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases = _usage_error_cases(tmp_path, shared_data)
    assert len(cases) == len(_CASE_IDS)  # one id per case
    argv, named = cases[index]
    if dry_run and argv[0] in ("fit", "normalize", "generate", "stainnet"):
        argv = [*argv, "--dry-run"]
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert (code, no_work) == (2, []), captured.err
    assert len(err) == 1, captured.err
    assert "error:" in err[0] and named in err[0] and "Traceback" not in captured.err
    assert captured.out == ""  # nothing claimed ("would ..."), nothing written
    assert not any(p.name not in ("t.json", "inputs") for p in tmp_path.iterdir())
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == ["own.png", "own.tiff"]


def test_console_command_error_is_one_line(tmp_path: Path, sample_svs: Path) -> None:
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_norm.cli", "normalize", str(sample_svs), "--method", "none",
         "-o", str(tmp_path / "x.tiff"), "--quality", "150"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["wsi-norm normalize: error: argument --quality: must be in 1..100, got 150"]


def test_dry_run_accepts_valid_options_without_work(
    tmp_path: Path, sample_svs: Path, shared_data: Path, no_work: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    png = str(shared_data / "he" / "torchstain-target.png")
    assert main(["normalize", str(sample_svs), "--method", "vahadane", "--reference", png,
                 "--param", "l1_penalty=0.05", "--param", "white_point=none", "--quality", "100",
                 "--chunk-px", "512", "--tile-px", "512", "-o", str(tmp_path / "x.tiff"),
                 "--dry-run"]) == 0
    assert main(["fit", png, "--method", "macenko", "--param", "macenko_variant=textbook",
                 "--param", "debias=false", "-o", str(tmp_path / "t.json"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("would ") == 2 and captured.err == ""
    assert no_work == [] and list(tmp_path.iterdir()) == []


def test_param_values_are_typed_from_stainparams() -> None:
    from wsi_norm.cli import _parse_params

    parsed = _parse_params(["l1_penalty=1", "debias=false", "white_point=null", "alpha=2.5",
                            "macenko_variant=textbook", "min_pixels=500", "device=cuda"])
    assert parsed == {"l1_penalty": 1.0, "debias": False, "white_point": None, "alpha": 2.5,
                      "macenko_variant": "textbook", "min_pixels": 500, "device": "cuda"}
    assert isinstance(parsed["l1_penalty"], float)
    assert StainParams(**parsed).l1_penalty == 1.0


# ------------------------------------------------------------------ help
@pytest.mark.parametrize("command", ["fit", "normalize"])
def test_param_help_is_generated_from_stainparams(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "lambda_" not in text
    assert "  l1_penalty=0.01  (float)" in text
    for f in dataclasses.fields(StainParams):
        if f.name == "seed":
            continue  # set with --seed
        shown = "none" if f.default is None else f.default if isinstance(f.default, str) else json.dumps(f.default)
        assert f"  {f.name}={shown}  (" in text, f.name


def test_defaults_are_shown_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_norm.tissue.sampling import DEFAULT_N_PIXELS

    assert main(["normalize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap
    for option, default in (("--chunk-px", 1024), ("--tile-px", 256), ("--quality", 90),
                            ("--n-pixels", DEFAULT_N_PIXELS), ("--seed", 0), ("--zarr-format", 3),
                            ("--compression", "jpeg"), ("--device", "cpu")):
        after = text.split(f"  {option} " if f"  {option} " in text else f" {option} ", 1)[1]
        assert f"(default: {default})" in after.split(" --", 1)[0], option
    assert "--tile-size" not in text and "--out-tile" not in text  # hidden old spellings
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 512)" in text.split("--tile-px", 2)[2].split(" --", 1)[0]


# ------------------------------------------------------------------ naming
def test_one_naming_of_sizes_with_deprecated_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    base = ["normalize", "s.svs", "--method", "none", "-o", "o.tiff"]
    new = parser.parse_args([*base, "--chunk-px", "512", "--tile-px", "512"])
    assert (new.chunk_px, new.tile_px) == (512, 512)
    assert capsys.readouterr().err == ""
    old = parser.parse_args([*base, "--tile-size", "2048", "--out-tile", "512"])
    assert (old.chunk_px, old.tile_px) == (2048, 512)
    assert capsys.readouterr().err.splitlines() == [
        "wsi-norm: warning: --tile-size is deprecated; use --chunk-px",
        "wsi-norm: warning: --out-tile is deprecated; use --tile-px",
    ]
    defaults = parser.parse_args(base)
    assert (defaults.chunk_px, defaults.tile_px) == (1024, 256)
    assert parser.parse_args(["generate", "g.tiff", "--tile-px", "256"]).tile_px == 256


# ------------------------------------------------------------------ --mpp
def test_mpp_is_recorded_in_the_fit(tmp_path: Path, shared_data: Path) -> None:
    png = str(shared_data / "he" / "torchstain-target.png")  # a PNG: records no mpp
    assumed, plain = tmp_path / "assumed.json", tmp_path / "plain.json"
    assert main(["fit", png, "--method", "reinhard", "--n-pixels", "20000", "--mpp", "0.25",
                 "-o", str(assumed), "-q"]) == 0
    assert main(["fit", png, "--method", "reinhard", "--n-pixels", "20000", "-o", str(plain), "-q"]) == 0
    assert json.loads(assumed.read_text())["slides"][0]["mpp"] == [0.25, 0.25]
    assert json.loads(plain.read_text())["slides"][0]["mpp"] is None


@pytest.mark.parametrize("suffix", [".tiff", ".ome.zarr"])
def test_mpp_replaces_the_slides_own_in_the_output(tmp_path: Path, sample_svs: Path, suffix: str) -> None:
    from wsi_norm.slide import open_slide
    from wsi_norm.writers import read_provenance

    out = tmp_path / f"x{suffix}"
    assert main(["normalize", str(sample_svs), "--method", "none", "--mpp", "0.3", "-o", str(out), "-q"]) == 0
    record = read_provenance(out)
    assert record["written"]["mpp"] == pytest.approx([0.3, 0.3])
    assert record["source"]["mpp"] == pytest.approx([0.3, 0.3])
    if suffix == ".tiff":
        assert open_slide(out).mpp == pytest.approx((0.3, 0.3))  # resolution tags, as viewers read them


# ------------------------------------------------------------------ progress
@pytest.mark.parametrize("suffix", [".tiff", ".ome.zarr"])
def test_progress_reaches_the_total(tmp_path: Path, sample_svs: Path, suffix: str,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import wsi_norm.pipeline

    events: list[tuple[int, int]] = []
    real = wsi_norm.pipeline.normalize_slide

    def recording(*args: Any, progress: Callable[[int, int], None], **kwargs: Any) -> Any:
        def record(done: int, total: int) -> None:
            events.append((done, total))
            progress(done, total)

        return real(*args, progress=record, **kwargs)

    monkeypatch.setattr(wsi_norm.pipeline, "normalize_slide", recording)
    out = tmp_path / f"x{suffix}"
    # 960-px chunks of the 2220 x 2967 slide: 3 x 4 = 12, one or two blocks for the writers
    assert main(["normalize", str(sample_svs), "--method", "none", "-o", str(out)]) == 0
    assert events and events[-1] == (12, 12)
    assert [d for d, _ in events] == sorted(d for d, _ in events)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("normalize CMU-1-Small-Region.svs: 12/12 chunks")


@pytest.mark.parametrize("suffix", [".tiff", ".ome.zarr"])
def test_terminal_progress_shows_fitting_then_a_bar_with_eta(
    tmp_path: Path, sample_svs: Path, shared_data: Path, suffix: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    template = tmp_path / "t.json"
    assert main(["fit", str(shared_data / "he" / "torchstain-target.png"), "--method", "reinhard",
                 "--n-pixels", "20000", "-o", str(template), "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["normalize", str(sample_svs), "--method", "reinhard", "--target", str(template),
                 "--n-pixels", "20000", "-o", str(tmp_path / f"x{suffix}")]) == 0
    import re

    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err)  # drop terminal controls
    frames = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert any("fitting reinhard" in line for line in frames)
    bars = [line for line in frames if "chunks" in line]
    assert bars and "ETA" in bars[-1] and " 12/12 chunks" in bars[-1], bars[-1:]


def test_generate_and_fit_announce_their_work(tmp_path: Path, shared_data: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    made: list[Path] = []

    def generate_slide(out: Path, **kwargs: Any) -> Any:
        made.append(out)
        return SimpleNamespace(io=(240.0, 240.0, 240.0), texture_source="stub")

    monkeypatch.setattr("wsi_norm.testing.synthetic.generate_slide", generate_slide)
    assert main(["generate", str(tmp_path / "g.tiff"), "--width", "512", "--height", "256"]) == 0
    assert made == [tmp_path / "g.tiff"]
    assert capsys.readouterr().err.splitlines() == ["generate g.tiff: rendering 512x256 px"]
    assert main(["generate", str(tmp_path / "g.tiff"), "--width", "512", "--height", "256", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["fit", str(shared_data / "he" / "torchstain-target.png"), "--method", "reinhard",
                 "--n-pixels", "20000", "-o", str(tmp_path / "t.json")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == "fit reinhard: fitting on 1 slide(s)"


def test_backend_names_the_source_reader_not_the_reference(sample_svs: Path, shared_data: Path,
                                                            tmp_path: Path) -> None:
    """``--backend tiffslide`` reads the slide with tiffslide; a PNG reference, which tiffslide
    cannot read, is read by the image reader instead of failing the run."""
    import tifffile

    from wsi_norm.slide import open_slide
    from wsi_norm.writers import read_provenance

    rgb = open_slide(sample_svs).read_region(0, x=600, y=1000, width=1024, height=1024)  # tissue
    src = tmp_path / "src.tiff"
    tifffile.imwrite(src, rgb, tile=(256, 256), compression="jpeg", photometric="rgb")
    out = tmp_path / "out.tiff"
    png = str(shared_data / "he" / "torchstain-target.png")
    assert main(["normalize", str(src), "--backend", "tiffslide", "--method", "reinhard", "--reference", png,
                 "--n-pixels", "20000", "-o", str(out), "-q"]) == 0
    assert read_provenance(out)["source"]["backend"] == "tiffslide"
