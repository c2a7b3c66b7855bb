"""Bad input is refused before training with the key or file named; logging never kills a run."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from conftest import TINY, run_train
from omegaconf import OmegaConf
from PIL import Image

from adaptive_sparse.training.data import DatasetError, load_dataset


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_image_is_named(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "ok.png").write_bytes(_png(100))
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(_png(50)[:40])  # a truncated PNG
    cfg = OmegaConf.create({"name": "cifar10", "root": str(root), "download": False,
                            "cache_dir": str(tmp_path / "cache"), "search_roots": []})
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        load_dataset(cfg)


def test_corrupt_cifar_batch_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": "not images"}))
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "download": False,
                            "cache_dir": str(tmp_path / "cache"), "search_roots": []})
    with pytest.raises(DatasetError, match=f"batch file {folder / 'data_batch_1'} is corrupt"):
        load_dataset(cfg)


@pytest.mark.slow
def test_wandb_online_without_a_network_continues_offline_and_resume_keeps_the_run_id(tmp_path):
    # a key, and a W&B server that refuses connections: the no-network path, for real
    home = {"HOME": str(tmp_path / "home"), "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg"),
            "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    small = [*TINY[:-1], "dataset.num_train=256", "dataset.num_test=128", "wandb.mode=online",
             "wandb.init_timeout_s=1"]
    run_dir = tmp_path / "run"
    # 4 batches an epoch: a NaN at the 6th training forward stops the run (offline, to save W&B's
    # ~10 s of retries) in epoch 2, after the checkpoint of epoch 1; the resume, online against
    # the refusing server, must fall back to offline under the same run id
    first = run_train(run_dir, *small, "training.epochs=2", "gate=none", "debug.inject_nan_at_step=6",
                      "wandb.mode=offline", env=home)
    assert first.returncode == 1 and "non-finite training loss" in first.stdout, first.stderr[-3000:]
    resumed = run_train(run_dir, *small, "training.epochs=2", "gate=none", "resume=true", env=home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("W&B mode=online") == 1 and "logging offline instead" in resumed.stderr
    assert not list((run_dir / "wandb").glob("run-*"))  # the failed online attempt left no folder
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1]  # one W&B run id
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
