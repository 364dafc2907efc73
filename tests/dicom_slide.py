"""A real DICOM whole-slide image (VL Whole Slide Microscopy, TILED_FULL, JPEG baseline frames), one
file per pyramid level in one folder, written with pydicom from real pixels: the layout scanners and
converters produce, which OpenSlide opens from any one of its files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"


def write_dicom_slide(folder: Path, pixels: np.ndarray, mpp: float, levels: int = 2, tile: int = 256) -> Path:
    """``folder``/level-N.dcm for N < ``levels``, each level half the previous; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for level in range(levels):
        step = 2**level
        level_pixels = np.ascontiguousarray(pixels[::step, ::step])
        dataset = _level(level_pixels, tile, mpp * step, study, series, original=level == 0)
        dataset.save_as(folder / f"level-{level}.dcm", enforce_file_format=True)
    return folder


def _level(pixels: np.ndarray, tile: int, mpp: float, study: str, series: str, original: bool) -> Dataset:
    height, width = pixels.shape[:2]
    frames = []
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)  # edge frames are padded to the full tile
            part = pixels[y : y + tile, x : x + tile]
            frame[: part.shape[0], : part.shape[1]] = part
            encoded = io.BytesIO()
            Image.fromarray(frame).save(encoded, "JPEG", quality=95)
            frames.append(encoded.getvalue())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = WSI_STORAGE, meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.Modality = study, series, "SM"
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if original else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    dataset.Rows = dataset.Columns = tile
    dataset.TotalPixelMatrixColumns, dataset.TotalPixelMatrixRows, dataset.TotalPixelMatrixFocalPlanes = width, height, 1
    dataset.NumberOfFrames = len(frames)
    dataset.DimensionOrganizationType = "TILED_FULL"
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "YBR_FULL_422", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    dataset.NumberOfOpticalPaths, dataset.OpticalPathSequence = 1, [optical_path]
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # millimetres
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    dataset.SharedFunctionalGroupsSequence = [shared]
    dataset.PixelData = encapsulate(frames)
    dataset["PixelData"].VR = "OB"
    return dataset
