"""The one-file copy of an image folder (scripts/pack_cifar10.py, data/packed.py): the same bytes,
so the same uint8 tensors as the folder loader decodes, cached by the pack's digest, and the
folder's fingerprint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_FOLDER
from omegaconf import OmegaConf
from PIL import Image

from adaptive_sparse.training.data import CIFAR10_CLASSES, DatasetError
from adaptive_sparse.training.data.images import _decode_image_folder, _files_digest, _folder_listing
from adaptive_sparse.training.data.packed import load_packed_cifar10
from scripts.pack_cifar10 import pack_folder, scan_start

CLASSES = ("cat", "dog", "frog")


def tiny_folder(root: Path, per_class: int = 3) -> Path:
    """train/ and test/ with `per_class` random 32x32 JPEGs per class (quality 75, as CIFAR-10's
    copy), and one PNG, whose bytes have no JPEG header to share."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.jpg", quality=75)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "train" / "dog" / "png.png")
    return root


def pack_config(pack: Path, cache: Path, **keys) -> OmegaConf:
    return OmegaConf.create({"name": "cifar10", "root": str(pack), "download": False, "cache_dir": str(cache),
                             "classes": None, "expected_counts": None, **keys})


def test_a_packed_folder_decodes_to_the_folders_tensors_from_a_cache_keyed_by_its_digest(tmp_path):
    root = tiny_folder(tmp_path / "folder")
    written = pack_folder(root, tmp_path / "tiny.pack")
    assert written["images"] == {"train": 10, "test": 9} and written["headers"] == 2  # the JPEGs' one, the PNG's none
    cfg = pack_config(tmp_path / "tiny.pack", tmp_path / "cache")
    packed, folder = load_packed_cifar10(cfg), _decode_image_folder(root)
    assert packed.classes == folder.classes == CLASSES
    for split in ("train", "test"):
        assert torch.equal(getattr(packed, split).images, getattr(folder, split).images)
        assert torch.equal(getattr(packed, split).labels, getattr(folder, split).labels)
    assert packed.train.fingerprint["files"] == _files_digest(_folder_listing(root))  # the folder's: resumes across
    (cache_file,) = (tmp_path / "cache").glob("cifar10-pack-*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated: rebuilt, never trusted
    assert torch.equal(load_packed_cifar10(cfg).train.images, packed.train.images)


def test_the_header_ends_where_the_scan_data_begins(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.jpg", quality=75)
    image = (tmp_path / "a.jpg").read_bytes()
    cut = scan_start(image)
    assert image[cut - 14:cut - 12] == b"\xff\xda" and 0 < cut < len(image)  # a 3-component scan header is 14 bytes
    assert scan_start(b"\x89PNG\r\n") == 0


def test_a_missing_or_foreign_pack_is_one_line(tmp_path):
    with pytest.raises(DatasetError, match="no such pack file"):
        load_packed_cifar10(pack_config(tmp_path / "none.pack", tmp_path / "cache"))
    (tmp_path / "foreign.pack").write_bytes(b"not a pack")
    with pytest.raises(DatasetError, match="is not a pack written by scripts.pack_cifar10"):
        load_packed_cifar10(pack_config(tmp_path / "foreign.pack", tmp_path / "cache"))


def test_the_pack_is_checked_against_the_dataset_config(tmp_path):
    pack_folder(tiny_folder(tmp_path / "folder"), tmp_path / "tiny.pack")
    with pytest.raises(DatasetError, match="expected 50000 and 10000"):
        load_packed_cifar10(pack_config(tmp_path / "tiny.pack", tmp_path / "cache", expected_counts=[50000, 10000]))


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_FOLDER.exists(), reason=f"no CIFAR-10 image folder at {CIFAR_FOLDER}")
def test_the_whole_cifar10_copy_packs_to_the_same_tensors_in_a_third_of_its_bytes(tmp_path):
    written = pack_folder(CIFAR_FOLDER, tmp_path / "cifar10.pack")
    assert written["images"] == {"train": 50000, "test": 10000} and written["bytes"] < 20 * 2**20
    cfg = pack_config(tmp_path / "cifar10.pack", tmp_path / "cache", classes=list(CIFAR10_CLASSES),
                      expected_counts=[50000, 10000])
    packed, folder = load_packed_cifar10(cfg), _decode_image_folder(CIFAR_FOLDER)
    for split in ("train", "test"):
        assert torch.equal(getattr(packed, split).images, getattr(folder, split).images)
        assert torch.equal(getattr(packed, split).labels, getattr(folder, split).labels)
