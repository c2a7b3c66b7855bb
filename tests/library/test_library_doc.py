"""docs/library.md's code blocks, run as written on made-up data: each block gets only the names
a reader's script would already have (the data, a model, an optimiser, the framework's objects)."""
from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.minimal_loop import make_data

DOC = Path(__file__).resolve().parents[2] / "docs" / "library.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
SAMPLES, FEATURES, CLASSES = 256, 32, 4


def block_with(marker: str) -> str:
    """The one code block of library.md that contains `marker`."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} blocks of docs/library.md contain {marker!r}"
    return found[0]


def test_every_block_is_run_below():
    markers = ("gate.select(idx, None)", "SelectingBatchSampler(gate", "SelectingSamplerCallback(gate",
               "SelectingTrainer(model=model", PLAIN, GATED)
    assert sorted(BLOCKS) == sorted(block_with(m) for m in markers)


PLAIN, GATED = "batch_size=64, shuffle=True)", "loader.batch_sampler.update("  # the existing script, then gated


def reader_names() -> dict:
    """A reader's script before the block: the training set, a linear model and its optimiser."""
    x, y = make_data(SAMPLES, FEATURES, CLASSES)
    model = nn.Linear(FEATURES, CLASSES)
    return {"train_set": TensorDataset(x, y), "model": model, "optimizer": torch.optim.SGD(model.parameters(), 0.1),
            "epochs": 2, "DataLoader": DataLoader, "F": F, "x": x, "y": y, "torch": torch}


def test_the_select_after_loading_block_trains_and_teaches_the_gate():
    """Two epochs at 0.5: the model moves, each step trains at most its batch, and the gate holds
    a loss for every sample it trained (about half after epoch 1, more after epoch 2)."""
    names = reader_names()
    before = names["model"].weight.detach().clone()
    names["loader"] = DataLoader(TensorDataset(names["x"], names["y"], torch.arange(SAMPLES)), batch_size=64,
                                 shuffle=True)
    exec(block_with("gate.select(idx, None)"), names)
    assert not torch.equal(names["model"].weight, before)
    assert len(names["keep"]) < 64
    remembered = (~names["gate"].memory.last_loss.isnan()).sum().item()
    assert 0.45 * SAMPLES <= remembered < SAMPLES


def test_the_sampler_block_serves_about_half_of_the_epoch():
    names = reader_names()
    before = names["model"].weight.detach().clone()
    exec(block_with("SelectingBatchSampler(gate"), names)
    served = sum(len(idx) for idx, _ in names["sampler"].batches)  # the last epoch's batches
    assert 0.4 * SAMPLES <= served <= 0.6 * SAMPLES  # target 0.5
    assert not torch.equal(names["model"].weight, before)


@pytest.mark.slow  # imports Lightning
def test_the_lightning_block_builds_a_trainer_with_the_callback():
    lightning = pytest.importorskip("lightning")
    from adaptive_sparse import SundewGate
    from adaptive_sparse.integrations.lightning import SelectingSamplerCallback
    names = {**reader_names(), "L": lightning, "SundewGate": SundewGate}
    exec(block_with("SelectingSamplerCallback(gate"), names)
    assert SelectingSamplerCallback.of(names["trainer"]).gate is names["gate"]


@pytest.mark.slow  # imports transformers and trains
def test_the_hf_block_trains_an_epoch_at_about_half(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from adaptive_sparse import SundewGate
    from examples.hf_sundew import make_sequences, tiny_gpt2
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=16,
                             save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    names = {"model": tiny_gpt2(), "args": args, "train_set": make_sequences(256), "SundewGate": SundewGate}
    exec(block_with("SelectingTrainer(model=model"), names)
    assert 0.4 <= names["trainer"].epochs[0]["activation_rate"] <= 0.6


def test_sundew_goes_into_an_existing_script_in_five_lines():
    """The diff of the plain script's block and the gated one's: five lines in, two of them in
    place of the loader's and the loss's, nothing else removed."""
    diff = list(difflib.ndiff(block_with(PLAIN).splitlines(), block_with(GATED).splitlines()))
    added = [line for line in diff if line.startswith("+ ")]
    assert [line[2:].split("=")[0].strip() for line in diff if line.startswith("- ")] == ["loader", "loss"]
    assert len(added) == 5 and all(line.rstrip().endswith(f"# ({n})") for n, line in enumerate(added, 1))


def run_script(block: str, epochs: int) -> dict:
    """The block as a reader's script run up to `epochs`, in the current directory (its checkpoint)."""
    torch.manual_seed(0)  # the same model for every run
    names = {**reader_names(), "epochs": epochs}
    exec(block, names)
    return names


def test_the_existing_script_runs_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = run_script(block_with(PLAIN), 2)
    assert torch.load("ckpt.pt")["epoch"] == 2 and names["epoch"] == 2


def test_the_gated_script_stopped_and_started_again_resumes_exactly(tmp_path, monkeypatch):
    """Through epoch 3 in one go, and stopped after epoch 2 then run again: the same samples in
    epoch 3 (about half of them), the same final weights."""
    (tmp_path / "once").mkdir(), (tmp_path / "twice").mkdir()
    monkeypatch.chdir(tmp_path / "once")
    once = run_script(block_with(GATED), 3)
    monkeypatch.chdir(tmp_path / "twice")
    run_script(block_with(GATED), 2)
    twice = run_script(block_with(GATED), 3)
    assert twice["start"] == 3  # the second run trained only epoch 3
    trained = [idx.tolist() for idx, _ in once["loader"].batch_sampler.batches]
    assert trained == [idx.tolist() for idx, _ in twice["loader"].batch_sampler.batches]
    assert 0.4 * SAMPLES <= sum(map(len, trained)) <= 0.6 * SAMPLES
    assert torch.equal(once["model"].weight, twice["model"].weight)
