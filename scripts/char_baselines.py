"""What a character-level model must beat: the cross-entropy on tiny-shakespeare's validation
split of counting models fitted to its training split (the project's own split and encoding).

    python scripts/char_baselines.py --root ../shared/data/shakespeare_char --json docs/results/long-context/ngram_baselines.json

unigram: p(c); bigram: p(c | previous character), both with add-alpha smoothing (alpha 0.1 over
the vocabulary: the figures move by under 0.01 nats between 0.01 and 1). A GPT whose validation
loss sits at the bigram figure has learnt nothing its attention could add: only the
current character reaches the prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from adaptive_sparse.training.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def ngram_cross_entropy(train: torch.Tensor, val: torch.Tensor, vocab: int, order: int, alpha: float) -> float:
    """Mean -log p of each validation character (after the first order - 1) under counts from train."""
    if order == 1:
        counts = torch.bincount(train, minlength=vocab).double() + alpha
        return -(counts / counts.sum()).log()[val].mean().item()
    pairs = torch.zeros(vocab, vocab, dtype=torch.float64)  # [previous, next]
    pairs.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64), accumulate=True)
    pairs += alpha
    log_p = (pairs / pairs.sum(1, keepdim=True)).log()
    return -log_p[val[:-1], val[1:]].mean().item()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset.root: the folder or file of input.txt")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "dataset" / "shakespeare_char.yaml"), {"root": args.root})
    data = load_dataset(cfg)
    train, val = data.train.tokens.long(), data.val.tokens.long()
    figures = {"unigram_nats": ngram_cross_entropy(train, val, data.vocab_size, 1, args.alpha),
               "bigram_nats": ngram_cross_entropy(train, val, data.vocab_size, 2, args.alpha),
               "alpha": args.alpha, "train_characters": len(train), "val_characters": len(val),
               "data_source": data.source.rsplit("/", 1)[-1], "command": "python scripts/char_baselines.py " + " ".join(argv)}
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
