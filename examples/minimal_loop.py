"""The gate library in a plain PyTorch loop, with nothing but torch installed.

    pip install .                       # the library: torch and numpy
    python examples/minimal_loop.py     # ~10 s on a laptop CPU

A made-up task (noisy linear classes, 4,096 samples of 32 features) trained three ways at half
the budget: the gate picks after loading (`gate.select`, then `gated_loss`), the sampler loads
only what the gate picks (`SelectingBatchSampler`, then `sampler.update`), and full training.
Each prints its test accuracy and how many samples it trained.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_sparse import NoGate, SelectingBatchSampler, SundewGate, gated_loss


def make_data(n: int, features: int = 32, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs [n, features] labelled by a random linear map, 10% of labels flipped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = torch.randint(classes, (int(noisy.sum()),), generator=g)
    return x, y


def train_selecting_after_loading(model, optimizer, x, y, gate, batch_size: int, epoch: int) -> int:
    """Every batch is loaded; the gate picks which of it trains."""
    gate.start_epoch(epoch)
    trained = 0
    for idx in torch.randperm(len(y)).split(batch_size):      # idx: the batch's dataset indices [B]
        selection = gate.select(idx, None)
        chosen = idx[selection.index]
        if not len(chosen):
            continue
        logits = model(x[chosen])
        losses = F.cross_entropy(logits, y[chosen], reduction="none")
        optimizer.zero_grad(set_to_none=True)
        gated_loss(losses, selection).backward()               # the gate's weights applied, if it has any
        optimizer.step()
        gate.observe(chosen, losses, logits)                   # what the gate learns for the next epochs
        trained += len(chosen)
    return trained


def train_selecting_before_loading(model, optimizer, loader) -> int:
    """The sampler yields only what the gate picked: skipped samples are never loaded."""
    trained = 0
    for inputs, labels in loader:
        logits = model(inputs)
        loss = loader.batch_sampler.update(F.cross_entropy(logits, labels, reduction="none"), logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += len(labels)
    return trained


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--target-rate", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    x_all, y_all = make_data(5120)
    (x, x_test), (y, y_test) = x_all.split([4096, 1024]), y_all.split([4096, 1024])
    n = len(y)
    results = {}
    for name in ("sundew, after loading", "sundew, before loading", "full training"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        gate = NoGate(n) if name == "full training" else SundewGate(n, args.target_rate, scoring="memory")
        loader = DataLoader(TensorDataset(x, y), batch_sampler=SelectingBatchSampler(gate, args.batch_size))
        trained = 0
        for epoch in range(1, args.epochs + 1):
            trained += (train_selecting_before_loading(model, optimizer, loader) if "before" in name else
                        train_selecting_after_loading(model, optimizer, x, y, gate, args.batch_size, epoch))
        results[name] = {"test_acc": accuracy(model, x_test, y_test), "samples_trained": trained,
                         "activation_rate": trained / (n * args.epochs)}
        print(f"{name:24s} test accuracy {results[name]['test_acc']:.1f}%, trained {trained} samples "
              f"(activation rate {results[name]['activation_rate']:.2f})")
    return results


if __name__ == "__main__":
    main()
