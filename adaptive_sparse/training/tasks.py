"""What differs between tasks (`task` config group): the batches, the model's arguments, and the metrics.

train.py builds one Task from `cfg.task` and asks it for the loaders, the keyword arguments of
the model (and of a proxy scorer), the FLOP meter's example batch and the validation metrics.
Everything else (gates, packing, the training step, checkpoints, torchrun) is the same for
every task: a sample is whatever one row of a batch is (an image, or a window of text), and
its loss and entropy come from `BatchScores.from_logits` (a sequence's: the mean over its
tokens).

- `classification` (images, e.g. CIFAR-10): logits [B, C], one label per image; val_acc.
- `char_lm` (character-level language modelling, e.g. tiny-shakespeare): a causal model's
  logits [B, T, V] for windows of T characters; val_loss in nats per character, val_bpc.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from adaptive_sparse.training.data import BatchLoader, ImageData, IndexedBatches
from adaptive_sparse.training.lifecycle import ConfigError
from adaptive_sparse.training.metering import ExampleBatch, class_example, example_like
from adaptive_sparse.training.step import evaluation_sums_by_tta, tta_level


class Task:
    """The interface; see the two tasks below."""

    name: str = "task"
    metric: str = "val_loss"    # the record key a run is judged by (summary.json: "metric")
    higher_is_better: bool = False
    column: str = "Val Loss"    # its console-table header

    def __init__(self, proxy: Any = None):
        self.proxy = proxy  # the proxy scorer's model factory (conf/task/*.yaml; gate.proxy reads it)

    def check_data(self, data: Any, dataset_name: str) -> None:
        raise NotImplementedError

    def num_outputs(self, data: Any) -> int:
        """Classes, or vocabulary size: what a sample's loss and entropy are normalised by (log)."""
        raise NotImplementedError

    def model_kwargs(self, data: Any) -> dict[str, Any]:
        """Arguments the dataset gives the model (and a proxy scorer) besides its own config."""
        raise NotImplementedError

    def train_loader(self, data: Any, cfg: DictConfig, device: torch.device,
                     shard: tuple[int, int] | None) -> IndexedBatches:
        raise NotImplementedError

    def eval_loader(self, data: Any, cfg: DictConfig, device: torch.device,
                    indices: torch.Tensor | None) -> IndexedBatches:
        raise NotImplementedError

    def eval_size(self, data: Any) -> int:
        """Validation samples (what a torchrun rank's share is cut from)."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, data: Any, cfg: DictConfig, device: torch.device) -> nn.Module:
        return model

    def example(self, data: Any) -> ExampleBatch:
        raise NotImplementedError

    def tta_level(self, cfg: DictConfig) -> int:
        """airbench's test-time augmentation level (0: none; tasks with images: 1 mirror, 2 also shifted)."""
        return 0

    def evaluate(self, model: nn.Module, loader, precision: str, cfg: DictConfig, dist: Any,
                 last: bool = True) -> dict[str, float]:
        """The validation figures (`metrics`) of what `loader` yields, at the configured TTA level
        (torchrun: each rank's shard, sums reduced). With TTA, also the accuracy at every level up
        to it as `val_acc_tta<N>`, from the same forwards: a run with TTA is its own TTA ablation.
        With `training.eval_tta_every_epoch=false`, evaluations before the `last` are at level 0
        only (one forward instead of six), so `val_acc_tta0` is the curve every epoch has."""
        configured = self.tta_level(cfg)
        every_epoch = cfg.training.get("eval_tta_every_epoch", True)
        by_level = evaluation_sums_by_tta(model, loader, precision, configured if last or every_epoch else 0)
        figures = self.metrics(*dist.evaluate(by_level[-1]))
        if configured:
            figures.update({f"val_acc_tta{n}": dist.evaluate(sums)[1] for n, sums in enumerate(by_level)})
        return figures

    def has_test_split(self, data: Any) -> bool:
        """Whether validation is a held-out split (dataset.val_size), so the test split is evaluated
        once more at the end for the final figures (eval_loader(..., split="test"))."""
        return False

    def train_sample_loader(self, data: Any, cfg: DictConfig, device: torch.device, indices: torch.Tensor):
        """The training samples `indices` in order, unaugmented: what `train_eval_loss` is measured on."""
        raise NotImplementedError

    def train_sample_loader_for(self, data: Any, cfg: DictConfig, device: torch.device, dist: Any):
        """`training.train_eval_samples` training samples spread evenly over the split (this rank's
        share under torchrun): the loader of `train_eval_loss`, a training loss every gate shares;
        None when the count is 0."""
        sample = self.train_sample_indices(data, cfg.training.train_eval_samples)
        shard = dist.shard(len(sample))
        if not len(sample):
            return None
        return self.train_sample_loader(data, cfg, device, sample if shard is None else sample[shard])

    def test_figures(self, model: nn.Module, data: Any, cfg: DictConfig, device: torch.device, dist: Any,
                     precision: str) -> dict[str, float]:
        """With validation held out of training (dataset.val_size), the final figures on the test
        split, named test_*; otherwise none."""
        if not self.has_test_split(data):
            return {}
        loader = self.eval_loader(data, cfg, device, dist.shard(self.eval_size(data, "test")), split="test")
        return {key.replace("val_", "test_", 1): value
                for key, value in self.evaluate(model, loader, precision, cfg, dist).items()}

    def train_sample_indices(self, data: Any, count: int) -> torch.Tensor:
        """`count` training samples spread evenly over the split (the same for every run and gate)."""
        total = self.train_size(data)
        return torch.linspace(0, total - 1, min(count, total)).round().long().unique()

    def train_size(self, data: Any) -> int:
        raise NotImplementedError

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        """The validation record's figures from the mean loss and the accuracy (%)."""
        return {"val_loss": mean_loss, "val_acc": accuracy}

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The record keys `metrics` fills (null in an epoch without evaluation)."""
        return tuple(self.metrics(0.0, 0.0))

    def describe(self, data: Any) -> str:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {"task": self.name, "metric": self.metric, "higher_is_better": self.higher_is_better}


class ClassificationTask(Task):
    """Images and one class each: normalisation, whole-batch augmentation, channels_last."""

    name, metric, higher_is_better, column = "classification", "val_acc", True, "Val Acc"

    def check_data(self, data: Any, dataset_name: str) -> None:
        if not isinstance(data, ImageData):
            raise ConfigError(f"dataset={dataset_name} is not an image dataset; task=classification needs one "
                              "(for text: task=char_lm model=gpt)")

    def num_outputs(self, data: ImageData) -> int:
        return data.num_classes

    def model_kwargs(self, data: ImageData) -> dict[str, Any]:
        return {"num_classes": data.num_classes}

    def train_loader(self, data: ImageData, cfg: DictConfig, device: torch.device,
                     shard: tuple[int, int] | None) -> BatchLoader:
        t = cfg.training
        return BatchLoader(data.train, t.batch_size, device, shuffle=True, augment=cfg.dataset.augment,
                           crop_padding=cfg.dataset.crop_padding, limit_batches=t.limit_train_batches,
                           seed=cfg.seed, shard=shard, channels_last=t.channels_last,
                           flip=cfg.dataset.get("flip", "random"), padding_mode=cfg.dataset.get("padding_mode", "zeros"),
                           drop_last=t.get("drop_last", False))

    @staticmethod
    def split(data: ImageData, name: str):
        """val (the held-out split, else test), test, or train."""
        return data.validation if name == "val" else getattr(data, name)

    def eval_loader(self, data: ImageData, cfg: DictConfig, device: torch.device,
                    indices: torch.Tensor | None, split: str = "val") -> BatchLoader:
        """One split's images in order, unaugmented, at the evaluation batch size."""
        return BatchLoader(self.split(data, split), cfg.training.eval_batch_size, device, shuffle=False,
                           indices=indices, channels_last=cfg.training.channels_last)

    def eval_size(self, data: ImageData, split: str = "val") -> int:
        return len(self.split(data, split))

    def has_test_split(self, data: ImageData) -> bool:
        return data.val is not None

    def train_size(self, data: ImageData) -> int:
        return self.eval_size(data, "train")

    def train_sample_loader(self, data: ImageData, cfg: DictConfig, device: torch.device,
                            indices: torch.Tensor) -> BatchLoader:
        return self.eval_loader(data, cfg, device, indices, split="train")

    def prepare_model(self, model: nn.Module, data: ImageData, cfg: DictConfig, device: torch.device) -> nn.Module:
        if cfg.training.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if hasattr(model, "fit_to_data"):  # e.g. FastNet's whitening filters, from training images
            model.fit_to_data(next(iter(BatchLoader(data.train, 5000, device, shuffle=False)))[0])
        return model

    def example(self, data: ImageData) -> ExampleBatch:
        return class_example(tuple(data.train.images.shape[1:]))

    def tta_level(self, cfg: DictConfig) -> int:
        return tta_level(cfg.training.eval_flip_tta, cfg.training.get("eval_translate_tta", False))

    def describe(self, data: ImageData) -> str:
        return f"{len(data.train)} train, {len(data.test)} test images"


