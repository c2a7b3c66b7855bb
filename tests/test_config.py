"""Every combination of the config groups composes; bad values are refused by key name."""
import itertools

import pytest
from conftest import CONF_DIR, compose_config, run_train
from omegaconf import OmegaConf

from adaptive_sparse.training.lifecycle import ConfigError
from adaptive_sparse.training.runtime import validate_config


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))  # _base: shared keys


def test_expected_group_options_exist():
    assert {"cnn", "vit"} <= set(group_options("model"))
    assert {"none", "random", "sundew", "infobatch", "selective_backprop"} <= set(group_options("gate"))
    assert "dense" in group_options("attention")
    assert "cifar10" in group_options("dataset")


def all_pairs(groups: list[list[str]]) -> list[tuple[str, ...]]:
    """Combinations (one option per group) in which every two options of two groups meet at
    least once: a clash between any two groups' options shows, in about |largest| x |second|
    compositions instead of the full product (greedy: each pick covers the most pairs not yet met)."""
    product = list(itertools.product(*groups))
    pairs = lambda combo: {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(combo), 2)}  # noqa: E731
    uncovered = set().union(*(pairs(c) for c in product))
    chosen = []
    while uncovered:
        best = max(product, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def test_all_pairs_covers_every_pair_with_fewer_combinations():
    groups = [["a", "b", "c"], ["x", "y"], ["1", "2"]]
    chosen = all_pairs(groups)
    for (i, first), (j, second) in itertools.combinations(enumerate(groups), 2):
        assert {(a, b) for a in first for b in second} == {(c[i], c[j]) for c in chosen}
    assert len(chosen) == 6 < 12  # 3 x 2 is the least that can hold every (first, second) pair


@pytest.mark.parametrize("model,gate,attention,dataset", all_pairs(
    [group_options("model"), group_options("gate"), group_options("attention"), group_options("dataset")]))
def test_every_pair_of_options_composes_and_validates(model, gate, attention, dataset):
    cfg = compose_config([f"model={model}", f"gate={gate}", f"attention={attention}", f"dataset={dataset}"])
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    assert gate in ("none", "infobatch") or 0 < cfg.gate.target_rate <= 1


def test_defaults_reproduce_the_report():
    cfg = compose_config()
    assert cfg.model._target_.endswith("SimpleCNN")
    assert cfg.gate._target_.endswith("SundewGate")
    assert (cfg.gate.target_rate, cfg.training.batch_size, cfg.training.epochs) == (0.06, 64, 3)
    assert cfg.dataset.name == "cifar10" and cfg.dataset.augment is False
    assert cfg.wandb.mode == "offline"


@pytest.mark.parametrize("override,key", [
    ("gate.target_rate=0", "gate.target_rate"),
    ("gate.target_rate=1.5", "gate.target_rate"),
    ("training.batch_size=-1", "training.batch_size"),
    ("training.epochs=0", "training.epochs"),
    ("budget=1.5", "budget"),
    ("training.precision=fp8", "training.precision"),
    ("device=tpu", "device"),
    ("wandb.mode=sometimes", "wandb.mode"),
    ("dataset.root=/nonexistent", "dataset.root"),
])
def test_bad_values_are_refused_by_key(override, key):
    overrides = [override] + (["dataset.download=false"] if "dataset.root" in override else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose_config(overrides))


def test_train_refuses_bad_rate_and_unknown_option(tmp_path):
    bad_rate = run_train(tmp_path / "a", "gate.target_rate=1.5")
    assert bad_rate.returncode != 0 and "gate.target_rate" in bad_rate.stdout
    unknown = run_train(tmp_path / "b", "model=nope")
    assert unknown.returncode != 0
    assert "model" in unknown.stderr and "cnn" in unknown.stderr and "vit" in unknown.stderr
