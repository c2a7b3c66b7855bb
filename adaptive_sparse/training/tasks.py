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
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from adaptive_sparse.training.data import BatchLoader, ImageData, IndexedBatches
from adaptive_sparse.training.data.text import EvalWindows, TextData, TrainWindows, eval_window_starts, window_count
from adaptive_sparse.training.lifecycle import ConfigError
from adaptive_sparse.training.metering import ExampleBatch, class_example, example_like
from adaptive_sparse.training.records import Metric
from adaptive_sparse.training.step import Views, evaluation_sums_by_level, plain_view


class Task:
    """The interface; see the two tasks below."""

    name: str = "task"
    metric = Metric("val_loss", higher_is_better=False)  # what a run is judged by (summary.json: "metric")

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

    def views(self, last: bool) -> Views:
        """The logits evaluation scores (`last`: the run's final evaluation): the model's alone,
        unless the task has test-time augmentation."""
        return plain_view

    def evaluate(self, model: nn.Module, loader, precision: str, cfg: DictConfig, dist: Any,
                 last: bool = True) -> dict[str, float]:
        """The validation figures (`metrics`) of what `loader` yields (torchrun: each rank's shard,
        sums reduced). With test-time augmentation, also the accuracy at every level up to the
        configured one as `val_acc_tta<N>`, from the same forwards."""
        by_level = evaluation_sums_by_level(model, loader, precision, self.views(last))
        figures = self.metrics(*dist.evaluate(by_level[-1]))
        if self.tta_configured:
            figures.update({f"val_acc_tta{n}": dist.evaluate(sums)[1] for n, sums in enumerate(by_level)})
        return figures

    tta_configured = False  # whether evaluations record val_acc_tta<N>

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
        return {"task": self.name, "metric": self.metric.key, "higher_is_better": self.metric.higher_is_better}


class ClassificationTask(Task):
    """Images and one class each: normalisation, whole-batch augmentation, channels_last, and
    airbench's test-time augmentation (`eval_flip_tta`: the mean logits of an image and its
    mirror; with `eval_translate_tta`, six views; `eval_tta_every_epoch=false`: epochs before the
    last evaluate on the image alone, a sixth of the cost, so `val_acc_tta0` is every epoch's curve)."""

    name, metric = "classification", Metric("val_acc", higher_is_better=True)

    def __init__(self, proxy: Any = None, channels_last: bool = True, eval_flip_tta: bool = False,
                 eval_translate_tta: bool = False, eval_tta_every_epoch: bool = True):
        super().__init__(proxy)
        if eval_translate_tta and not eval_flip_tta:
            raise ConfigError("task.eval_translate_tta=true needs task.eval_flip_tta=true (its views are mirrored pairs)")
        self.channels_last = bool(channels_last)
        self.tta_level = int(bool(eval_flip_tta)) + int(bool(eval_translate_tta))  # airbench's 0, 1 or 2
        self.tta_configured = self.tta_level > 0
        self.tta_every_epoch = bool(eval_tta_every_epoch)

    def views(self, last: bool) -> Views:
        level = self.tta_level if last or self.tta_every_epoch else 0
        return lambda model, inputs: tta_logits_by_level(model, inputs, level)

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
                           seed=cfg.seed, shard=shard, channels_last=self.channels_last,
                           flip=cfg.dataset.flip, padding_mode=cfg.dataset.padding_mode, drop_last=t.drop_last)

    @staticmethod
    def split(data: ImageData, name: str):
        """val (the held-out split, else test), test, or train."""
        return data.validation if name == "val" else getattr(data, name)

    def eval_loader(self, data: ImageData, cfg: DictConfig, device: torch.device,
                    indices: torch.Tensor | None, split: str = "val") -> BatchLoader:
        """One split's images in order, unaugmented, at the evaluation batch size."""
        return BatchLoader(self.split(data, split), cfg.training.eval_batch_size, device, shuffle=False,
                           indices=indices, channels_last=self.channels_last)

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
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if hasattr(model, "fit_to_data"):  # e.g. FastNet's whitening filters, from training images
            model.fit_to_data(next(iter(BatchLoader(data.train, 5000, device, shuffle=False)))[0])
        return model

    def example(self, data: ImageData) -> ExampleBatch:
        return class_example(tuple(data.train.images.shape[1:]))

    def describe(self, data: ImageData) -> str:
        return f"{len(data.train)} train, {len(data.test)} test images"


