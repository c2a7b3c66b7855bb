"""The datasets `dataset.name` names, each a loader function of its `dataset` config, and the
validation split held out of a dataset's training images."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig

from adaptive_sparse.training.data.images import (CIFAR10_CLASSES, BatchLoader, ImageData, Split, load_cifar10,
                                                  make_synthetic)
from adaptive_sparse.training.data.loaders import DatasetError, IndexedBatches, find_root
from adaptive_sparse.training.data.packed import load_packed_cifar10
from adaptive_sparse.training.data.text import load_shakespeare_char

__all__ = ["CIFAR10_CLASSES", "DATASETS", "BatchLoader", "DatasetError", "ImageData", "IndexedBatches", "Split",
           "hold_out_validation", "load_cifar10", "load_dataset", "load_shakespeare_char", "make_synthetic"]

def load_cifar10_or_pack(cfg: DictConfig) -> ImageData:
    """CIFAR-10 from torchvision's pickles or an image folder, or from one packed file of a folder's
    JPEG bytes (`dataset.root=PATH.pack`, scripts/pack_cifar10.py: the same data copy, decoded alike)."""
    root = find_root(cfg)
    return load_packed_cifar10(cfg) if root is not None and root.suffix == ".pack" else load_cifar10(cfg)


DATASETS: dict[str, Callable[[DictConfig], object]] = {
    "cifar10": load_cifar10_or_pack,
    "synthetic": make_synthetic,
    "shakespeare_char": load_shakespeare_char,
}


def load_dataset(cfg: DictConfig):
    """Build the dataset named by `dataset.name` from its registry entry (and hold out
    `dataset.val_size` training samples as the validation split)."""
    data = DATASETS[cfg.name](cfg)
    val_size = cfg.get("val_size", 0) or 0
    return hold_out_validation(data, val_size, cfg.get("val_seed", 0)) if val_size else data


def hold_out_validation(data: ImageData, val_size: int, seed: int = 0) -> ImageData:
    """`val_size` training images, drawn with a fixed seed (the same for every run, gate and
    model seed), become the validation split; training uses the rest; the test split is kept for
    final figures (summary.json's test_acc, test_loss)."""
    if not isinstance(data, ImageData):
        raise DatasetError("dataset.val_size holds out training images; this dataset is not an image dataset "
                           "(tiny-shakespeare has its own validation split: leave dataset.val_size at 0)")
    if not isinstance(val_size, int) or not 0 < val_size < len(data.train):
        raise DatasetError(f"dataset.val_size={val_size} is not allowed: an integer from 1 to "
                           f"{len(data.train) - 1} (the {len(data.train)} training images less one), or 0")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:val_size].sort().values, order[val_size:].sort().values
    take = lambda idx: Split(data.train.images[idx], data.train.labels[idx], data.train.fingerprint)  # noqa: E731
    return ImageData(take(kept), data.test, data.classes, data.source, val=take(held))
