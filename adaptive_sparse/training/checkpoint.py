"""Training checkpoints, written atomically (training/io.py) and loaded without running pickled code."""
from __future__ import annotations

import logging
import os
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_sparse.training.io import atomic_torch_save
from adaptive_sparse.training.records import PLACEMENT_KEYS

# --------------------------------------------------------------------------- training checkpoints
#
# RUN_DIR/checkpoints/last.pt holds everything a run needs to continue exactly where it was:
# model, optimiser, scheduler, epoch, global step, the per-epoch records so far, the W&B run
# id, and per rank the gate (generator, controller, per-sample memory, score normaliser), the
# training loader's generator and every RNG (python, numpy, torch CPU, CUDA), and the training
# data's fingerprint (data/loaders.py), so a resume on other data is refused. Only tensors,
# numbers, strings and containers go in, so it loads with `torch.load(weights_only=True)`:
# no pickled code ever runs on load.

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = {"format", "epoch", "step", "world_size", "model", "optimizer", "scheduler",
                 "history", "wandb_run_id", "ranks"}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, unsafe or from another setup; names the file."""


@dataclass
class ResumePoint:
    """Where the loop starts: after `epoch` (0 for a fresh run) and global `step`; `progress`,
    when a stop signal saved the run inside epoch `epoch` + 1, is this rank's part of it done
    (`EpochState.state_dict`)."""
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    wandb_run_id: str | None = None
    progress: dict | None = None


def locate_checkpoint(run_dir: Path, resume: bool | str) -> tuple[Path, bool]:
    """RUN_DIR/checkpoints/last.pt and whether to continue from it, checked against `resume`
    before any data loads: resume=true needs the file, a fresh run (false) must not overwrite
    another run's checkpoint, and resume=auto continues if there is one and starts afresh
    if not (what a queue of long runs re-launched after an interruption wants)."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if resume == "auto":
        return path, path.is_file()
    if resume and not path.is_file():
        raise CheckpointError(f"resume=true but there is no checkpoint {path}; pass the run's "
                              "hydra.run.dir, or drop resume=true to start afresh")
    if not resume and path.exists():
        raise CheckpointError(f"{path} exists: pass resume=true to continue that run, or choose "
                              "another hydra.run.dir (nothing was overwritten)")
    return path, bool(resume)


def load_checkpoint(path: str | os.PathLike, name: str | None = None) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only); a file that is not
    one of this project's checkpoints becomes a CheckpointError saying what it is instead (`name`:
    how the message calls the file, its path unless given)."""
    path = Path(path)
    name = name or str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {name}: {err.strerror or err}") from None
    except Exception as err:  # not a zip, truncated, a disallowed global (code) in the pickle
        raise CheckpointError(f"{name} is not a checkpoint written by this project: {_what_it_is(path, err)}") from None
    lacking = _not_a_training_state(state)
    if lacking:
        raise CheckpointError(f"{name} is not a checkpoint written by this project: {lacking}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{name} has format {state['format']}, expected {CHECKPOINT_FORMAT}")
    return state


# What a file that torch cannot load is, by its first bytes (torch.save writes a zip archive).
FILE_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"\x1f\x8b": "gzip data",
                   b"%PDF": "a PDF document", b"\x80": "a bare pickle, not torch.save's zip archive"}


def _what_it_is(path: Path, err: Exception) -> str:
    """The file's kind in a person's words; never torch's advice to load it unsafely."""
    with path.open("rb") as handle:
        head = handle.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "a zip archive cut short or damaged (an interrupted copy or save?)"
    kind = next((kind for signature, kind in FILE_SIGNATURES.items() if head.startswith(signature)), None)
    if kind:
        return f"it is {kind}"
    if not zipfile.is_zipfile(path):
        return f"it is not a zip archive, as torch.save writes (it begins {head[:4]!r})"
    code = re.search(r"GLOBAL (\S+)", str(err))  # the pickle names code to run on load
    if code:
        return f"its pickle calls code ({code.group(1)}), which no checkpoint of this project holds; nothing was run"
    lines = [line.strip() for line in str(err).splitlines()
             if line.strip() and "weights_only" not in line and "trusted source" not in line]
    return f"{type(err).__name__}: {' '.join(lines)[:300]}"


