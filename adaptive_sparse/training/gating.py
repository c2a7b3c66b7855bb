"""The app's side of gating: a gate built from the `gate` config with what the run knows, the
loop's own switches (`gate.pack`, `gate.select_before_loading`), and the scorer the loop uses.

The library's gates take only what they need; the app offers every fact it has (dataset size,
outputs, epochs, seed, device, a built proxy model) and passes each constructor the ones its
signature names, so a config group option adds a gate without touching this file.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from adaptive_sparse.gating.gates import Gate
from adaptive_sparse.gating.scorers import ModelScorer, ProxyScorer
from adaptive_sparse.training.lifecycle import ConfigError
from adaptive_sparse.training.metering import ExampleBatch, FlopMeter

LOOP_KEYS = ("pack", "select_before_loading")  # read by the training loop, not gate constructors


@dataclass
class GateSwitches:
    """How the loop runs a gate: packed into full training batches, and selecting before loading."""
    pack: bool
    select_before_loading: bool


def build_gate(cfg: DictConfig, budget: float | None, facts: dict[str, Any], model_kwargs: dict[str, Any]) -> Gate:
    """The gate `cfg` names, given the facts its constructor takes; `budget` (when set) is the
    target rate of a gate that has one; a proxy scorer's model is built for scoring=proxy."""
    accepted = inspect.signature(get_class(cfg._target_)).parameters
    offered = dict(facts)
    if budget is not None and "target_rate" in accepted:
        offered["target_rate"] = budget
    if cfg.get("scoring") == "proxy":
        if cfg.get("proxy") is None:
            raise ConfigError("gate.scoring=proxy needs gate.proxy: a model config with _partial_: true")
        offered["proxy"] = instantiate(cfg.proxy)(**model_kwargs)
    elif "proxy" in cfg:
        offered["proxy"] = None
    gate_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in LOOP_KEYS])
    return instantiate(gate_cfg, **{k: v for k, v in offered.items() if k in accepted})


def gate_switches(cfg: DictConfig, gate: Gate) -> GateSwitches:
    """`gate.select_before_loading`: auto selects before loading wherever the gate can (no scoring
    forward of the loaded batch needed); true where it cannot is refused by name."""
    wanted = cfg.select_before_loading
    if wanted not in ("auto", True, False):
        raise ConfigError(f"gate.select_before_loading={wanted!r} is not allowed: auto, true or false")
    if wanted is True and not gate.can_select_before_loading:
        raise ConfigError(f"gate.select_before_loading=true: {type(gate).__name__} with these settings needs a "
                          "scoring forward of each loaded batch, so it cannot select before loading "
                          "(use auto or false)")
    return GateSwitches(bool(cfg.pack), gate.can_select_before_loading if wanted == "auto" else wanted)


@dataclass
class Scoring:
    """Who scores batches for the gate, and the FLOPs charged per sample scored and learned."""
    scorer: ModelScorer | ProxyScorer
    forward_flops: int
    learn_flops: int


def proxy_flop_meter(gate: Gate, example: ExampleBatch) -> FlopMeter | None:
    """The FLOPs of the gate's proxy scorer (None without one), counted once: the proxy's
    structure, unlike a model's with a sparse attention warm-up, never changes between epochs."""
    return FlopMeter(gate.scorer.model, example) if gate.scorer is not None else None


def scoring_for(gate: Gate, model: nn.Module, model_meter: FlopMeter, proxy_meter: FlopMeter | None) -> Scoring:
    """The gate's proxy (counted on its own model) or the trained model itself (a scoring
    forward costs the model's forward, as counted this epoch; it learns nothing extra)."""
    if gate.scorer is None:
        return Scoring(ModelScorer(model), model_meter.forward_per_sample, 0)
    return Scoring(gate.scorer, proxy_meter.forward_per_sample, proxy_meter.train_per_sample)
