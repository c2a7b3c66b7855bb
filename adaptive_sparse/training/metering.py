"""Measuring what a run costs: FLOPs counted by torch's flop counter (causal attention as its
kernel executes it), and wall-clock per phase."""
from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from adaptive_sparse.attention import auxiliary_loss
from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.training.records import epochs_trained

# n -> (inputs, targets) of a batch of n samples on the meta device: shapes and dtypes only
ExampleBatch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def example_like(inputs: torch.Tensor, targets: torch.Tensor) -> ExampleBatch:
    """Meta-device batches shaped like one sample of (inputs, targets): float images with class
    labels, token windows with next-token targets, anything a model and the loss take."""
    def example(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(n, *inputs.shape[1:], dtype=inputs.dtype, device="meta"),
                torch.zeros(n, *targets.shape[1:], dtype=torch.long, device="meta"))
    return example


def class_example(sample_shape: tuple[int, ...]) -> ExampleBatch:
    """Batches of float inputs of `sample_shape` (an image's [3, H, W]) with one class label each."""
    return example_like(torch.empty(1, *sample_shape), torch.empty(1, dtype=torch.long))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Causal attention as executed. torch's counter charges scaled_dot_product_attention the full
# query x key square, causal or not; the CPU flash kernel (aten/src/ATen/native/cpu/
# FlashAttentionKernel.cpp, torch 2.14.1) runs tiles of 256, 64 or 32 query rows (for at least
# 768, at least 192, fewer queries) against chunks of 512 keys and, under is_causal=True, stops
# after the chunk that holds a tile's last query, computing that chunk whole (tests/training/
# test_flops.py checks this on the kernel). The count follows this kernel, not T(T+1)/2 pairs,
# because the project's runs execute on CPU, where it runs all of the square at 512 tokens or
# fewer and 75% of it at 1,024 (T(T+1)/2 would count half of what runs at 512, two thirds at
# 1,024); CUDA's flash kernels, with tiles of 64-128, run less, nearer T(T+1)/2. Calls with a mask, or
# with neither mask nor causal flag, compute every key they are given, as torch counts them.
KEY_CHUNK = 512


def query_tile(num_queries: int) -> int:
    """Query rows per tile of the CPU flash kernel (its thresholds on the query length)."""
    return 256 if num_queries >= 768 else 64 if num_queries >= 192 else 32


def causal_pairs(num_queries: int, num_keys: int) -> int:
    """Query-key pairs the CPU flash kernel computes for one head under is_causal=True: each tile's
    rows against every key of the 512-key chunks up to the one holding its last row's diagonal."""
    tile, chunk = min(query_tile(num_queries), num_queries), min(KEY_CHUNK, num_keys)
    pairs = 0
    for start in range(0, num_queries, tile):
        rows = min(tile, num_queries - start)
        chunks = -(-min(start + rows, num_keys) // chunk)
        pairs += rows * min(chunks * chunk, num_keys)
    return pairs


def attended_pairs(query: torch.Size, key: torch.Size, is_causal: bool) -> int:
    """Query-key pairs computed over all batch rows and heads of q [..., L, E] and k [..., S, E]."""
    *rows, num_queries, _ = query
    per_head = causal_pairs(num_queries, key[-2]) if is_causal else num_queries * key[-2]
    return math.prod(rows) * per_head


def flash_cpu_flops(query: torch.Size, key: torch.Size, value: torch.Size, dropout_p: float = 0.0,
                    is_causal: bool = False, *args, out_shape=None, **kwargs) -> int:
    """Forward: the scores QK^T and the output PV, on the pairs computed."""
    return 2 * attended_pairs(query, key, is_causal) * (query[-1] + value[-1])


def flash_cpu_backward_flops(grad_out: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size,
                             out: torch.Size, logsumexp: torch.Size, dropout_p: float = 0.0,
                             is_causal: bool = False, *args, out_shape=None, **kwargs) -> int:
    """Backward: dP = dO V^T, dV = P^T dO, dQ = dS K and dK = dS^T Q, on the pairs computed: the
    four products the math path's backward has (what every other attention call is counted at),
    so the scores the fused kernel recomputes first are left out here as everywhere."""
    return 4 * attended_pairs(query, key, is_causal) * (query[-1] + value[-1])


ATTENTION_AS_EXECUTED = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flash_cpu_flops,
                         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: flash_cpu_backward_flops}


def flash_when_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention, a causal call on the meta device going to the CPU flash
    kernel's op (it has meta kernels and a backward), whose formulas see is_causal."""
    if query.is_meta and is_causal and attn_mask is None and dropout_p == 0.0 and not enable_gqa:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                         scale=scale)[0]
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


