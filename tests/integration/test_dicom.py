"""DICOM whole-slide images (VL Whole Slide Microscopy Image, TILED_FULL, JPEG baseline frames):
opened through OpenSlide, as a file or as the folder of the slide's instances, their frames
decoded directly (:mod:`wsi_norm.dicomjpeg`) with OpenSlide's pixels.

The files are written with pydicom (:mod:`wsi_norm.testing.dicom`), as a converter (wsidicomizer,
a scanner's DICOM export) lays out a slide converted from a TIFF: the source's own JPEG tiles
become the frames, so the DICOM slide decodes to the source's pixels exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from numpy.typing import NDArray

from wsi_norm import SlideOpenError, open_slide
from wsi_norm.pipeline import normalize_slide
from wsi_norm.testing.dicom import jpeg_frames, tiff_to_dicom, write_dicom_instance

TILE = 256


def write_dicom_level(folder: Path, rgb: NDArray[np.uint8], *, series: str, mpp: float,
                      image_type: str = "VOLUME", name: str | None = None,
                      photometric: str = "YBR_FULL_422", frames: list[bytes] | None = None,
                      offsets: Literal["basic", "extended"] = "basic", fragments_per_frame: int = 1) -> Path:
    """One instance of a DICOM slide: ``rgb`` as TILED_FULL JPEG baseline frames (by default
    YCbCr, q95, 4:4:4), row by row."""
    from pydicom.uid import generate_uid

    h, w = rgb.shape[:2]
    return write_dicom_instance(folder / (name or f"{generate_uid()}.dcm"),
                                jpeg_frames(rgb, tile=TILE) if frames is None else frames,
                                size=(w, h), tile=(TILE, TILE), series=series, mpp=mpp, image_type=image_type,
                                photometric=photometric, offsets=offsets, fragments_per_frame=fragments_per_frame)


def test_the_real_svs_as_dicom_reads_its_own_pixels_directly(sample_svs: Path, tmp_path: Path) -> None:
    """CMU-1-Small-Region's JPEG tiles (Aperio's RGB components, q30) as frames: every pixel of
    the DICOM slide is the SVS's, and its coding is read from the frames (the direct reader)."""
    tiff_to_dicom(sample_svs, tmp_path / "cmu")
    svs, dicom = open_slide(sample_svs), open_slide(tmp_path / "cmu")
    assert (dicom.vendor, dicom.dimensions) == ("dicom", svs.dimensions)
    assert dicom.mpp == pytest.approx(svs.mpp)
    w, h = svs.dimensions
    np.testing.assert_array_equal(dicom.read_region(0, x=0, y=0, width=w, height=h),
                                  svs.read_region(0, x=0, y=0, width=w, height=h))
    coding = dicom.jpeg_coding()
    assert coding is not None and coding.rgb and coding.quality == 30


@pytest.fixture(scope="module")
def crop(sample_svs: Path) -> NDArray[np.uint8]:
    return open_slide(sample_svs).read_region(0, x=256, y=512, width=1200, height=1000)


def _slide_folder(folder: Path, rgb: NDArray[np.uint8], series: str | None = None) -> Path:
    from pydicom.uid import generate_uid

    folder.mkdir()
    uid = series or generate_uid()
    write_dicom_level(folder, rgb, series=uid, mpp=0.5)
    write_dicom_level(folder, rgb[::2, ::2], series=uid, mpp=1.0)
    return folder