class CharLMTask(Task):
    """Next-character prediction over fixed windows of `block_size` characters (adaptive_sparse/text.py).

    A sample is one training window (its loss: the mean over its tokens); `random_phase` shifts
    the window grid each epoch. Validation scores every character of the validation split once.
    """

    name, metric, higher_is_better, column = "char_lm", "val_loss", False, "Val Loss"

    def __init__(self, block_size: int, random_phase: bool = False, proxy: Any = None):
        super().__init__(proxy)
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"task.block_size={block_size!r} is not allowed: an integer >= 1")
        self.block_size, self.random_phase = block_size, bool(random_phase)

    def check_data(self, data: Any, dataset_name: str) -> None:
        from adaptive_sparse.training.data.text import TextData

        if not isinstance(data, TextData):
            raise ConfigError(f"dataset={dataset_name} is not a text dataset; task=char_lm needs one "
                              "(e.g. dataset=shakespeare_char); for images: task=classification")

    def num_outputs(self, data) -> int:
        return data.vocab_size

    def model_kwargs(self, data) -> dict[str, Any]:
        return {"vocab_size": data.vocab_size}

    def train_loader(self, data, cfg: DictConfig, device: torch.device, shard: tuple[int, int] | None):
        from adaptive_sparse.training.data.text import TrainWindows

        t = cfg.training
        return TrainWindows(data.train, self.block_size, t.batch_size, device, random_phase=self.random_phase,
                            limit_batches=t.limit_train_batches, seed=cfg.seed, shard=shard)

    def eval_loader(self, data, cfg: DictConfig, device: torch.device, indices: torch.Tensor | None):
        from adaptive_sparse.training.data.text import EvalWindows

        return EvalWindows(data.val, self.block_size, cfg.training.eval_batch_size, device, indices=indices)

    def train_size(self, data) -> int:
        from adaptive_sparse.training.data.text import window_count

        return window_count(len(data.train), self.block_size, False)

    def train_sample_loader(self, data, cfg: DictConfig, device: torch.device, indices: torch.Tensor):
        from adaptive_sparse.training.data.text import (
            TrainWindows,  # the fixed grid (phase 0), whatever task.random_phase
        )

        return TrainWindows(data.train, self.block_size, cfg.training.eval_batch_size, device, shuffle=False,
                            indices=indices)

    def eval_size(self, data) -> int:
        from adaptive_sparse.training.data.text import eval_window_starts

        return len(eval_window_starts(len(data.val), self.block_size))

    def prepare_model(self, model: nn.Module, data, cfg: DictConfig, device: torch.device) -> nn.Module:
        capacity = getattr(model, "block_size", None)
        if capacity is None:
            raise ConfigError(f"model={type(model).__name__} is not a language model; task=char_lm needs "
                              "model=gpt")
        if self.block_size > capacity:
            raise ConfigError(f"task.block_size={self.block_size} is larger than model.block_size={capacity} "
                              "(the model's position embeddings); raise model.block_size or lower task.block_size")
        if cfg.training.eval_flip_tta or cfg.training.get("eval_translate_tta"):
            raise ConfigError("training.eval_flip_tta / eval_translate_tta mirror and shift images; they have "
                              "no meaning for task=char_lm")
        return model

    def example(self, data) -> ExampleBatch:
        window = torch.empty(1, self.block_size, dtype=torch.long)
        return example_like(window, window)

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        # bits per character: the loss in nats over ln 2; val_acc is next-character accuracy
        return {"val_loss": mean_loss, "val_acc": accuracy, "val_bpc": mean_loss / math.log(2)}

    def describe(self, data) -> str:
        from adaptive_sparse.training.data.text import window_count

        windows = window_count(len(data.train), self.block_size, self.random_phase)
        return (f"{len(data.train)} train characters ({windows} windows of {self.block_size}), "
                f"{len(data.val)} validation characters, vocabulary {data.vocab_size}")

