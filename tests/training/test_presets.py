"""Presets and launcher configs: every file of both preset groups (recipes in conf/experiment,
`+experiment=NAME`; study sweeps in conf/study, `+study=NAME`) composes, each next step has its
preset, and each preset runs (tiny data, a few batches)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, TINY, compose_config, cyclic_text, read_run, run_train
from omegaconf import OmegaConf

from adaptive_sparse.training.records import PRESET_GROUPS

# (group, name) of every preset: conf/experiment's recipes and conf/study's sweeps
PRESETS = sorted((group, p.stem) for group in PRESET_GROUPS for p in (CONF_DIR / group).glob("*.yaml"))
PRESET_IDS = [f"{group}={name}" for group, name in PRESETS]
# the report's "Next Steps" (and the extra sweeps) -> the preset that answers each
NEXT_STEPS = {"longer training": "longer_training", "sparse ViT": "sparse_vit",
              "GPU training": "gpu", "baseline comparison": "baseline_comparison",
              "target rate sweep": "target_rate_sweep", "attention sweep": "attention_sweep",
              "the reported experiment": "seed_report"}


def test_every_next_step_has_a_preset():
    names = {name for _, name in PRESETS}
    assert set(NEXT_STEPS.values()) <= names, set(NEXT_STEPS.values()) - names


def test_both_preset_groups_hold_presets_and_no_name_is_in_both():
    recipes, studies = ({name for g, name in PRESETS if g == group} for group in PRESET_GROUPS)
    assert recipes and studies and not recipes & studies, recipes & studies


@pytest.mark.parametrize(("group", "name"), PRESETS, ids=PRESET_IDS)
def test_preset_composes_and_says_how_to_run_it(group: str, name: str):
    text = (CONF_DIR / group / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"+{group}={name}" in text.splitlines()[1], "line 2 gives the command that runs it"
    cfg = compose_config([f"+{group}={name}"], with_hydra=True)
    assert name in cfg.wandb.tags
    base = compose_config([], with_hydra=True)
    changed = [key for key in ("model", "gate", "attention", "task", "dataset", "training")
               if OmegaConf.to_container(cfg[key]) != OmegaConf.to_container(base[key])]
    sweeps = OmegaConf.select(cfg, "hydra.sweeper.params") != OmegaConf.select(base, "hydra.sweeper.params")
    assert changed or sweeps, "a preset changes what runs (model, gate, attention, task, data, training, or a sweep)"


def test_seed_report_is_the_reported_experiment():
    cfg = compose_config(["+experiment=seed_report"], with_hydra=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.gate, choices.dataset) == ("cnn", "sundew", "cifar10")
    assert (cfg.gate.target_rate, cfg.training.epochs, cfg.training.batch_size) == (0.06, 3, 64)
    assert (cfg.device, cfg.dataset.augment, cfg.training.precision) == ("cpu", False, "fp32")
    assert (cfg.gate.scoring, cfg.gate.selection) == ("forward", "threshold")  # the report's gate


def test_next_step_presets_set_what_their_step_asks():
    longer = compose_config(["+experiment=longer_training"], with_hydra=True)
    assert longer.training.epochs >= 20
    gpu = compose_config(["+experiment=gpu"], with_hydra=True)
    assert (gpu.device, gpu.training.precision) == ("cuda", "bf16")
    baseline = compose_config(["+study=baseline_comparison"], with_hydra=True).hydra.sweeper.params
    assert "none" in baseline.gate.split(",")  # a baseline comparison has full training in it


def test_a_study_and_its_baselines_sweep_into_one_parent_directory():
    """The sweep report reads a study's gated runs and their baselines from one parent folder."""
    for gated, baselines in (("gate_ablation", "gate_ablation_baselines"), ("lossless", "lossless_baseline")):
        dirs = [Path(compose_config([f"+study={name}"], with_hydra=True).hydra.sweep.dir) for name in (gated, baselines)]
        assert dirs[0].parent == dirs[1].parent


def test_lossless_gates_and_their_baseline_train_alike_so_only_the_gate_differs():
    gated, baseline = (compose_config([f"+study={name}"]) for name in ("lossless", "lossless_baseline"))
    assert gated.training == baseline.training and gated.dataset == baseline.dataset


def test_sparse_presets_build_a_vit_with_sparse_attention():
    choices = compose_config(["+experiment=sparse_vit"], with_hydra=True).hydra.runtime.choices
    assert (choices.model, choices.attention) == ("vit", "sparse")
    sweep = compose_config(["+study=attention_sweep"], with_hydra=True).hydra
    assert sweep.runtime.choices.model == "vit" and set(sweep.sweeper.params.attention.split(",")) == {"dense", "sparse"}


def test_launcher_configs_compose():
    parallel = compose_config(["hydra/launcher=parallel"], with_hydra=True).hydra.launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2
    slurm = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], with_hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.timeout_min) == ("gpu", 1, 120)


@pytest.mark.slow
@pytest.mark.parametrize(("group", "name"), PRESETS, ids=PRESET_IDS)
def test_preset_runs(group: str, name: str, tmp_path: Path):
    # single runs (no -m): presets that sweep run their first setting; gpu runs on the CPU here
    cfg = compose_config([f"+{group}={name}"], with_hydra=True)
    if cfg.hydra.runtime.choices.task == "char_lm":
        corpus = tmp_path / "corpus.txt"  # a small text in place of tiny-shakespeare, its 10% holding a window
        corpus.write_text(cyclic_text(max(8000, 12 * (cfg.task.block_size + 1))))
        data = [f"dataset.root={corpus}", f"dataset.cache_dir={tmp_path / 'cache'}", "training.epochs=1",
                "wandb.mode=disabled"]
    else:
        data = [*TINY, "dataset.num_train=256", "dataset.num_test=64"]
        if cfg.training.drop_last:  # 256 images make no whole batch of FastNet's 1,024
            data.append("training.drop_last=false")
    if cfg.hydra.runtime.choices.model == "vit":
        data.append("model.depth=1")  # the preset's settings all stand; one block is enough to run them
    result = run_train(tmp_path / "run", f"+{group}={name}", *data,
                       "training.limit_train_batches=2", "device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert len(records) == 1 and summary["epochs"] == 1
