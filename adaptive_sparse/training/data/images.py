"""Datasets held in memory as uint8 tensors, served in batches that carry dataset indices.

Each split is decoded once (from torchvision's CIFAR-10 pickles or from an image folder),
cached outside the dataset folder, and kept in memory. Augmentation runs on whole batches
as tensor ops, so the training loop does no per-sample PIL work (airbench's recipe).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from adaptive_sparse.training.io import atomic_torch_save
from adaptive_sparse.training.data.loaders import DatasetError, IndexedBatches, find_root


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}



@dataclass
class Split:
    images: torch.Tensor  # [N, 3, H, W] uint8
    labels: torch.Tensor  # [N] int64
    fingerprint: dict[str, Any] | None = None  # on the training split: its dataset's (IndexedBatches.fingerprint)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageData:
    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str  # where the pixels came from, recorded in summary.json
    val: Split | None = None  # held out of the training images (dataset.val_size); None: validate on test

    @property
    def validation(self) -> Split:
        """The split every epoch is evaluated on: the held-out one if carved, else the test split."""
        return self.val if self.val is not None else self.test

    @property
    def num_classes(self) -> int:
        # train.py asks for this rather than len(data.classes): the attribute name `classes`
        # in train.main makes cloudpickle (joblib's process launcher) ship the unpicklable
        # torch.classes module along with the function, and every joblib sweep fails
        return len(self.classes)


# --------------------------------------------------------------------------- loading


def root_kind(root: Path) -> str | None:
    """'torchvision' for a CIFAR-10 pickle root, 'folder' for train/ and test/ image folders."""
    if (root / "cifar-10-batches-py").is_dir():
        return "torchvision"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    return None


EXPECTED_LAYOUT = "cifar-10-batches-py/ (torchvision's pickles) or train/ and test/ image folders"


def load_cifar10(cfg: DictConfig) -> ImageData:
    root = find_root(cfg)
    if root is None:
        tried = [cfg.get("root")] if cfg.get("root") else list(cfg.get("search_roots") or [])
        if not cfg.download:
            raise DatasetError(f"dataset.root: no CIFAR-10 found (tried {tried}) and "
                               "dataset.download=false; set dataset.root=PATH")
        root = Path(os.path.expanduser(str(cfg.get("root") or cfg.search_roots[0]))).resolve()
    if root.is_file():
        raise DatasetError(f"dataset.root={root} is a file; expected a folder holding {EXPECTED_LAYOUT}")
    kind = root_kind(root) if root.is_dir() else None
    if kind is None and not cfg.download:
        raise DatasetError(f"dataset.root={root}: not a CIFAR-10 root (expected {EXPECTED_LAYOUT}) "
                           "and dataset.download=false")
    if kind == "folder":
        listing = _folder_listing(root)
        data = _cached(root, cfg, _cache_key(root, listing), lambda: _decode_image_folder(root))
        data = fingerprinted(data, files=_files_digest(listing))
    else:  # torchvision checks every batch file's md5: any such root holds the same images
        data = fingerprinted(_load_torchvision_cifar10(root, download=bool(cfg.download)),
                             files="torchvision's CIFAR-10 batches (md5-checked)")
    check_image_data(data, root, cfg)
    return data


def fingerprinted(data: ImageData, **facts: Any) -> ImageData:
    """`data` with its fingerprint on the training split: where it came from (`source`, which may
    change between a run and its resume), its size, and `facts` that say which images these are."""
    fingerprint = {"source": data.source, "classes": data.num_classes,
                   "images": f"{len(data.train)} train, {len(data.test)} test", **facts}
    return replace(data, train=replace(data.train, fingerprint=fingerprint))


def check_image_data(data: ImageData, root: Path, cfg: DictConfig) -> None:
    """The dataset is what its config says: `dataset.classes` (in label order) and
    `dataset.expected_counts` ([train, test]) when set; never a short class list in one split."""
    classes = cfg.get("classes")
    if classes is not None and list(data.classes) != list(classes):
        missing = [c for c in classes if c not in data.classes]
        extra = [c for c in data.classes if c not in classes]
        raise DatasetError(f"dataset.root={root}: classes {list(data.classes)} are not the dataset's "
                           f"{len(classes)} (missing {missing}, unexpected {extra})")
    counts = cfg.get("expected_counts")
    if counts is not None and [len(data.train), len(data.test)] != list(counts):
        raise DatasetError(f"dataset.root={root}: {len(data.train)} training and {len(data.test)} test images, "
                           f"expected {counts[0]} and {counts[1]} (dataset.expected_counts=null accepts any)")


def _load_torchvision_cifar10(root: Path, download: bool) -> ImageData:
    from torchvision.datasets import CIFAR10  # imported here: torchvision is slow to import

    existed = root.exists()
    created = next(p for p in reversed([root, *root.parents]) if not p.exists()) if not existed else None
    try:
        splits = [CIFAR10(str(root), train=t, download=download) for t in (True, False)]
    except Exception as err:  # no network, bad checksum, unreadable pickle
        bad = _corrupt_batch_files(root) if existed else []
        if bad:
            raise DatasetError(f"CIFAR-10 batch file {bad[0]} is corrupt (md5 checksum "
                               f"mismatch; {len(bad)} bad file(s) under {root})") from err
        if created is not None:  # leave no mistyped folder behind (nor the parents made for it)
            shutil.rmtree(created, ignore_errors=True)
        where = "does not exist" if not existed else f"holds no CIFAR-10 (expected {EXPECTED_LAYOUT})"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DatasetError(f"dataset.root={root} {where}, and downloading CIFAR-10 into it failed "
                           f"({reason}); point dataset.root at a CIFAR-10 copy") from None
    train, test = (Split(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                         torch.tensor(s.targets, dtype=torch.long)) for s in splits)
    return ImageData(train, test, tuple(splits[0].classes), f"torchvision:{root}")


def _corrupt_batch_files(root: Path) -> list[Path]:
    """The torchvision batch files that exist but fail their md5 (torchvision's own message
    names none of them); missing files are reported by the caller's download error."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = root / CIFAR10.base_folder
    return [folder / name for name, md5 in CIFAR10.train_list + CIFAR10.test_list
            if (folder / name).exists() and not check_integrity(str(folder / name), md5)]


