"""Character-level text (tiny-shakespeare), held as one integer tensor, served as fixed windows.

The corpus is read once, its vocabulary is the sorted set of its characters, and the first
`train_fraction` of the characters train, the rest validate (nanoGPT's shakespeare_char
split). The encoded corpus is cached outside the dataset folder, keyed by the file's bytes.

A training sample is a fixed window: sample i holds characters [i*T, i*T + T + 1) of the
training split (T = the window length, `task.block_size`), predicting characters 1..T from
0..T-1. Its dataset index is stable across epochs, which gates with per-sample memory need
(nanoGPT draws random offsets, so its samples have no identity). `random_phase` shifts the
whole grid by one random offset in [0, T) per epoch: the same window count and indices,
other character boundaries. Validation covers every character once (`EvalWindows`).
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from adaptive_sparse.training.io import atomic_torch_save
from adaptive_sparse.training.data.loaders import DatasetError, IndexedBatches, find_root

IGNORE_INDEX = -100  # a target not to score (cross_entropy's default ignore_index)


@dataclass
class TokenSplit:
    tokens: torch.Tensor  # [N] int64 character ids
    fingerprint: dict[str, Any] | None = None  # on the training split: its corpus's (IndexedBatches.fingerprint)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class TextData:
    train: TokenSplit
    val: TokenSplit
    vocab: tuple[str, ...]  # vocab[i] is the character of id i
    source: str  # where the text came from, recorded in summary.json

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


# --------------------------------------------------------------------------- loading

def corpus_file(cfg: DictConfig) -> Path:
    """The corpus file: `dataset.root` (a folder holding `file_name`, or the file itself), else
    the first existing entry of `dataset.search_roots`, else downloaded into the first of them."""
    root = find_root(cfg)
    if root is not None and cfg.get("root"):
        path = root if root.is_file() else root / cfg.file_name
        if not path.is_file():
            raise DatasetError(f"dataset.root={cfg.root}: no {cfg.file_name} there (expected the "
                               f"corpus file or a folder holding it)")
        return path
    if root is not None and (root / cfg.file_name).is_file():
        return root / cfg.file_name
    target = Path(os.path.expanduser(str(cfg.search_roots[0]))).resolve() / cfg.file_name
    if not cfg.download:
        raise DatasetError(f"dataset.root: no {cfg.file_name} found (tried {list(cfg.search_roots)}) and "
                           "dataset.download=false; set dataset.root=PATH")
    return download(cfg.url, target)


def download(url: str, target: Path) -> Path:
    """Fetch `url` into `target` (complete or not at all: no folder or partial file is left)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except Exception as err:  # no network, HTTP error
        raise DatasetError(f"could not download {url} ({err}); without network, set dataset.root to a "
                           "folder holding input.txt") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(body)
    partial.replace(target)
    return target


def load_shakespeare_char(cfg: DictConfig) -> TextData:
    """`dataset=shakespeare_char`: the encoded corpus, split, from the cache when it is fresh."""
    path = corpus_file(cfg)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    cache_file = Path(os.path.expanduser(str(cfg.cache_dir))) / f"char-corpus-{digest[:16]}.pt"
    blob = None
    if cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
        except Exception:  # a truncated cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    if blob is None:
        blob = encode_characters(raw, path)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(blob, cache_file)
    tokens, vocab = blob["tokens"], tuple(blob["vocab"])
    cut = int(len(tokens) * float(cfg.train_fraction))
    if not 0 < cut < len(tokens):
        raise DatasetError(f"dataset.train_fraction={cfg.train_fraction} leaves an empty split")
    fingerprint = {"source": f"file:{path}", "sha256": digest, "characters": len(tokens), "vocabulary": len(vocab)}
    return TextData(TokenSplit(tokens[:cut], fingerprint), TokenSplit(tokens[cut:]), vocab, f"file:{path}")


