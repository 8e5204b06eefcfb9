"""DICOM whole-slide images for tests and benchmarks, written with pydicom.

VL Whole Slide Microscopy Image instances, one per level, ``TILED_FULL``, JPEG baseline frames,
laid out as a converter (wsidicomizer, a scanner's DICOM export) lays out a slide converted from a
TIFF: :func:`tiff_to_dicom` makes the TIFF's own JPEG tiles the frames, so the DICOM slide
decodes to the TIFF's pixels exactly; :func:`jpeg_frames` codes pixels into frames.

    python -m wsi_norm.testing.dicom SLIDE.tiff OUT_FOLDER
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["WSI_STORAGE", "jpeg_frames", "tiff_to_dicom", "write_dicom_instance"]

#: SOP Class UID of VL Whole Slide Microscopy Image Storage
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"


def jpeg_frames(rgb: NDArray[np.uint8], *, tile: int = 256, components: Literal["YCbCr", "RGB"] = "YCbCr",
                quality: int = 95) -> list[bytes]:
    """``rgb`` cut into ``tile``-px frames, row by row (the last ones padded white), each a JPEG
    (4:4:4) of YCbCr components (a JFIF stream) or of R, G and B themselves (an Adobe marker with
    transform 0)."""
    import imagecodecs

    h, w = rgb.shape[:2]
    out = "YCBCR" if components == "YCbCr" else "RGB"
    frames = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = rgb[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            frames.append(bytes(imagecodecs.jpeg8_encode(block, level=quality, subsampling=(1, 1),
                                                         colorspace="RGB", outcolorspace=out)))
    return frames


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_dicom_instance(path: Path, frames: list[bytes], *, size: tuple[int, int], tile: tuple[int, int],
                         series: str, mpp: float, study: str | None = None, frame_of_reference: str | None = None,
                         image_type: str = "VOLUME", photometric: str = "YBR_FULL_422",
                         offsets: Literal["basic", "extended"] = "basic", fragments_per_frame: int = 1) -> Path:
    """Write one instance of a DICOM slide: ``frames`` (JPEG baseline streams, row by row) of an
    image of ``size`` ``(width, height)`` in tiles of ``tile`` ``(width, height)``.

    OpenSlide takes JPEG baseline frames labelled ``YBR_FULL_422`` (the usual label, whatever
    the stream's own sampling) or ``RGB``. ``offsets``: a Basic Offset Table (``"basic"``) or an
    Extended Offset Table (``"extended"``, with an empty basic one).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate, encapsulate_extended
    from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid

    (w, h), (tile_w, tile_h) = size, tile
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(WSI_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series
    ds.FrameOfReferenceUID = frame_of_reference or generate_uid()
    ds.Modality, ds.Manufacturer = "SM", "wsi-norm"
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns = tile_h, tile_w
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
    if offsets == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    else:
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def tiff_to_dicom(tiff: Path, folder: Path, *, mpp: float | None = None) -> list[Path]:
    """Write the levels of a tiled JPEG TIFF pyramid (a generated slide, an SVS) as a DICOM
    slide in ``folder`` (created): one instance per level, ``level<i>.dcm``, whose frames are the
    level's JPEG tiles with the TIFF's shared tables put in. Level 0's pixel size is ``mpp``
    (default: the slide's, else 0.25 um)."""
    import tifffile
    from pydicom.uid import generate_uid

    from wsi_norm.slide import open_slide
    from wsi_norm.tiffjpeg import _SOI, _level_layout, largest_tiled_series

    with open_slide(tiff) as slide:
        base_mpp = mpp or (slide.mpp[0] if slide.mpp else 0.25)
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    written = []
    fd = os.open(tiff, os.O_RDONLY)
    try:
        with tifffile.TiffFile(tiff) as tif:
            index = largest_tiled_series(tif)
            if index is None:
                raise ValueError(f"{tiff}: no tiled image")
            levels = [level.keyframe for level in tif.series[index].levels]
            base_width = int(levels[0].imagewidth)
            for i, page in enumerate(levels):
                layout = _level_layout(page, tiff)
                if layout is None:
                    raise ValueError(f"{tiff}: level {i} is not a tiled baseline JPEG image")
                frames = []
                for offset, count in zip(layout.offsets, layout.counts, strict=True):
                    data = os.pread(fd, count, offset)
                    frames.append(layout.prefix + (data[2:] if data[:2] == _SOI else data))
                written.append(write_dicom_instance(
                    folder / f"level{i}.dcm", frames, size=(layout.width, layout.height),
                    tile=(layout.tile_w, layout.tile_h), series=series, study=study,
                    frame_of_reference=frame_of_reference, mpp=base_mpp * base_width / layout.width,
                    photometric="RGB" if layout.rgb else "YBR_FULL_422"))
    finally:
        os.close(fd)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tiff", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mpp", type=float, default=None)
    args = parser.parse_args(argv)
    for path in tiff_to_dicom(args.tiff, args.folder, mpp=args.mpp):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
