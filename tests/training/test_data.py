"""In-memory batches carry dataset indices; augmentation is a whole-batch crop and flip;
the image-folder loader reads real CIFAR-10 when the shared copy exists."""
import shutil

import pytest
import torch
from conftest import CIFAR_FOLDER
from omegaconf import OmegaConf

from adaptive_sparse.training.data import BatchLoader, DatasetError, Split, load_cifar10, load_dataset


def ramp_split(n: int = 10) -> Split:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return Split(images, torch.arange(n) % 10)


def test_batches_cover_every_index_once_and_carry_them():
    split = ramp_split(10)
    loader = BatchLoader(split, batch_size=4, device=torch.device("cpu"), shuffle=True, seed=0,
                         mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    seen = []
    for x, y, idx, _ in loader:
        assert torch.equal(x[:, 0, 0, 0], idx.float())  # pixel value == dataset index
        assert torch.equal(y, split.labels[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(10)) and len(loader) == 3


def test_limit_batches_caps_an_epoch():
    loader = BatchLoader(ramp_split(10), 4, torch.device("cpu"), shuffle=False, limit_batches=2)
    assert len(loader) == 2 and len(list(loader)) == 2


def test_augmentation_is_a_padded_crop_then_optional_flip():
    n = 16
    images = torch.randint(1, 255, (n, 3, 32, 32), dtype=torch.uint8)
    loader = BatchLoader(Split(images, torch.zeros(n, dtype=torch.long)), n, torch.device("cpu"),
                         shuffle=False, augment=True, crop_padding=4, seed=3)
    out = loader._augment(images, torch.arange(n))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(n):  # each output is one of the 81 crops of the padded image, maybe flipped
        crops = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(2)) for crop in crops)


def test_synthetic_dataset_is_deterministic():
    cfg = OmegaConf.create({"name": "synthetic", "num_classes": 10, "image_size": 32, "num_train": 64,
                            "num_test": 32, "noise": 0.25, "data_seed": 7})
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.train.images, b.train.images) and a.train.images.dtype == torch.uint8


def test_missing_root_without_download_names_the_key(tmp_path):
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path / "nope"), "download": False,
                            "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DatasetError, match="dataset.root"):
        load_cifar10(cfg)


@pytest.mark.skipif(not CIFAR_FOLDER.exists(), reason=f"no CIFAR-10 image folder at {CIFAR_FOLDER}")
def test_image_folder_loader_on_a_small_copy_and_a_corrupt_file(tmp_path):
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for class_dir in sorted((CIFAR_FOLDER / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:3]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    cfg = OmegaConf.create({"name": "cifar10", "root": str(root), "download": False,
                            "cache_dir": str(tmp_path / "cache")})
    data = load_cifar10(cfg)
    assert data.train.images.shape == (30, 3, 32, 32) and data.train.labels.bincount().tolist() == [3] * 10
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert list((tmp_path / "cache").glob("*.pt"))  # cached outside the dataset folder
    assert torch.equal(load_cifar10(cfg).train.images, data.train.images)  # from the cache

    bad = root / "train" / "cat" / "9999.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="9999.jpg"):
        load_cifar10(cfg)


@pytest.mark.skipif(not CIFAR_FOLDER.exists(), reason=f"no CIFAR-10 image folder at {CIFAR_FOLDER}")
def test_real_cifar10_folder_serves_batches(tmp_path):
    cfg = OmegaConf.create({"name": "cifar10", "root": str(CIFAR_FOLDER), "download": False,
                            "cache_dir": "~/.cache/adaptive_sparse"})
    data = load_cifar10(cfg)
    assert data.train.images.shape == (50000, 3, 32, 32) and len(data.test) == 10000
    assert data.train.labels.bincount().tolist() == [5000] * 10
    loader = BatchLoader(data.train, 64, torch.device("cpu"), shuffle=True, augment=True, limit_batches=3)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (64, 3, 32, 32)
    assert abs(batches[0][0].mean().item()) < 0.5  # normalised


def test_a_held_out_validation_split_is_fixed_disjoint_and_leaves_test_alone():
    cfg = OmegaConf.create({"name": "synthetic", "num_classes": 10, "image_size": 8, "num_train": 100,
                            "num_test": 20, "noise": 0.25, "data_seed": 7, "val_size": 30, "val_seed": 0})
    whole = load_dataset(OmegaConf.merge(cfg, {"val_size": 0}))
    a, b = load_dataset(cfg), load_dataset(OmegaConf.merge(cfg, {"data_seed": 7}))
    assert (len(a.train), len(a.val), len(a.test)) == (70, 30, 20) and whole.val is None
    assert torch.equal(a.val.images, b.val.images)  # the same held-out images on every run
    rows = lambda split: {tuple(img.flatten().tolist()) for img in split.images}  # noqa: E731
    assert not rows(a.train) & rows(a.val) and rows(a.train) | rows(a.val) == rows(whole.train)
    assert torch.equal(a.test.images, whole.test.images) and a.validation is a.val and whole.validation is whole.test
    with pytest.raises(DatasetError, match="dataset.val_size=100 is not allowed"):
        load_dataset(OmegaConf.merge(cfg, {"val_size": 100}))