def _cached(root: Path, cfg: DictConfig, key: str, decode: Callable[[], ImageData]) -> ImageData:
    """Decode once, then reuse a tensor cache keyed by the folder's path and contents (`key`)."""
    cache_dir = Path(os.path.expanduser(str(cfg.cache_dir)))
    cache_file = cache_dir / f"cifar10-folder-{key}.pt"
    if cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
            return ImageData(Split(*blob["train"]), Split(*blob["test"]),
                             tuple(blob["classes"]), f"folder:{root}")
        except Exception:  # a stale or truncated cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    data = decode()
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"train": (data.train.images, data.train.labels),
                       "test": (data.test.images, data.test.labels),
                       "classes": list(data.classes)}, cache_file)
    return data


def _folder_listing(root: Path) -> list[tuple[str, int, int]]:
    """Every file in train/ and test/'s class folders: (split/class/name, size, mtime in ns)."""
    listing = []
    for split in ("train", "test"):
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
                stat = entry.stat()
                listing.append((f"{split}/{class_dir.name}/{entry.name}", stat.st_size, stat.st_mtime_ns))
    return listing


def _cache_key(root: Path, listing: list[tuple[str, int, int]]) -> str:
    """A digest of the folder's path and every file's name, size and modification time: a file
    changed in place (overwritten, truncated) changes it, so the cache is rebuilt (~0.2 s for
    60,000 files)."""
    digest = hashlib.sha1(str(root).encode())
    for name, size, mtime_ns in listing:
        digest.update(f"{name}:{size}:{mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _files_digest(listing: list[tuple[str, int, int]]) -> str:
    """A digest of every file's name and size alone: the same for a copy of the folder elsewhere
    (a moved dataset resumes), another for other images."""
    digest = hashlib.sha256()
    for name, size, _ in listing:
        digest.update(f"{name}:{size}\n".encode())
    return digest.hexdigest()


def _decode_image_folder(root: Path) -> ImageData:
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    test_classes = tuple(sorted(p.name for p in (root / "test").iterdir() if p.is_dir()))
    if classes != test_classes:  # labels come from the sorted folder names: they must agree
        raise DatasetError(f"dataset.root={root}: train/ and test/ hold different class folders "
                           f"(only in train/: {sorted(set(classes) - set(test_classes))}, "
                           f"only in test/: {sorted(set(test_classes) - set(classes))})")
    train = _decode_split(root / "train", classes)
    test = _decode_split(root / "test", classes)
    return ImageData(train, test, classes, f"folder:{root}")


def decode_image(source, where: str) -> np.ndarray:
    """One 32x32 image as RGB pixels [32, 32, 3] uint8, from a path or a file object; `where` names it
    in the one-line error for a file PIL cannot read or of another size."""
    from PIL import Image  # slow to import: only when decoding

    try:
        with Image.open(source) as image:
            pixels = np.asarray(image.convert("RGB"))
    except Exception as err:
        raise DatasetError(f"cannot read image {where}: {err}") from err
    if pixels.shape != (32, 32, 3):
        raise DatasetError(f"image {where} is {pixels.shape}, expected 32x32 RGB")
    return pixels


def _decode_split(split_dir: Path, classes: tuple[str, ...]) -> Split:
    from tqdm import tqdm

    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((split_dir / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"dataset.root: no images under {split_dir}")
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(files, desc=f"decoding {split_dir.name}", mininterval=2,
                                       disable=None)):
        images[i] = decode_image(path, str(path))
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def make_synthetic(cfg: DictConfig) -> ImageData:
    """A small, learnable 10-class image set for tests: a fixed random pattern per class,
    shifted and blurred with noise, so a CNN or ViT gets well above chance in an epoch."""
    g = torch.Generator().manual_seed(int(cfg.data_seed))
    num_classes, size = int(cfg.num_classes), int(cfg.image_size)
    prototypes = torch.rand(num_classes, 3, size // 4, size // 4, generator=g)
    prototypes = torch.nn.functional.interpolate(prototypes, size=(size, size), mode="bilinear")

    def draw(n: int) -> Split:
        labels = torch.randint(num_classes, (n,), generator=g)
        shift = torch.randint(-2, 3, (2,), generator=g).tolist()
        images = prototypes[labels].roll(shifts=shift, dims=(2, 3))
        images = images + float(cfg.noise) * torch.randn(images.shape, generator=g)
        return Split((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    data = ImageData(draw(int(cfg.num_train)), draw(int(cfg.num_test)),
                     tuple(f"class{i}" for i in range(num_classes)), f"synthetic:seed{cfg.data_seed}")
    return fingerprinted(data, config=f"data_seed={cfg.data_seed} image_size={size} noise={cfg.noise}")


FLIPS = ("random", "alternate")
PADDING_MODES = ("zeros", "reflect")


class BatchLoader(IndexedBatches):
    """Serves (images, labels, dataset indices) from tensors already on the device.

    Images go to float and are normalised one batch at a time; augmentation (random crop
    with zero or reflected padding, horizontal flip) is drawn per sample but applied to the
    whole batch. Flips are `random` (a fresh coin per sample per epoch) or `alternate`
    (airbench's: a coin per sample drawn once, every image mirrored against it in odd epochs,
    so each image is seen both ways in every two epochs).
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device, *, shuffle: bool,
                 augment: bool = False, crop_padding: int = 4, limit_batches: int | None = None,
                 seed: int = 0, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 indices: torch.Tensor | None = None, shard: tuple[int, int] | None = None,
                 channels_last: bool = False, flip: str = "random", padding_mode: str = "zeros",
                 drop_last: bool = False):
        super().__init__(len(split), batch_size, device, shuffle=shuffle, limit_batches=limit_batches,
                         seed=seed, indices=indices, shard=shard, drop_last=drop_last)
        if flip not in FLIPS or padding_mode not in PADDING_MODES:
            raise DatasetError(f"dataset.flip={flip} / dataset.padding_mode={padding_mode}: "
                               f"flip is one of {', '.join(FLIPS)}, padding_mode one of {', '.join(PADDING_MODES)}")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.fingerprint = split.fingerprint
        self.augment, self.crop_padding = augment, crop_padding
        self.padding_mode = padding_mode
        self.flip = flip
        self.epochs_started = 0  # alternate flips: odd epochs (0-based) mirror every image's coin
        if flip == "alternate":  # its own generator: the order's stream is the same either way
            coins = torch.Generator().manual_seed(seed + 1)
            self.first_flip = (torch.rand(len(split), generator=coins) < 0.5).to(device)  # [N] per dataset index
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def epoch_draws(self) -> None:
        self.epochs_started += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epochs_started": self.epochs_started}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epochs_started = state.get("epochs_started", 0)  # records from before alternate flips: 0

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[idx]  # [B, 3, H, W] uint8
        if self.augment:
            images = self._augment(images, idx)
        x = ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        return x, self.labels[idx]

    def _augment(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        pad = self.crop_padding
        draw = lambda high: torch.randint(high, (n,), generator=self.generator).to(self.device)
        if pad:
            if self.padding_mode == "reflect":  # reflect needs a float tensor; uint8 values survive the round trip
                padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect").to(images.dtype)
            else:
                padded = F.pad(images, (pad, pad, pad, pad))  # [B, 3, H+2p, W+2p]
            rows = draw(2 * pad + 1)[:, None] + torch.arange(h, device=self.device)  # [B, H]
            cols = draw(2 * pad + 1)[:, None] + torch.arange(w, device=self.device)  # [B, W]
            batch = torch.arange(n, device=self.device)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, 3]
            images = images.permute(0, 3, 1, 2)
        if self.flip == "alternate":
            flip = self.first_flip[idx] ^ (self.epochs_started % 2 == 0)  # epochs_started counts from 1
        else:
            flip = draw(2).bool()
        return torch.where(flip[:, None, None, None], images.flip(3), images)
