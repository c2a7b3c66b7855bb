"""examples/: the plain-PyTorch scripts run as a user would run them (the image folder one on a tiny folder)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples import imagefolder_sundew, minimal_loop


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train/ 3 classes x 16 images, test/ 3 x 4: random 32x32 JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 4)):
        for name in ("cat", "dog", "frog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return tmp_path


@pytest.mark.parametrize("select, workers", [pytest.param("before", "2", marks=pytest.mark.slow),  # worker start-ups
                                             ("before", "0"), ("after", "0")])
def test_the_imagefolder_example_trains_about_half_of_each_epoch(image_folder, tmp_path, select, workers):
    out = tmp_path / "epochs.json"
    records = imagefolder_sundew.main(["--data", str(image_folder), "--epochs", "2", "--batch-size", "8", "--workers", workers,
                    "--select", select, "--json", str(out)])
    assert json.loads(out.read_text()) == records and [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert 0.3 * 48 <= record["samples_trained"] <= 0.7 * 48  # target 0.5 of 48 samples
        assert record["activation_rate"] == record["samples_trained"] / 48
        assert record["eval_time_s"] > 0 and record["epoch_time_s"] > 0


def test_the_imagefolder_example_refuses_mismatched_classes_a_missing_folder_and_no_epochs(image_folder, tmp_path):
    """One class list for both splits: a class missing from test/ would shift its labels."""
    for image in (image_folder / "test" / "cat").iterdir():
        image.unlink()
    (image_folder / "test" / "cat").rmdir()
    refusals = {(str(image_folder), "1"): f"--data {image_folder}: train/ and test/ hold different classes "
                                          "(only in train/: ['cat'], only in test/: [])",
                (str(tmp_path / "nowhere"), "1"): f"--data {tmp_path / 'nowhere'}: no such folder",
                (str(image_folder), "0"): "--epochs 0: nothing would train; pass 1 or more"}
    for (data, epochs), message in refusals.items():
        with pytest.raises(SystemExit) as refused:
            imagefolder_sundew.main(["--data", data, "--epochs", epochs, "--workers", "0"])
        assert refused.value.code == f"imagefolder_sundew: {message}"


def test_the_minimal_example_trains_half_the_samples_and_learns_with_torch_alone():
    results = minimal_loop.main(["--epochs", "1"])
    full = results["full training"]
    assert full["samples_trained"] == 4096 and full["test_acc"] > 60.0  # chance: 25%
    for name in ("sundew, after loading", "sundew, before loading"):
        assert 0.45 <= results[name]["activation_rate"] <= 0.55
        assert results[name]["test_acc"] > 50.0
