"""Dataset layer: scan a folder of captioned images, decode images, serve them as tensors."""

from sd_lora.data.dataset import ImageCaptionDataset
from sd_lora.data.images import IMAGE_EXTENSIONS, load_image, probe_image, to_rgb
from sd_lora.data.scan import DatasetError, DatasetScan, Sample, SkippedFile, scan_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "DatasetScan",
    "ImageCaptionDataset",
    "Sample",
    "SkippedFile",
    "load_image",
    "probe_image",
    "scan_dataset",
    "to_rgb",
]
