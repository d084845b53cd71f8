"""Data sets, image and mask loading, few-shot reference sampling and the synthetic data set.

Loading from disk happens here and in ``clipfusion.models`` only; everything downstream receives PIL images,
arrays or tensors.
"""

from clipfusion.data._common import IMAGE_SUFFIXES, SPLITS, Sample, SampleList
from clipfusion.data.checks import check_images, check_samples, collect_images
from clipfusion.data.datasets import DATASET_KINDS, dataset_categories, open_split
from clipfusion.data.folder import FolderDataset
from clipfusion.data.images import load_image, load_mask
from clipfusion.data.mvtec import MVTEC_CATEGORIES, MVTecAD
from clipfusion.data.names import object_name
from clipfusion.data.sampling import sample_references
from clipfusion.data.synthetic import SYNTHETIC_CATEGORIES, SYNTHETIC_DEFECTS, make_synthetic_dataset
from clipfusion.data.visa import VISA_CATEGORIES, VisA

__all__ = [
    "DATASET_KINDS",
    "IMAGE_SUFFIXES",
    "MVTEC_CATEGORIES",
    "SPLITS",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFECTS",
    "VISA_CATEGORIES",
    "FolderDataset",
    "MVTecAD",
    "Sample",
    "SampleList",
    "VisA",
    "check_images",
    "check_samples",
    "collect_images",
    "dataset_categories",
    "load_image",
    "load_mask",
    "make_synthetic_dataset",
    "object_name",
    "open_split",
    "sample_references",
]
