"""Every combination of the config groups composes; bad values are refused by key name."""
import itertools
import re

import pytest
from conftest import CONF_DIR, TINY, compose_config, run_train
from hydra.errors import HydraException
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


# One table of bad values: the key each refusal names, while Hydra composes (types, unknown keys and
# options: training/schema.py) or before any data loads (ranges: runtime.validate_config).
BAD_VALUES = [
    (["gate.target_rate=0"], "gate.target_rate=0 is not allowed: a fraction in (0, 1]"),
    (["gate.target_rate=2"], "gate.target_rate=2 is not allowed"),
    (["budget=1.5"], "budget=1.5 is not allowed: null or a fraction in (0, 1]"),
    (["training.batch_size=-1"], "training.batch_size=-1 is not allowed: an integer >= 1"),
    (["training.epochs=0"], "training.epochs=0 is not allowed"),
    (["training.precision=fp8"], "training.precision='fp8' is not allowed"),
    (["training.loss_reduction=median"], "training.loss_reduction='median' is not allowed: mean or sum"),
    (["device=tpu"], "device='tpu' is not allowed: auto, cpu, cuda or cuda:N"),
    (["wandb.mode=sometimes"], "wandb.mode='sometimes' is not allowed"),
    (["gate.min_selected=100"], "gate.min_selected=100 is not allowed: an integer from 0 to training.batch_size (64)"),
    (["dataset=cifar10", "dataset.root=/nonexistent", "dataset.download=false"],
     "dataset.root='/nonexistent' does not exist"),
    (["seed=abc"], "Error merging override seed=abc"),
    (["training.epochs=two"], "Error merging override training.epochs=two"),
    (["training.lr=0.01"], "Could not override 'training.lr'"),  # the optimiser's own key: training.optimizer.lr
    (["model=nope"], "Could not find 'model/nope'"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=lambda v: v[-1] if isinstance(v, list) else "")
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises((ConfigError, HydraException), match=re.escape(message)):
        validate_config(compose_config(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["gate.target_rate=2"], ["seed=abc"], ["model=nope"]],
                         ids=["range", "type", "group"])
def test_train_py_exits_1_before_loading_data(tmp_path, overrides):
    message = dict((tuple(o), m) for o, m in BAD_VALUES)[tuple(overrides)]
    result = run_train(tmp_path, *TINY, *overrides)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and message in output
    assert "data:" not in output and "Traceback" not in output  # refused before any data loaded, in words
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_optimisers_own_learning_rate_is_the_key_under_every_preset():
    """+experiment=fastnet sets its optimiser whole; training.optimizer.lr still reaches it (and is
    what the run records), where the old training.lr alias reached nothing under this preset."""
    cfg = compose_config(["+experiment=fastnet", "training.optimizer.lr=0.7"])
    assert cfg.training.optimizer.lr == 0.7 and "lr" not in cfg.training