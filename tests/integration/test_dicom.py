"""DICOM whole-slide images (VL Whole Slide Microscopy Image, TILED_FULL, JPEG baseline frames):
read through OpenSlide, as a file or as the folder of the slide's instances.

The files are written here with pydicom, as a converter (wsidicomizer, a scanner's DICOM export)
lays out a slide converted from a TIFF: the source's own JPEG tiles become the frames, so the
DICOM slide decodes to the source's pixels exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from wsi_norm import SlideOpenError, open_slide
from wsi_norm.pipeline import normalize_slide

pydicom = pytest.importorskip("pydicom")  # a test dependency (pyproject's [test] extra)

TILE = 256
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _code(value: str, scheme: str, meaning: str) -> object:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_dicom_level(folder: Path, rgb: NDArray[np.uint8], *, series: str, mpp: float,
                      image_type: str = "VOLUME", name: str | None = None,
                      photometric: str = "YBR_FULL_422") -> Path:
    """One instance of a DICOM slide: ``rgb`` as TILED_FULL JPEG baseline frames, row by row.
    OpenSlide takes JPEG baseline frames as ``YBR_FULL_422`` (the usual label, whatever the
    stream's own sampling) or ``RGB``."""
    import simplejpeg
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid

    h, w = rgb.shape[:2]
    frames = []
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = rgb[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            frames.append(simplejpeg.encode_jpeg(tile, quality=95, colorspace="RGB", colorsubsampling="444"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(WSI_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality, ds.Manufacturer = "SM", "wsi-norm tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = TILE
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * mpp / 1000, h * mpp / 1000, 0.001
    path_item = Dataset()
    path_item.OpticalPathIdentifier = "0"
    path_item.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
    path_item.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
    ds.OpticalPathSequence = [path_item]
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm
    measures.SliceThickness = 0.001
    groups = Dataset()
    groups.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [groups]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    out = folder / (name or f"{meta.MediaStorageSOPInstanceUID}.dcm")
    ds.save_as(out, enforce_file_format=True)
    return out


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
