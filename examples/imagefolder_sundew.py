"""Sundew in a plain PyTorch loop: torchvision's ImageFolder, per-sample PIL transforms, loader
workers, and a gate that decides before anything is loaded.

    pip install . torchvision   # the library needs torch alone; this script reads JPEGs with torchvision
    python examples/imagefolder_sundew.py --data ../shared/data/cifar10 --epochs 1
    python examples/imagefolder_sundew.py --data DATA --gate none          # full training
    python examples/imagefolder_sundew.py --data DATA --select after       # load all, then select

DATA holds train/<class>/*.jpg and test/<class>/*.jpg. The three lines that gate a loop are
marked (1), (2), (3); everything else is an ordinary training script.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from adaptive_sparse import NoGate, RandomGate, SelectingBatchSampler, SundewGate, gated_loss
from adaptive_sparse.models.cnn import SimpleCNN

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder with train/ and test/ image folders")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--gate", choices=("sundew", "random", "none"), default="sundew")
    parser.add_argument("--target-rate", type=float, default=0.5)
    parser.add_argument("--select", choices=("before", "after"), default="before",
                        help="before: the sampler loads only the selected samples; after: load every batch, then select")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=None, help="looks per epoch (a quick run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the per-epoch figures here")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        fail(f"--epochs {args.epochs}: nothing would train; pass 1 or more")
    return args


def fail(message: str) -> NoReturn:
    """A person's mistake: one line on stderr, exit status 1 (no traceback)."""
    raise SystemExit(f"imagefolder_sundew: {message}")


def image_folders(root: str, augment, plain) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """train/ and test/ as ImageFolders with one class list: labels come from the sorted folder
    names, so a class missing from one split would shift every label after it in that split."""
    if not Path(root).is_dir():
        fail(f"--data {root}: no such folder")
    for split in ("train", "test"):
        if not (Path(root) / split).is_dir():
            fail(f"--data {root}: no {split}/ folder (expected train/<class>/*.jpg and test/<class>/*.jpg)")
    try:
        train_set = datasets.ImageFolder(f"{root}/train", transform=augment)
        test_set = datasets.ImageFolder(f"{root}/test", transform=plain)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        fail(f"--data {root}: {err}")
    if test_set.classes != train_set.classes:
        fail(f"--data {root}: train/ and test/ hold different classes (only in train/: "
             f"{sorted(set(train_set.classes) - set(test_set.classes))}, only in test/: "
             f"{sorted(set(test_set.classes) - set(train_set.classes))})")
    return train_set, test_set


class WithIndex(Dataset):
    """Selecting after loading needs each sample's dataset index next to it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], i)


def make_gate(args: argparse.Namespace, num_samples: int):
    kinds = {"sundew": lambda: SundewGate(num_samples, args.target_rate, scoring="memory", seed=args.seed),
             "random": lambda: RandomGate(num_samples, args.target_rate, seed=args.seed),
             "none": lambda: NoGate(num_samples)}
    return kinds[args.gate]()


def forward(model, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward on these samples only: their losses [k] and logits [k, C]."""
    logits = model(images)
    return F.cross_entropy(logits, labels, reduction="none"), logits


def epoch_selecting_before_loading(model, optimizer, loader, sampler) -> int:
    trained = 0
    for images, labels in loader:                          # (2) only the selected were read and transformed
        losses, logits = forward(model, images, labels)
        loss = sampler.update(losses, logits)                # (3) the gate learns; the loss to backpropagate
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += len(labels)
    return trained


def epoch_selecting_after_loading(model, optimizer, loader, gate, limit: int | None) -> int:
    trained = 0
    for b, (images, labels, idx) in enumerate(loader):
        if limit is not None and b >= limit:
            break
        selection = gate.select(idx, None)                   # every sample of the batch was loaded anyway
        keep = selection.index
        if not len(keep):
            continue
        losses, logits = forward(model, images[keep], labels[keep])
        gate.observe(idx[keep], losses, logits)              # the gate learns from the trained samples
        optimizer.zero_grad(set_to_none=True)
        gated_loss(losses, selection).backward()             # the gate's loss weights applied, if any
        optimizer.step()
        trained += len(keep)
    return trained


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    model.train()
    return 100.0 * correct / total


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train_set, test_set = image_folders(args.data, augment, plain)
    model = SimpleCNN(num_classes=len(train_set.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gate = make_gate(args, len(train_set))
    test_loader = DataLoader(test_set, batch_size=500, num_workers=args.workers)

    if args.select == "before":
        sampler = SelectingBatchSampler(gate, args.batch_size, seed=args.seed,   # (1)
                                        limit_batches=args.limit_batches)
        train_loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers)
        run_epoch = lambda: epoch_selecting_before_loading(model, optimizer, train_loader, sampler)
    else:
        train_loader = DataLoader(WithIndex(train_set), batch_size=args.batch_size, shuffle=True,
                                  num_workers=args.workers)
        run_epoch = lambda: epoch_selecting_after_loading(model, optimizer, train_loader, gate, args.limit_batches)

    looked_at = min(len(train_set), (args.limit_batches or len(train_set)) * args.batch_size)  # per epoch
    records = []
    for epoch in range(1, args.epochs + 1):
        if args.select == "after":
            gate.start_epoch(epoch)  # the sampler does this itself
        start = time.perf_counter()
        trained = run_epoch()
        epoch_s = time.perf_counter() - start  # training and loading only: evaluation is timed apart
        start = time.perf_counter()
        accuracy = evaluate(model, test_loader)
        records.append({"epoch": epoch, "gate": args.gate, "select": args.select, "epoch_time_s": epoch_s,
                        "eval_time_s": time.perf_counter() - start, "samples_trained": trained,
                        "activation_rate": trained / looked_at, "val_acc": accuracy})
        print(f"epoch {epoch}: {epoch_s:.1f} s, trained {trained} of {looked_at} samples "
              f"({trained / looked_at:.3f}), test accuracy {accuracy:.2f}%", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    return records


if __name__ == "__main__":
    main()