class CausalAttentionAsFlash(TorchFunctionMode):
    """On the meta device scaled_dot_product_attention always decomposes into the math path's
    matmuls (a fused kernel is chosen on real devices only), whose count cannot see the causal
    flag; this mode sends causal calls to the flash op instead (`flash_when_causal`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return flash_when_causal(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def flops_as_executed() -> Iterator[FlopCounterMode]:
    """torch's FlopCounterMode, with causal attention on the meta device counted as the CPU flash
    kernel executes it (every other count is torch's own)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_AS_EXECUTED) as counter, CausalAttentionAsFlash():
        yield counter


class FlopMeter:
    """Per-sample FLOPs of a scoring forward and of a training forward+backward.

    Counted once with `torch.utils.flop_counter.FlopCounterMode` on a copy of the model on
    the meta device (shapes only, no arithmetic, no effect on the real model or timings),
    causal attention as the CPU flash kernel executes it (`flops_as_executed`).
    `example` makes the batches (the task's: images and labels, or token windows and their
    next tokens). Counts are taken at batch sizes 1 and 2 and must scale linearly, which holds
    for models that treat samples independently; a run's FLOPs are then per-sample counts
    times the samples scored and trained. The optimiser update is not counted (it is per
    parameter, not per sample, and the same for every gate).
    """

    def __init__(self, model: nn.Module, example: ExampleBatch):
        self.example = example
        self.state = self.model_state(model)
        meta_model = copy.deepcopy(model).to("meta")
        for module in meta_model.modules():  # a copy keeps the model's hooks: a count must not fire them
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        self.forward_per_sample = self._per_sample(meta_model, backward=False)
        self.train_per_sample = self._per_sample(meta_model, backward=True)

    @staticmethod
    def model_state(model: nn.Module) -> tuple:
        """What changes a step's FLOPs between epochs: which parameters train (frozen ones need
        no weight gradient) and which sparse attention layers run dense (their warm-up)."""
        return (tuple(p.requires_grad for p in model.parameters()),
                tuple(getattr(m, "dense_warmup", None) for m in model.modules()))

    def recount_if_changed(self, model: nn.Module) -> "FlopMeter":
        """This meter, or a new count if the model now runs differently (sparse attention's dense
        warm-up epochs and the sparse epochs after them each cost what they run)."""
        if self.model_state(model) == self.state:
            return self
        return FlopMeter(model, self.example)

    @staticmethod
    def count(model: nn.Module, batch: int, example: ExampleBatch, backward: bool) -> int:
        inputs, targets = example(batch)
        model.train(backward)
        with flops_as_executed() as counter:
            if backward:  # the training loss, with a sparse attention's indexer loss when there is one
                loss = BatchScores.from_logits(model(inputs), targets).loss.mean()
                aux = auxiliary_loss(model)
                (loss if aux is None else loss + aux.weighted).backward()
            else:
                with torch.no_grad():
                    model(inputs)
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def _per_sample(self, model: nn.Module, backward: bool) -> int:
        one = self.count(model, 1, self.example, backward)
        two = self.count(model, 2, self.example, backward)
        if two != 2 * one:
            raise RuntimeError(f"FLOPs are not linear in batch size ({one} for 1, {two} for 2)")
        return one


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase; synchronises CUDA before each reading."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.open: dict[str, float] = {}  # phases running now: their start times

    def elapsed(self) -> dict[str, float]:
        """Seconds per phase so far, the running ones' time included: what a checkpoint taken
        inside the epoch must keep (the epoch phase is still open then)."""
        now = self.now() if self.open else 0.0
        return {name: self.seconds.get(name, 0.0) + (now - self.open[name] if name in self.open else 0.0)
                for name in {*self.seconds, *self.open}}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        self.open[name] = start
        try:
            yield
        finally:
            del self.open[name]
            self.seconds[name] += self.now() - start

    def record(self) -> dict[str, float]:
        """The epoch record's times: training (its phases) and evaluation, apart."""
        epoch = self.seconds["epoch"]
        return {"epoch_time_s": epoch, "data_time_s": self.seconds["data"],
                "scoring_time_s": self.seconds["scoring"], "select_time_s": self.seconds["select"],
                "train_step_time_s": self.seconds["train_step"], "eval_time_s": self.seconds["eval"]}

    def timed(self, iterable, name: str):
        """Yield from `iterable`, charging the time spent producing each item to `name`."""
        iterator = iter(iterable)
        while True:
            with self.phase(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item


class Tally:
    """Counts for one epoch: samples seen, scored and trained, the trained samples' loss, the
    optimiser steps, and the FLOPs spent on scoring (a scoring forward per scored sample, and
    a proxy scorer's own training)."""

    def __init__(self):
        self.seen = self.scored = self.trained = self.optimizer_steps = 0
        self.loss_sum = self.scoring_flops = 0.0
        self.last_batch_loss: float | None = None

    def add_batch(self, seen: int, scored: int = 0, scoring_flops: float = 0.0) -> None:
        """A loader batch: `seen` samples, `scored` of them by a scoring forward."""
        self.seen += seen
        self.scored += scored
        self.scoring_flops += scoring_flops

    def add_step(self, trained_losses: torch.Tensor, scoring_flops: float = 0.0) -> None:
        """A training step on these samples' losses (none on this rank: still a step)."""
        self.optimizer_steps += 1
        self.scoring_flops += scoring_flops
        if len(trained_losses):
            batch_sum = float(trained_losses.sum())
            self.trained += len(trained_losses)
            self.loss_sum += batch_sum
            self.last_batch_loss = batch_sum / len(trained_losses)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)

    def flops(self, meter: FlopMeter) -> dict[str, float]:
        """FLOPs executed (scoring + training) against a full step on every sample seen."""
        training = self.trained * meter.train_per_sample
        full = self.seen * meter.train_per_sample
        executed = self.scoring_flops + training
        return {"flops_scoring": self.scoring_flops, "flops_training": training,
                "flops_executed": executed, "flops_full": full,
                "compute_savings": 1.0 - executed / full if full else 0.0}

    def record(self, meter: FlopMeter) -> dict[str, float]:
        """The epoch record's counts: the trained samples' mean loss, the activation rate, FLOPs,
        sample savings, samples and optimiser steps."""
        return {"train_loss": self.loss_sum / max(self.trained, 1),  # of the trained samples only
                "activation_rate": self.trained / self.seen, **self.flops(meter),
                "sample_savings": 1.0 - self.trained / self.seen, "samples_seen": self.seen,
                "samples_trained": self.trained, "optimizer_steps": self.optimizer_steps}


class EpochState:
    """What exists only inside an epoch: its phase timer, its counts, the sparse-attention indexer's
    losses and, under torchrun, the gate's memory at its start (merged across ranks at its end).
    A stop inside the epoch checkpoints it (with the packer's waiting samples) and a resume puts it back."""

    def __init__(self, device: torch.device, memory_at_start: dict[str, torch.Tensor] | None):
        self.device = device
        self.timer, self.tally = PhaseTimer(device), Tally()
        self.indexer_losses: list[torch.Tensor] = []
        self.memory_at_start = memory_at_start

    def state_dict(self, packer) -> dict:
        return {"seconds": self.timer.elapsed(), "tally": self.tally.state_dict(),
                "indexer_losses": [loss.detach().cpu() for loss in self.indexer_losses],
                "packer": packer.state_dict(), "memory_at_start": self.memory_at_start}

    def load_state_dict(self, state: dict, packer) -> None:
        self.timer.seconds.update(state["seconds"])
        self.tally.load_state_dict(state["tally"])
        self.indexer_losses.extend(loss.to(self.device) for loss in state["indexer_losses"])
        packer.load_state_dict(state["packer"], self.device)
        snapshot = state["memory_at_start"]
        self.memory_at_start = None if snapshot is None else {k: v.to(self.device) for k, v in snapshot.items()}

    def indexer_loss(self) -> float | None:
        return torch.stack(self.indexer_losses).mean().item() if self.indexer_losses else None

    def record(self, epoch: int, meter: FlopMeter, validation: dict, gate, energy_kwh: float | None,
               lr: float) -> dict:
        """The epoch's line of metrics.jsonl: counts and FLOPs, validation, the gate's figures, time
        by phase (evaluation apart), throughput, energy so far and the learning rate."""
        return {"epoch": epoch, **self.tally.record(meter), **validation, "threshold": gate.threshold,
                **self.timer.record(), "samples_per_s": self.tally.seen / self.timer.seconds["epoch"],
                "energy_kwh": energy_kwh, "lr": lr, "indexer_loss": self.indexer_loss(), **gate.epoch_metrics()}


def summarise_run(history: list[dict], target_rate: float, flop_meter: FlopMeter) -> dict:
    """Whole-run figures for summary.json, summed over epochs from the per-epoch records."""
    seen = sum(r["samples_seen"] for r in history)
    trained = sum(r["samples_trained"] for r in history)
    flops = {k: sum(r[k] for r in history) for k in ("flops_scoring", "flops_training",
                                                      "flops_executed", "flops_full")}
    last = history[-1]
    return {
        "val_acc": last["val_acc"],
        "val_loss": last["val_loss"],
        "activation_rate": trained / seen,
        "target_rate": target_rate,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "epoch_times_s": [r["epoch_time_s"] for r in history],
        "eval_time_s": sum(r["eval_time_s"] for r in history),
        **flops,
        "compute_savings": 1.0 - flops["flops_executed"] / flops["flops_full"],
        "sample_savings": 1.0 - trained / seen,
        "epochs": len(history),
        "epochs_trained": epochs_trained(history),  # training.last_epoch_fraction counted
        "samples_seen": seen,
        "samples_trained": trained,
        "flops_per_sample_forward": flop_meter.forward_per_sample,
        "flops_per_sample_train": flop_meter.train_per_sample,
        "flops_counted_as": "executed",  # causal attention at what its kernel runs (records without: the full square)
    }