def test_dicom_slide_reads_as_a_file_and_as_its_folder(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    folder = _slide_folder(tmp_path / "slide", crop)
    by_folder = open_slide(folder)
    by_file = open_slide(max(folder.glob("*.dcm")))
    assert by_folder.path == max(folder.glob("*.dcm"), key=lambda f: f.stat().st_size)  # level 0's instance
    for slide in (by_folder, by_file):
        assert (slide.backend, slide.vendor) == ("openslide", "dicom")
        assert slide.level_dimensions == ((1200, 1000), (600, 500))
        assert slide.mpp == pytest.approx((0.5, 0.5))
    got = by_folder.read_region(0, x=0, y=0, width=1200, height=1000)
    # JPEG q95 4:4:4 of the crop: the frames' own pixels, a few levels from the crop
    assert np.abs(got.astype(int) - crop).mean() < 1.5
    np.testing.assert_array_equal(got, by_file.read_region(0, x=0, y=0, width=1200, height=1000))


def test_dicom_slide_normalizes_end_to_end(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    folder = _slide_folder(tmp_path / "slide", crop)
    out = tmp_path / "out.tiff"
    normalize_slide(folder, out, method="none")
    written = open_slide(out)
    assert written.dimensions == (1200, 1000) and written.mpp == pytest.approx((0.5, 0.5))
    assert written.scanner_metadata()["vendor"] == "dicom"


def test_a_folder_of_two_dicom_slides_is_refused_naming_both(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    folder = _slide_folder(tmp_path / "two", crop)
    write_dicom_level(folder, crop[:512, :512], series=generate_uid(), mpp=0.5, name="other.dcm")
    with pytest.raises(SlideOpenError, match=r"two: holds 2 DICOM slides: .*other\.dcm \(series .*pass a file"):
        open_slide(folder)
    # a folder without any DICOM slide is still not an OME-Zarr image
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideOpenError, match="not an OME-Zarr image"):
        open_slide(tmp_path / "empty")


def test_a_folder_of_dicom_files_openslide_refuses_says_why(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    """OpenSlide 4.0 refuses JPEG baseline frames labelled YBR_FULL: the error names the file and
    OpenSlide's reason, not "not an OME-Zarr image"."""
    from pydicom.uid import generate_uid

    folder = tmp_path / "ybr"
    folder.mkdir()
    write_dicom_level(folder, crop, series=generate_uid(), mpp=0.5, name="level0.dcm", photometric="YBR_FULL")
    with pytest.raises(SlideOpenError, match=r"ybr: holds DICOM files OpenSlide cannot open: level0\.dcm: .*YBR_FULL"):
        open_slide(folder)


def _openslide_reader(path: Path):  # type: ignore[no-untyped-def]
    """OpenSlide's own region reader for ``path`` (level coordinates), composited over white."""
    import openslide

    slide = openslide.OpenSlide(str(path))

    def read(level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        ds = slide.level_downsamples[level]
        rgba = np.asarray(slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        alpha = rgba[..., 3:]
        assert np.isin(alpha, (0, 255)).all()  # off the level: transparent, which is white glass
        return np.where(alpha == 0, np.uint8(255), rgba[..., :3])

    return slide, read


@pytest.mark.parametrize(("offsets", "components", "photometric"), [
    ("basic", "YCbCr", "YBR_FULL_422"),
    ("extended", "YCbCr", "YBR_FULL_422"),
    ("basic", "RGB", "RGB"),  # R, G, B components with their own Adobe marker
])
def test_dicom_frames_are_decoded_directly_with_openslides_pixels(
        crop: NDArray[np.uint8], tmp_path: Path, offsets: Literal["basic", "extended"],
        components: Literal["YCbCr", "RGB"], photometric: str) -> None:
    from pydicom.uid import generate_uid

    from wsi_norm.dicomjpeg import dicom_jpeg_tiles

    folder = tmp_path / "slide"
    folder.mkdir()
    uid = generate_uid()
    level0 = write_dicom_level(folder, crop, series=uid, mpp=0.5, name="a.dcm", offsets=offsets,
                               photometric=photometric, frames=jpeg_frames(crop, components=components))
    write_dicom_level(folder, crop[::2, ::2], series=uid, mpp=1.0, name="b.dcm", offsets=offsets,
                      photometric=photometric, frames=jpeg_frames(crop[::2, ::2], components=components))
    (folder / "notes.txt").write_text("not DICOM")  # files beside the slide are passed over
    reference, read = _openslide_reader(level0)
    tiles = dicom_jpeg_tiles(level0, tuple(reference.level_dimensions), read)
    assert tiles is not None and tiles.levels == (0, 1)  # each level checked against OpenSlide
    for level, (w, h) in enumerate(reference.level_dimensions):
        np.testing.assert_array_equal(tiles.read(level, 0, 0, w, h), read(level, 0, 0, w, h))
        # a region across frame edges, running off the level (white there, as OpenSlide's)
        np.testing.assert_array_equal(tiles.read(level, 100, 130, w, 300), read(level, 100, 130, w, 300))
    coding = tiles.coding(0)
    assert coding is not None and coding.rgb == (components == "RGB") and coding.quality == 95
    tiles.close()
    # the reader a slide gets: the same pixels through open_slide, folder or file
    slide = open_slide(folder)
    np.testing.assert_array_equal(slide.read_region(0, x=0, y=0, width=1200, height=1000), read(0, 0, 0, 1200, 1000))
    assert slide.jpeg_coding() is not None


def test_dicom_layouts_not_read_directly_stay_on_openslide(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    """Frames in two fragments each: the level is read through OpenSlide, the same pixels."""
    from pydicom.uid import generate_uid

    from wsi_norm.dicomjpeg import dicom_jpeg_tiles

    folder = tmp_path / "slide"
    folder.mkdir()
    level0 = write_dicom_level(folder, crop, series=generate_uid(), mpp=0.5, name="a.dcm", fragments_per_frame=2)
    reference, read = _openslide_reader(level0)
    assert dicom_jpeg_tiles(level0, tuple(reference.level_dimensions), read) is None
    np.testing.assert_array_equal(open_slide(level0).read_region(0, x=0, y=0, width=1200, height=1000),
                                  read(0, 0, 0, 1200, 1000))


def test_a_damaged_dicom_frame_is_an_error_naming_the_file_and_frame(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    from wsi_norm import SlideReadError

    folder = tmp_path / "slide"
    folder.mkdir()
    frames = jpeg_frames(crop)
    level0 = write_dicom_level(folder, crop, series=generate_uid(), mpp=0.5, name="a.dcm", frames=frames)
    # frame (row 1, column 1) of 4 x 5: not one of those each level is checked on first
    data = bytearray(level0.read_bytes())
    at = data.find(frames[6])
    assert at > 0
    middle = at + len(frames[6]) // 2
    data[middle : middle + 64] = bytes(range(64))
    level0.write_bytes(bytes(data))
    slide = open_slide(folder)
    assert slide.read_region(0, x=0, y=0, width=256, height=256).shape == (256, 256, 3)
    with pytest.raises(SlideReadError, match=r"a\.dcm: cannot read level 0 .*corrupt JPEG tile column 1, row 1 \(bytes"):
        slide.read_region(0, x=256, y=256, width=256, height=256)