def encode_characters(raw: bytes, path: Path) -> dict:
    """{'tokens': [N] int64 ids, 'vocab': sorted characters} of a UTF-8 text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err})") from err
    if len(text) < 2:
        raise DatasetError(f"{path} holds {len(text)} characters: nothing to train on")
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    return {"tokens": torch.tensor([lookup[ch] for ch in text], dtype=torch.long), "vocab": vocab}


# --------------------------------------------------------------------------- batching

def window_count(num_tokens: int, block_size: int, random_phase: bool) -> int:
    """Training windows of T + 1 characters at stride T; with a random phase the grid may start
    up to T - 1 characters in, so one window fewer fits (the count must not change per epoch)."""
    usable = num_tokens - 1 - (block_size - 1 if random_phase else 0)
    return max(0, usable // block_size)


class TrainWindows(IndexedBatches):
    """(inputs [B, T], targets [B, T], dataset indices [B]) of the fixed training windows."""

    def __init__(self, split: TokenSplit, block_size: int, batch_size: int, device: torch.device, *,
                 shuffle: bool = True, random_phase: bool = False, limit_batches: int | None = None,
                 seed: int = 0, shard: tuple[int, int] | None = None, indices: torch.Tensor | None = None):
        count = window_count(len(split), block_size, random_phase)
        if count < 1:
            raise DatasetError(f"the training split ({len(split)} characters) is shorter than one window of "
                               f"task.block_size + 1 = {block_size + 1}")
        super().__init__(count, batch_size, device, shuffle=shuffle, limit_batches=limit_batches,
                         seed=seed, shard=shard, indices=indices)
        self.tokens = split.tokens.to(device)
        self.fingerprint = split.fingerprint
        self.block_size, self.random_phase = int(block_size), bool(random_phase)
        self.offsets = torch.arange(block_size + 1, device=device)  # [T+1]
        self.phase = 0

    def epoch_draws(self) -> None:
        if self.random_phase:  # drawn before the permutation, from the same generator
            self.phase = int(torch.randint(self.block_size, (1,), generator=self.generator))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "phase": self.phase}  # an interrupted epoch keeps its phase

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.phase = int(state.get("phase", 0))

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.phase + idx * self.block_size  # [B]
        windows = self.tokens[starts[:, None] + self.offsets]  # [B, T+1]
        return windows[:, :-1], windows[:, 1:]


def eval_window_starts(num_tokens: int, block_size: int) -> list[int]:
    """Where the validation windows start: at stride T, then one window ending at the split's end
    when T does not divide N - 1 (its first targets were scored by the window before)."""
    full, tail = divmod(num_tokens - 1, block_size)
    return [i * block_size for i in range(full)] + ([num_tokens - 1 - block_size] if tail else [])


class EvalWindows(IndexedBatches):
    """Every character of a split after the first, scored exactly once: windows at stride T,
    and when T does not divide N - 1, one last window ending at the split's end whose already
    scored targets are IGNORE_INDEX. `indices` selects windows (a torchrun rank's share)."""

    def __init__(self, split: TokenSplit, block_size: int, batch_size: int, device: torch.device, *,
                 indices: torch.Tensor | None = None):
        n, t = len(split), int(block_size)
        if n < t + 1:
            raise DatasetError(f"the validation split ({n} characters) is shorter than one window of "
                               f"task.block_size + 1 = {t + 1}")
        starts = eval_window_starts(n, t)
        tail = (n - 1) % t
        super().__init__(len(starts), batch_size, device, shuffle=False, indices=indices)
        self.tokens = split.tokens.to(device)
        self.starts = torch.tensor(starts, device=device)  # [W]
        self.scored_from = torch.zeros(len(starts), dtype=torch.long, device=device)  # [W]
        if tail:
            self.scored_from[-1] = t - tail  # the tail window's first t - tail targets are scored already
        self.offsets = torch.arange(t + 1, device=device)

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.tokens[self.starts[idx, None] + self.offsets]  # [B, T+1]
        targets = windows[:, 1:].clone()
        seen = self.offsets[:-1].view(1, -1) < self.scored_from[idx, None]  # [B, T]
        return windows[:, :-1], targets.masked_fill(seen, IGNORE_INDEX)