def _not_a_training_state(state: Any) -> str | None:
    """Why a loaded object is not a training checkpoint (None if it is one)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a run's training state"
    missing = sorted(REQUIRED_KEYS - state.keys())
    if not missing:
        return None
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return "it holds tensors alone (a model's state_dict?), not a run's checkpoints/last.pt"
    return f"it lacks {missing}"


def capture_rng() -> dict:
    """Every RNG stream a run draws from, as tensors and numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores one run's training state. Under torchrun every rank calls `save`
    (the per-rank states are gathered to rank 0) and rank 0 alone writes the file."""

    def __init__(self, path: Path, dist, *, model: torch.nn.Module, optimisation, gate, train_loader,
                 every_epochs: int = 1, keep_epochs=(), config=None, packer=None):
        self.path, self.dist, self.every_epochs = Path(path), dist, every_epochs
        self.keep_epochs = {keep_epochs} if isinstance(keep_epochs, int) else set(keep_epochs)
        self.model, self.optimizer = model, optimisation.optimizer
        self.scheduler, self.scaler, self.lookahead = optimisation.scheduler, optimisation.scaler, optimisation.lookahead
        self.gate, self.train_loader = gate, train_loader
        self.data = train_loader.fingerprint  # what is trained on (data/loaders.py), checked on resume
        self.packer = packer  # training.pack_remainder=carry: samples waiting across an epoch's end
        self.config = flat_config(config) if config is not None else None

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Every `every_epochs` epochs and after the last one (0 turns these off), and after each
        of `keep_epochs`."""
        return (self.every_epochs > 0 and (epoch % self.every_epochs == 0 or epoch == last_epoch)
                or epoch in self.keep_epochs)

    def kept_path(self, epoch: int) -> Path:
        return self.path.with_name(f"epoch_{epoch}.pt")

    def save(self, epoch: int, step: int, history: list[dict], wandb_run_id: str | None,
             progress: dict | None = None) -> None:
        """After `epoch` complete epochs; `progress` (EpochState.state_dict) when stopped inside the next."""
        rank_state = {"gate": self.gate.state_dict(), "train_loader": self.train_loader.state_dict(),
                      "rng": capture_rng(), "progress": progress,
                      "packer": self.packer.state_dict() if self.packer is not None else None}
        ranks = self.dist.gather(rank_state)  # a collective: every rank takes part
        if not self.dist.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step,
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": list(history), "wandb_run_id": wandb_run_id, "ranks": ranks,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.config, "data": self.data,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
        }, self.path)
        if epoch in self.keep_epochs:
            # a hard link to this epoch's file: the next save renames a new last.pt into place and
            # leaves this one alone (made under a temporary name, then renamed: never half there)
            kept, temporary = self.kept_path(epoch), self.path.with_name(f".epoch_{epoch}.pt.tmp")
            temporary.unlink(missing_ok=True)
            os.link(self.path, temporary)
            os.replace(temporary, kept)

    def restore(self, log: logging.Logger | None = None, energy_meter=None) -> ResumePoint:
        """Load last.pt into the live objects; returns where the loop continues (and says so in
        `log`). An energy meter continues from the checkpointed total."""
        point = self._restore()
        if log is not None:
            log.info("resumed from %s after epoch %d%s (step %d)", self.path, point.epoch,
                     f" and part of epoch {point.epoch + 1}" if point.progress else "", point.step)
        if energy_meter is not None:
            energy_meter.resume_from(point.history[-1].get("energy_kwh") if point.history else None)
        return point

    def _restore(self) -> ResumePoint:
        state = load_checkpoint(self.path)
        refuse_changed_config(self.path, state.get("config"), self.config)
        refuse_other_data(self.path, state.get("data"), self.data)
        if state["world_size"] != self.dist.world_size:
            raise CheckpointError(f"checkpoint {self.path} was written by {state['world_size']} "
                                  f"rank(s); resume it with the same --nproc_per_node (now {self.dist.world_size})")
        mismatch = state_dict_mismatch(self.model, state["model"])
        if mismatch:
            raise CheckpointError(f"checkpoint {self.path} does not fit this run's model: {mismatch}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            rank_state = state["ranks"][self.dist.rank]
            self.gate.load_state_dict(rank_state["gate"])
            self.train_loader.load_state_dict(rank_state["train_loader"])
            restore_rng(rank_state["rng"])
            if self.packer is not None and rank_state.get("packer") is not None:
                self.packer.load_state_dict(rank_state["packer"], next(self.model.parameters()).device)
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.lookahead is not None:
                self.lookahead.load_state_dict(state["lookahead"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise CheckpointError(f"checkpoint {self.path} does not fit this run's optimiser or gate "
                                  f"({type(err).__name__}: {reason[:300]})") from None
        return ResumePoint(state["epoch"], state["step"], list(state["history"]), state["wandb_run_id"],
                           state["ranks"][self.dist.rank].get("progress"))


# Keys that say where things go or how they are shown, not what is trained: a resumed run may
# change them (a key matches itself and everything below it).
RESUMABLE_CHANGES = (*PLACEMENT_KEYS, "init_from", "device", "dataset.search_roots", "dataset.download",
                     "training.eval_every_epochs", "training.eval_batch_size", "task.eval_flip_tta",
                     "task.eval_translate_tta", "task.eval_tta_every_epoch",
                     "checkpoint", "distributed", "energy", "wandb", "debug")


def resumable_change(key: str) -> bool:
    """Whether a config key (or one below it) is in RESUMABLE_CHANGES: where things go, not what trains."""
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


# Keys added after checkpoints were written, with the value that trains as those runs did: a
# checkpoint without the key resumes under that value (and is refused under any other).
ADDED_KEYS = {"training.loss_reduction": "mean", "training.pack_remainder": "train"}


def flat_config(cfg) -> dict[str, Any]:
    """The resolved config as {'training.lr': 0.001, ...}: plain values, fit for a weights-only checkpoint."""
    from omegaconf import OmegaConf

    def walk(node, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in walk(child, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    return walk(OmegaConf.to_container(cfg, resolve=True), "")


def refuse_changed_config(path: Path, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """A resume must continue the same run: any difference in a key that changes what is trained
    (anything outside RESUMABLE_CHANGES) is refused, naming each key with both values."""
    if saved is None or current is None:  # a checkpoint from before configs were saved: nothing to compare
        return
    saved, current = {**ADDED_KEYS, **saved}, {**ADDED_KEYS, **current}
    changed = sorted(k for k in saved.keys() | current.keys()
                     if not resumable_change(k) and saved.get(k, "<absent>") != current.get(k, "<absent>"))
    if changed:
        listing = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
                            for k in changed)
        way = ("Resume with the checkpoint's values, or start a new run in another hydra.run.dir")
        if "training.epochs" in changed:  # extending a run: a schedule over the old length cannot just go on
            way += (f"; to train on from this run's weights: hydra.run.dir=NEW init_from={path} "
                    "training.epochs=N (keeps the model; the optimiser, schedule and gate start afresh)")
        raise CheckpointError(f"resuming {path} would change what the run trains ({listing}). {way}")


def refuse_other_data(path: Path, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """A resume must train on the data the checkpoint trained on: any difference between the two
    fingerprints but the data's place (`source`: a moved copy resumes) is refused, naming what
    changed and both sources. A checkpoint from before fingerprints resumes unchecked."""
    changed = data_changes(saved, current)
    if changed:
        raise CheckpointError(f"resuming {path} on other training data ({changed}): one run's records would "
                              "mix two datasets. Point dataset.root at the checkpoint's data, or train on from "
                              f"its weights in a new run: hydra.run.dir=NEW init_from={path}")


def data_changes(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """Each fingerprint fact that differs, with both values, then both sources; None if the data
    is the same (or either fingerprint is unknown)."""
    if saved is None or current is None:
        return None
    keys = sorted(k for k in saved.keys() | current.keys() if k != "source" and saved.get(k) != current.get(k))
    if not keys:
        return None
    return "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, now {_short(current.get(k))}"
                     for k in [*keys, "source"])


def _short(value: Any) -> str:
    """A fact as read in a message: digests cut to 12 characters (enough to tell two apart)."""
    text = str(value)
    return f"{text[:12]}..." if re.fullmatch(r"[0-9a-f]{32,}", text) else text


def load_initial_weights(model: torch.nn.Module, path: str | os.PathLike, log: logging.Logger | None = None,
                         data: dict[str, Any] | None = None) -> list[str]:
    """`init_from=PATH`: the model weights of one of this project's checkpoints (the optimiser,
    gate and schedule start fresh). Weights the checkpoint lacks may only be sparse attention's
    indexers (a dense model starting sparse training); they keep their initialisation and are
    returned by name. Any other missing or unexpected weight, or a shape mismatch, is refused.
    Weights trained on other data than this run's fingerprint `data` are allowed, and said."""
    checkpoint = load_checkpoint(path, name=f"init_from={path}")
    mismatch = state_dict_mismatch(model, checkpoint["model"], may_lack=lambda key: ".indexer." in f".{key}")
    if mismatch:
        raise CheckpointError(f"init_from={path} does not fit this model: {mismatch} (only indexer weights may "
                              "be missing)")
    missing = list(model.load_state_dict(checkpoint["model"], strict=False).missing_keys)
    if log is not None:
        log.info("init_from %s%s", path, f"; {len(missing)} indexer tensors not in it, left as initialised "
                 f"({missing[0]}, ...)" if missing else "")
        other = data_changes(checkpoint.get("data"), data)
        if other:
            log.info("init_from %s was trained on other data (%s): its weights start this run's", path, other)
    return missing


def state_dict_mismatch(model: torch.nn.Module, state: dict[str, Any],
                        may_lack: Callable[[str], bool] = lambda key: False) -> str | None:
    """What keeps `state` from loading into `model` (None if it fits): each tensor of another shape
    with both shapes, and the keys either side lacks (a few of each, and how many)."""
    own = model.state_dict()
    shapes = [f"{k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    lacking = [k for k in own if k not in state and not may_lack(k)]
    unexpected = [k for k in state if k not in own]
    parts = [*shapes[:3], *([f"{len(shapes) - 3} more of another shape"] if len(shapes) > 3 else []),
             *([f"missing from the checkpoint: {_few(lacking)}"] if lacking else []),
             *([f"not in the model: {_few(unexpected)}"] if unexpected else [])]
    return "; ".join(parts) or None


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
