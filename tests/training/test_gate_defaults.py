"""One gate, one default: every `conf/gate/*` option builds (through `build_gate`, as train.py does)
the gate that its Python class builds from the required arguments alone, plus only what the option
says differs. Both get the run's facts (dataset size, classes, epochs, seed, device), which no YAML
holds; both are compared by `state_dict` and by their selections on one fixed sequence of batches
with losses handed back, so a default that drifts between a YAML and its constructor fails here."""
from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra.utils import get_class, instantiate

from adaptive_sparse.gating.gates import Gate
from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.training.gating import build_gate

N, BATCH, EPOCHS = 64, 16, 4
FACTS = {"num_samples": N, "num_outputs": 10, "epochs": EPOCHS, "seed": 3, "device": "cpu"}
MODEL_KWARGS = {"num_classes": 10}  # the proxy scorer's, as the classification task gives them

# option -> what it differs by from the constructor's defaults (beyond the run's facts); the
# extra (option, override) rows check defaults that only a non-default rule reads
PYTHON_SIDE: dict[str, dict[str, Any]] = {
    "none": {}, "random": {}, "infobatch": {}, "selective_backprop": {}, "sundew": {},
    "sundew_memory": {"scoring": "memory"}, "sundew_proxy": {"scoring": "proxy"},
}
OVERRIDES = [("sundew", "selection", "threshold"), ("sundew", "selection", "top"),
             ("sundew", "unbiased", True), ("sundew_memory", "selection", "threshold")]
OPTIONS = sorted(p.stem for p in (CONF_DIR / "gate").glob("*.yaml") if not p.stem.startswith("_"))


def built_by_python(cls: type[Gate], differs: dict[str, Any], proxy_cfg) -> Gate:
    """The class with its required arguments (the facts it names) and what the option differs by."""
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in FACTS.items() if k in accepted} | differs
    if differs.get("scoring") == "proxy":
        kwargs["proxy"] = instantiate(proxy_cfg)(**MODEL_KWARGS)
    return cls(**kwargs)


def selections(gate: Gate) -> list[tuple[list[int], list[float] | None]]:
    """Three epochs of one fixed order and fixed losses, handed back after every batch."""
    g = torch.Generator().manual_seed(0)
    chosen = []
    for epoch in range(1, 4):
        gate.start_epoch(epoch)
        for idx in torch.randperm(N, generator=g).split(BATCH):
            loss = (idx % 7).float() / 3 + 1.0 / epoch  # [B]: differs by sample, falls by epoch
            entropy = (idx % 5).float() / 4
            selection = gate.select(idx, BatchScores(loss, entropy) if gate.needs_scores else None)
            kept = selection.index
            chosen.append((kept.tolist(), None if selection.weight is None else selection.weight.tolist()))
            gate.observe(idx[kept], BatchScores(loss[kept], entropy[kept]))
    return chosen


def settings(obj: Any, path: str = "gate", seen: set[int] | None = None) -> dict[str, Any]:
    """Every plain value the gate and its parts (rules, controllers, histories, scoring sources)
    keep, by attribute path: what a constructor stored that a short run's state may not show
    (a history's size, a controller's gains)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    found = {}
    for name, value in vars(obj).items():
        where = f"{path}.{name}"
        if value is None or isinstance(value, (bool, int, float, str, dict)):
            found[where] = value
        elif type(value).__module__.startswith("adaptive_sparse.gating"):
            found |= settings(value, where, seen)
    return found


def assert_same_state(yaml_state: Any, python_state: Any, where: str = "state_dict") -> None:
    if isinstance(yaml_state, dict):
        assert yaml_state.keys() == python_state.keys(), where
        for key in yaml_state:
            assert_same_state(yaml_state[key], python_state[key], f"{where}[{key!r}]")
    elif isinstance(yaml_state, torch.Tensor):
        torch.testing.assert_close(yaml_state, python_state, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(yaml_state, float) and math.isnan(yaml_state):
        assert math.isnan(python_state), where
    else:
        assert yaml_state == python_state, where


def test_every_gate_option_is_listed():
    assert OPTIONS == sorted(PYTHON_SIDE)


@pytest.mark.parametrize("option, key, value", [(o, None, None) for o in OPTIONS] + OVERRIDES)
def test_a_conf_gate_builds_the_python_default(option, key, value):
    overrides = [f"gate={option}"] + ([f"gate.{key}={str(value).lower()}"] if key else [])
    cfg = compose_config(overrides).gate
    torch.manual_seed(0)  # the proxy's initial weights
    from_yaml = build_gate(cfg, None, FACTS, MODEL_KWARGS)
    torch.manual_seed(0)
    from_python = built_by_python(get_class(cfg._target_), PYTHON_SIDE[option] | ({key: value} if key else {}),
                                  cfg.get("proxy"))
    assert type(from_yaml) is type(from_python)
    assert_same_state(settings(from_yaml), settings(from_python), "settings")
    assert_same_state(from_yaml.state_dict(), from_python.state_dict())
    assert selections(from_yaml) == selections(from_python)
    assert_same_state(from_yaml.state_dict(), from_python.state_dict())
