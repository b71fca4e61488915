"""Datasets for the built-in tasks, data only (no models, no registration): each task has a reader for
its real public format and a small offline default that builds on a CPU in seconds.

* classification: ``imagefolder_datasets`` (ImageNet layout), ``cifar_datasets`` (CIFAR-10/100, torchvision's
  pickled batches), ``fashion_mnist_datasets`` (offline).
* retrieval: ``coco_retrieval_datasets``, ``karpathy_retrieval_datasets`` (Flickr30K / COCO Karpathy),
  ``compositional_datasets`` (offline: Fashion-MNIST items at named positions).
* brain age: ``bids_brain_age_datasets`` (BIDS T1w + participants.tsv), ``synthetic_brain_age_datasets``
  (offline: MNI152-based cohort with age-dependent atrophy), ``patch_tissue_labels``.
Slow builds are cached under ``$MOEBENCH_CACHE`` or ``~/.cache/moebench`` (``cache.cache_dir``)."""

from .brain import (
    TISSUE_NAMES,
    BrainAgeDataset,
    bids_brain_age_dataset,
    bids_brain_age_datasets,
    mni_grid,
    patch_tissue_labels,
    split_dataset,
    synthetic_brain_age_datasets,
    synthetic_brain_cohort,
    template_tissue_labels,
)
from .cache import cache_dir, cached
from .classification import (
    CIFAR_NUM_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    CifarDataset,
    ClassificationTensorDataset,
    cifar_datasets,
    fashion_mnist_datasets,
    imagefolder_datasets,
    load_fashion_mnist,
)
from .retrieval import (
    ITEM_NAMES,
    POSITION_NAMES,
    CanvasTextDataset,
    FileImageTextDataset,
    ImageTextDataset,
    WordTokenizer,
    caption_for,
    coco_retrieval_datasets,
    compositional_datasets,
    karpathy_retrieval_datasets,
    patch_cell_labels,
    read_coco_captions,
    read_karpathy_split,
)

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("brain", "cache", "classification", "retrieval")]
