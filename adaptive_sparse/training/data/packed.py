"""CIFAR-10 as one file (`dataset.root=PATH.pack`): the JPEG bytes of an image folder's two splits
with their labels and class names, written by `python -m scripts.pack_cifar10`, for a machine the
folder cannot reach (a GPU machine is sent at most 64 MiB of working tree).

The pack holds the folder's bytes, not new pixels: every file of one encoder begins with the same
headers (JFIF, quantisation and Huffman tables, frame and scan headers: 623 of a CIFAR-10 JPEG's
~920 bytes), so each distinct header is kept once and each image's remaining bytes after it; an
image is its header followed by its own bytes, decoded with PIL as the folder's files are. 60,000
files of 52.7 MiB pack into about 17 MiB. Decoded once into uint8 tensors, cached under
`dataset.cache_dir` keyed by the pack's digest. Its fingerprint's `files` is the folder's (names
and sizes), so a run checkpointed on the folder resumes on its pack and the reverse.

Layout (torch.save, loaded with weights_only=True): format, classes (label order), files (the
folder's digest), headers (uint8 tensors), and per split (train, test): labels [N], header [N]
(an index into headers), ends [N] (where each image's bytes end in body) and body (uint8), all
int32 but body.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from adaptive_sparse.training.data.images import ImageData, Split, check_image_data, decode_image, fingerprinted
from adaptive_sparse.training.data.loaders import DatasetError, find_root
from adaptive_sparse.training.io import atomic_torch_save

PACK_FORMAT = 1
SPLITS = ("train", "test")


def load_packed_cifar10(cfg: DictConfig) -> ImageData:
    """`dataset.root=PATH.pack`: its images as the folder it was packed from decodes (same
    signature as `images.load_cifar10`)."""
    path = find_root(cfg)
    if path is None or not path.is_file():
        raise DatasetError(f"dataset.root={path}: no such pack file (python -m scripts.pack_cifar10 writes one)")
    digest = file_digest(path)
    cache_file = Path(os.path.expanduser(str(cfg.cache_dir))) / f"cifar10-pack-{digest[:16]}.pt"
    blob = cached(cache_file) or decode_pack(path, cache_file)
    data = ImageData(Split(*blob["train"]), Split(*blob["test"]), tuple(blob["classes"]), f"pack:{path}")
    data = fingerprinted(data, files=blob["files"])
    check_image_data(data, path, cfg)
    return data


def file_digest(path: Path) -> str:
    """sha256 of the pack's bytes (~0.1 s for 17 MiB): any change to it decodes afresh."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached(cache_file: Path) -> dict | None:
    """The decoded tensors of a pack with this digest, or None (a truncated cache is rebuilt, never trusted)."""
    if not cache_file.exists():
        return None
    try:
        return torch.load(cache_file, weights_only=True)
    except Exception:  # noqa: BLE001 (whatever is wrong with a cache, it is rebuilt)
        cache_file.unlink(missing_ok=True)
        return None


def read_pack(path: Path) -> dict:
    """The pack's contents, refused in one line if the file is not a pack of this format."""
    try:
        pack = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (not a zip, truncated, a pickle with code: all one answer)
        raise DatasetError(f"dataset.root={path} is not a pack written by scripts.pack_cifar10 "
                           f"({type(err).__name__})") from None
    if not isinstance(pack, dict) or pack.get("format") != PACK_FORMAT:
        raise DatasetError(f"dataset.root={path} is not a format-{PACK_FORMAT} pack written by scripts.pack_cifar10")
    return pack


def decode_pack(path: Path, cache_file: Path) -> dict:
    """Decode every image of the pack, then save the tensors as `cache_file`."""
    pack = read_pack(path)
    headers = [bytes(h.numpy()) for h in pack["headers"]]
    blob = {split: decode_split(pack[split], headers, f"{path}:{split}") for split in SPLITS}
    blob.update(classes=list(pack["classes"]), files=pack["files"])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(blob, cache_file)
    return blob


def decode_split(split: dict, headers: list[bytes], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, 32, 32] uint8, labels [N] int64), each image its header and own bytes
    decoded as images._decode_split decodes a file."""
    body, ends, header = bytes(split["body"].numpy()), split["ends"].tolist(), split["header"].tolist()
    images = np.empty((len(ends), 32, 32, 3), dtype=np.uint8)
    for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        images[i] = decode_image(io.BytesIO(headers[header[i]] + body[start:end]), f"{i} of {where}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), split["labels"].long()
