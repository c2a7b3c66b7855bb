"""The language task (task=char_lm): text windows with stable indices, the task's evaluation and
baselines, and bad combinations refused by name (causal attention and the GPT: tests/library)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config, cyclic_text, read_run, run_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adaptive_sparse.models.gpt import GPT
from adaptive_sparse.training.data import DatasetError
from adaptive_sparse.training.data.text import (
    EvalWindows,
    TokenSplit,
    TrainWindows,
    load_shakespeare_char,
    window_count,
)
from adaptive_sparse.training.gating import build_gate
from adaptive_sparse.training.lifecycle import ConfigError
from adaptive_sparse.training.step import evaluation_sums
from scripts import char_baselines


# ------------------------------------------------------------------ windows
def test_training_windows_have_stable_indices_and_a_shared_phase():
    split = TokenSplit(torch.arange(23))
    assert window_count(23, 4, random_phase=False) == 5  # (23 - 1) // 4
    assert window_count(23, 4, random_phase=True) == 4   # (23 - 1 - 3) // 4
    loader = TrainWindows(split, 4, batch_size=5, device=torch.device("cpu"), shuffle=False)
    inputs, targets, idx, _ = next(iter(loader))
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert inputs[2].tolist() == [8, 9, 10, 11] and targets[2].tolist() == [9, 10, 11, 12]
    phased = TrainWindows(split, 4, batch_size=4, device=torch.device("cpu"), shuffle=False, random_phase=True,
                          seed=3)
    for _ in range(3):
        inputs, targets, *_ = next(iter(phased))
        assert torch.equal(inputs[1] - inputs[0], torch.full((4,), 4))  # one grid shifted whole
        assert 0 <= inputs[0, 0].item() <= 3 and inputs[-1, -1].item() + 1 <= 22


def test_validation_scores_every_character_after_the_first_once():
    split = TokenSplit(torch.arange(11))  # 10 targets; T = 4: windows at 0 and 4, then a tail at 6
    loader = EvalWindows(split, 4, batch_size=8, device=torch.device("cpu"))
    inputs, targets, *_ = next(iter(loader))
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [-100, -100, 9, 10]]
    scored = targets[targets >= 0]
    assert sorted(scored.tolist()) == list(range(1, 11))


def test_evaluation_sums_count_scored_positions_only():
    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 5)  # every next token equally likely among 5
    loader = EvalWindows(TokenSplit(torch.arange(11) % 5), 4, batch_size=2, device=torch.device("cpu"))
    loss_sum, _, count = evaluation_sums(Uniform(), loader)
    assert count == 10 and loss_sum == pytest.approx(10 * math.log(5))


# ------------------------------------------------------------------ the corpus
def write_corpus(tmp_path, text: str = "to be, or not to be: that is the question.\n" * 40):
    path = tmp_path / "corpus" / "input.txt"
    path.parent.mkdir()
    path.write_text(text)
    return path


def text_cfg(tmp_path, **extra):
    return OmegaConf.create({"root": str(tmp_path / "corpus"), "search_roots": [], "file_name": "input.txt",
                             "download": False, "url": "", "cache_dir": str(tmp_path / "cache"),
                             "train_fraction": 0.9, **extra})


def test_corpus_is_split_ninety_ten_with_a_sorted_vocabulary_and_cached(tmp_path):
    write_corpus(tmp_path)
    data = load_shakespeare_char(text_cfg(tmp_path))
    assert len(data.train) == int(0.9 * 1720) and len(data.train) + len(data.val) == 1720  # 43 characters x 40
    assert data.vocab == tuple(sorted(set("to be, or not to be: that is the question.\n")))
    assert data.decode(data.train.tokens[:5]) == "to be"
    assert len(list((tmp_path / "cache").glob("char-corpus-*.pt"))) == 1
    assert torch.equal(load_shakespeare_char(text_cfg(tmp_path)).train.tokens, data.train.tokens)


def test_a_missing_corpus_is_refused_by_name(tmp_path):
    with pytest.raises(DatasetError, match="no input.txt there"):
        load_shakespeare_char(text_cfg(tmp_path))
    assert not (tmp_path / "corpus").exists()  # nothing created by a failed load


def test_offline_download_says_to_set_the_root(tmp_path):
    cfg = text_cfg(tmp_path, root=None, search_roots=[str(tmp_path / "data")], download=True,
                   url="http://127.0.0.1:9/input.txt")
    with pytest.raises(DatasetError, match="dataset.root"):
        load_shakespeare_char(cfg)
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ refused combinations
def test_a_text_dataset_with_the_classification_task_is_refused(tmp_path):
    write_corpus(tmp_path)
    cfg = compose_config(["dataset=shakespeare_char"])
    with pytest.raises(ConfigError, match="not an image dataset"):
        instantiate(cfg.task).check_data(load_shakespeare_char(text_cfg(tmp_path)), "shakespeare_char")


def test_an_image_dataset_with_char_lm_is_refused():
    from adaptive_sparse.training.data import make_synthetic

    cfg = compose_config(["task=char_lm", "model=gpt", "dataset=synthetic"])
    with pytest.raises(ConfigError, match="not a text dataset"):
        instantiate(cfg.task).check_data(make_synthetic(cfg.dataset), "synthetic")


def test_a_window_longer_than_the_model_is_refused():
    cfg = compose_config(["task=char_lm", "model=gpt", "dataset=shakespeare_char", "task.block_size=128"])
    task = instantiate(cfg.task)
    model = instantiate(cfg.model, vocab_size=65)
    with pytest.raises(ConfigError, match="task.block_size=128 is larger than model.block_size=64"):
        task.prepare_model(model, None, cfg, torch.device("cpu"))


def test_the_window_follows_the_model_by_default_and_the_proxy_is_a_small_gpt():
    cfg = compose_config(["task=char_lm", "model=gpt", "dataset=shakespeare_char", "model.block_size=256",
                          "gate=sundew_proxy"])
    task = instantiate(cfg.task)
    assert task.block_size == 256
    gate = build_gate(cfg.gate, None, {"num_samples": 8, "num_outputs": 65}, {"vocab_size": 65})
    assert isinstance(gate.scorer.model, GPT) and gate.scorer.model.block_size == 256


# ------------------------------------------------------------------ through train.py
@pytest.mark.slow
def test_char_lm_trains_through_train_py_with_a_packed_memory_gate(tmp_path):
    write_corpus(tmp_path, cyclic_text(6000))
    result = run_train(tmp_path / "run", "task=char_lm", "dataset=shakespeare_char", "model=gpt",
                       f"dataset.root={tmp_path / 'corpus'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                       "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
                       "gate=sundew_memory", "gate.target_rate=0.5", "gate.pack=true", "training.batch_size=16",
                       "training.epochs=2", "wandb.mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert (summary["task"], summary["metric"], summary["higher_is_better"]) == ("char_lm", "val_loss", False)
    windows = (5400 - 1) // 32  # 168 training windows of the 90% split
    assert summary["samples_seen"] == 2 * windows
    assert summary["val_bpc"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert abs(records[1]["activation_rate"] - 0.5) < 0.05
    assert "Val Loss" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["none", "random", "sundew", "sundew_memory", "sundew_proxy", "infobatch",
                                  "selective_backprop"])
def test_every_gate_trains_on_sequences(tmp_path, gate):
    write_corpus(tmp_path, cyclic_text(6000))
    result = run_train(tmp_path / "run", "task=char_lm", "dataset=shakespeare_char", "model=gpt",
                       f"dataset.root={tmp_path / 'corpus'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                       "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
                       f"gate={gate}", "training.batch_size=32", "training.epochs=1", "wandb.mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    _, summary = read_run(tmp_path / "run")
    assert summary["gate"] == gate and summary["samples_seen"] == 168  # (5400 - 1) // 32 windows
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(13) + 1
    # scoring forwards are counted only where the gate scores: sundew (forward, proxy), selective backprop
    scores = gate in ("sundew", "sundew_proxy", "selective_backprop")
    assert (summary["flops_scoring"] > 0) == scores


def test_a_stage_with_a_lead_in_trains_at_the_tail_of_the_longer_schedule():
    """training.schedule_lead_in_epochs: the recipe's sparse stage (init_from a dense run's epoch 4
    of 10) continues the dense run's cosine instead of warming up again from its peak."""
    from adaptive_sparse.training.optim import build_scheduler

    cfg = OmegaConf.create({"_target_": "adaptive_sparse.training.optim.warmup_cosine_schedule", "_partial_": True,
                            "warmup_steps": 10, "min_ratio": 0.0})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    stage = build_scheduler(cfg, optimizer, total_steps=60, lead_in_steps=40)  # steps 40..99 of 100
    factors = []
    for _ in range(60):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        stage.step()
    # cosine from 1 at step 10 to 0 at step 100: step 40 is a third of the way, step 55 half way
    assert factors[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert factors[15] == pytest.approx(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_counting_baselines_by_hand():
    baselines = char_baselines
    train, val = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 1, 0])
    # unigram: p(0) = 3/5, p(1) = 2/5; bigram: 0 is always followed by 1, 1 by 0
    assert baselines.ngram_cross_entropy(train, val, 2, 1, 0.0) == pytest.approx(
        -(2 * math.log(0.6) + math.log(0.4)) / 3)
    assert baselines.ngram_cross_entropy(train, val, 2, 2, 0.0) == pytest.approx(0.0)
    # add-one: p(1 | 0) = (2 + 1) / (2 + 2)
    assert baselines.ngram_cross_entropy(train, val, 2, 2, 1.0) == pytest.approx(-math.log(3 / 4))
