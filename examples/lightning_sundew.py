"""The selecting sampler in a Lightning Trainer, on a made-up task.

    pip install .[lightning]
    python examples/lightning_sundew.py --epochs 3
    python examples/lightning_sundew.py --epochs 3 --devices 2 --strategy ddp   # 2 CPU processes (gloo)

A made-up task (noisy linear classes, 2,048 samples of 32 features) trained at half the budget:
the sundew gate picks, before loading, which samples each epoch trains, through
`SelectingSamplerCallback`; `training_step` hands its per-sample losses back with `gated`. Prints
each epoch's activation rate (trained / looked at, summed over the processes) and the test
accuracy; `--json` writes the per-epoch records, `--checkpoint-dir` saves a checkpoint at each
epoch's end and `--resume` continues from one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from adaptive_sparse import SundewGate
from adaptive_sparse.integrations.lightning import SelectingSamplerCallback, gated


def make_data(n: int, features: int = 32, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs [n, features] labelled by a random linear map, 10% of labels flipped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = torch.randint(0, classes, (int(noisy.sum()),), generator=g)
    return x, y


class Classifier(pl.LightningModule):
    """A two-layer MLP whose training data the selecting sampler serves."""

    def __init__(self, train_set: TensorDataset, lr: float = 3e-3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        self.train_set, self.lr = train_set, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        return gated(self, F.cross_entropy(logits, y, reduction="none"), logits)   # the gate learns; weights applied

    def train_dataloader(self):
        return SelectingSamplerCallback.of(self.trainer).loader(self.train_set)   # only what the gate picked

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_trainer(args: argparse.Namespace, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A quiet CPU trainer; under DDP the sampler shards itself, so no DistributedSampler."""
    if args.checkpoint_dir:
        callbacks = callbacks + [pl.callbacks.ModelCheckpoint(args.checkpoint_dir, filename="{epoch}", save_top_k=-1)]
    return pl.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_epochs=args.epochs,
                      callbacks=callbacks, use_distributed_sampler=False, logger=False,
                      enable_checkpointing=bool(args.checkpoint_dir), enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn...")
    parser.add_argument("--target-rate", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="write the per-epoch records here")
    parser.add_argument("--checkpoint-dir", type=Path, help="save a checkpoint at each epoch's end here")
    parser.add_argument("--resume", type=Path, help="a checkpoint to continue from")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.exit(2, f"lightning_sundew: --epochs {args.epochs}: nothing would train; pass 1 or more\n")
    return args


def main(argv: list[str] | None = None, callbacks: tuple[pl.Callback, ...] = ()) -> list[dict]:
    """Train; returns (and prints, on the first process) each epoch's record. `callbacks` join the
    trainer's (a test records what each epoch trained)."""
    args = parse(argv)
    pl.seed_everything(0, verbose=False)
    x_all, y_all = make_data(args.samples + 1024)
    (x, x_test), (y, y_test) = x_all.split([args.samples, 1024]), y_all.split([args.samples, 1024])
    gate = SundewGate(len(y), args.target_rate, scoring="memory", seed=0)
    selecting = SelectingSamplerCallback(gate, batch_size=args.batch_size, seed=0)
    model = Classifier(TensorDataset(x, y))
    trainer = make_trainer(args, [selecting, *callbacks])
    trainer.fit(model, ckpt_path=args.resume)
    if trainer.is_global_zero:
        with torch.no_grad():
            accuracy = 100.0 * (model.net(x_test).argmax(1) == y_test).float().mean().item()
        for record in selecting.epochs:
            print(f"epoch {record['epoch']}: trained {record['samples_trained']} of {record['samples_seen']} samples "
                  f"(activation rate {record['activation_rate']:.3f}) on {trainer.world_size} process(es)")
        print(f"test accuracy {accuracy:.1f}%")
        if args.json:
            args.json.write_text(json.dumps(selecting.epochs, indent=1))
    return selecting.epochs


if __name__ == "__main__":
    main()