class CharLMTask(Task):
    """Next-character prediction over fixed windows of `block_size` characters (training/data/text.py).

    A sample is one training window (its loss: the mean over its tokens); `random_phase` shifts
    the window grid each epoch. Validation scores every character of the validation split once.
    """

    name, metric = "char_lm", Metric("val_loss", higher_is_better=False)

    def __init__(self, block_size: int, random_phase: bool = False, proxy: Any = None):
        super().__init__(proxy)
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"task.block_size={block_size!r} is not allowed: an integer >= 1")
        self.block_size, self.random_phase = block_size, bool(random_phase)

    def check_data(self, data: Any, dataset_name: str) -> None:
        if not isinstance(data, TextData):
            raise ConfigError(f"dataset={dataset_name} is not a text dataset; task=char_lm needs one "
                              "(e.g. dataset=shakespeare_char); for images: task=classification")

    def num_outputs(self, data) -> int:
        return data.vocab_size

    def model_kwargs(self, data) -> dict[str, Any]:
        return {"vocab_size": data.vocab_size}

    def train_loader(self, data, cfg: DictConfig, device: torch.device, shard: tuple[int, int] | None):
        t = cfg.training
        return TrainWindows(data.train, self.block_size, t.batch_size, device, random_phase=self.random_phase,
                            limit_batches=t.limit_train_batches, seed=cfg.seed, shard=shard)

    def eval_loader(self, data, cfg: DictConfig, device: torch.device, indices: torch.Tensor | None):
        return EvalWindows(data.val, self.block_size, cfg.training.eval_batch_size, device, indices=indices)

    def train_size(self, data) -> int:
        return window_count(len(data.train), self.block_size, False)

    def train_sample_loader(self, data, cfg: DictConfig, device: torch.device, indices: torch.Tensor):
        # the fixed grid (phase 0), whatever task.random_phase
        return TrainWindows(data.train, self.block_size, cfg.training.eval_batch_size, device, shuffle=False,
                            indices=indices)

    def eval_size(self, data) -> int:
        return len(eval_window_starts(len(data.val), self.block_size))

    def prepare_model(self, model: nn.Module, data, cfg: DictConfig, device: torch.device) -> nn.Module:
        capacity = getattr(model, "block_size", None)
        if capacity is None:
            raise ConfigError(f"model={type(model).__name__} is not a language model; task=char_lm needs "
                              "model=gpt")
        if self.block_size > capacity:
            raise ConfigError(f"task.block_size={self.block_size} is larger than model.block_size={capacity} "
                              "(the positions the model is built for); raise model.block_size or lower task.block_size")
        return model

    def example(self, data) -> ExampleBatch:
        window = torch.empty(1, self.block_size, dtype=torch.long)
        return example_like(window, window)

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        # bits per character: the loss in nats over ln 2; val_acc is next-character accuracy
        return {"val_loss": mean_loss, "val_acc": accuracy, "val_bpc": mean_loss / math.log(2)}

    def describe(self, data) -> str:
        windows = window_count(len(data.train), self.block_size, self.random_phase)
        return (f"{len(data.train)} train characters ({windows} windows of {self.block_size}), "
                f"{len(data.val)} validation characters, vocabulary {data.vocab_size}")


# --------------------------------------------------------------------------- image test-time augmentation

def tta_logits_by_level(model: nn.Module, inputs: torch.Tensor, level: int) -> list[torch.Tensor]:
    """The logits [B, C] (or [B, T, V]) at every TTA level up to `level`, from one set of forwards
    (airbench's levels: 0 the image alone, 1 with its mirror image, 2 with both shifted too)."""
    def mirrored(x: torch.Tensor) -> list[torch.Tensor]:  # [level 0, level 1]
        logits = model(x).float()
        return [logits, (logits + model(x.flip(3)).float()) / 2] if level >= 1 else [logits]

    levels = mirrored(inputs)
    if level >= 2:
        h, w = inputs.shape[-2:]
        padded = F.pad(inputs, (1, 1, 1, 1), mode="reflect")  # [B, 3, H+2, W+2]
        shifted = (mirrored(padded[..., :h, :w])[1] + mirrored(padded[..., 2:, 2:])[1]) / 2
        levels.append((levels[1] + shifted) / 2)
    return levels


