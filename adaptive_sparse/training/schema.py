"""The run config's schema: the type of every key a run has outside its group options, checked
when Hydra composes the config, so a value of the wrong type (`training.epochs=two`) or a
misspelt key in a preset fails there, naming the key. The values themselves, defaults included,
are stated once, in conf/config.yaml (every field here is MISSING until the YAML fills it); what
a type cannot say (ranges, choices, a CUDA device being present) `runtime.validate_config` checks.

`register()` puts the schema in Hydra's ConfigStore as `run_schema`, the first entry of
conf/config.yaml's defaults list; train.py (and anything composing the config) registers it first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainingSchema:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    eval_every_epochs: int = MISSING
    train_eval_samples: int = MISSING
    limit_train_batches: Optional[int] = MISSING
    last_epoch_fraction: float = MISSING
    drop_last: bool = MISSING
    precision: str = MISSING
    num_threads: Optional[int] = MISSING
    flush_denormal: bool = MISSING
    optimizer: Any = MISSING          # a _partial_ optimiser config
    scheduler: Any = MISSING          # a _partial_ scheduler config, or null
    scheduler_interval: str = MISSING
    schedule_lead_in_epochs: int = MISSING
    label_smoothing: float = MISSING
    pack_remainder: str = MISSING
    loss_reduction: str = MISSING
    grad_clip: Optional[float] = MISSING
    lookahead: Any = MISSING          # a _partial_ Lookahead config, or null


@dataclass
class WandbSchema:
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: list[str] = MISSING
    name: Optional[str] = MISSING
    log_every_steps: int = MISSING
    init_timeout_s: float = MISSING


@dataclass
class CheckpointSchema:
    every_epochs: int = MISSING
    keep_epochs: list[int] = MISSING


@dataclass
class DistributedSchema:
    backend: str = MISSING


@dataclass
class DebugSchema:  # test-only fault injection
    inject_nan_at_step: Optional[int] = MISSING
    signal_at_step: Optional[int] = MISSING


@dataclass
class RunSchema:
    seed: int = MISSING
    budget: Optional[float] = MISSING
    device: str = MISSING
    deterministic: bool = MISSING
    progress: bool = MISSING
    resume: Any = MISSING             # true, false or auto
    init_from: Optional[str] = MISSING
    training: TrainingSchema = field(default_factory=TrainingSchema)
    wandb: WandbSchema = field(default_factory=WandbSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    distributed: DistributedSchema = field(default_factory=DistributedSchema)
    debug: DebugSchema = field(default_factory=DebugSchema)
    # the config groups: each option's own keys (its constructor refuses what it does not take)
    task: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    attention: Any = MISSING
    gate: Any = MISSING
    energy: Any = MISSING


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunSchema)
