"""The input pipeline: images one at a time (images.py, numpy and Pillow only, run inside Ray Data's
workers), a dataset's files and split (folders.py, dataset.py), batches for the towers (loader.py),
and the built-in dataset (patterns.py)."""

from coordinator.data.dataset import Dataset, compute_colour_stats, open_dataset
from coordinator.data.folders import DatasetError, check_folder
from coordinator.data.images import CROP, STORED, BadImage, ColourStats, centre_crop, load_image
from coordinator.data.loader import Batch, batches, to_tensor

__all__ = [
    "CROP",
    "STORED",
    "BadImage",
    "Batch",
    "ColourStats",
    "Dataset",
    "DatasetError",
    "batches",
    "centre_crop",
    "check_folder",
    "compute_colour_stats",
    "load_image",
    "open_dataset",
    "to_tensor",
]
