"""On a CUDA device (skipped without one): the app trains a few batches there, and a gated step
on the GPU trains exactly the selected samples. The project never needs a GPU to build or test."""
import pytest
import torch
from conftest import TINY, read_run, train_directly

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_a_gated_run_trains_on_cuda_in_bf16(tmp_path):
    train_directly(tmp_path / "run", *TINY, "device=cuda", "training.precision=bf16", "gate=random",
                   "gate.target_rate=0.5", "training.limit_train_batches=4")
    records, summary = read_run(tmp_path / "run")
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"
    assert 0.3 <= records[-1]["activation_rate"] <= 0.7
