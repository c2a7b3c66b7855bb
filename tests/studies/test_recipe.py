"""scripts.studies.recipe on fabricated ViT runs: the recipe's epochs mapped onto the
backbone's, its goal against dense at equal epochs, and its cost including the dense epochs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose_config

from scripts.studies import analysis
from scripts.studies import recipe as vit


def fake_run(root: Path, name: str, overrides: list[str], attention: str, seed: int,
             accs: list[float], epoch_s: float, kl: float | None = None) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    records = [{"epoch": e, "val_acc": a, "epoch_time_s": epoch_s, "flops_executed": 1e12, "indexer_loss": kl}
               for e, a in enumerate(accs, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "val_acc": accs[-1], "train_time_s": epoch_s * len(accs), "epochs": len(accs), "seed": seed,
        "flops_executed": 1e12 * len(accs), "gate": "none", "attention": attention, "model": "vit",
        "dataset": "cifar10", "hardware": "CPU, 1 threads", "precision": "bf16", "activation_rate": 1.0}))


def fabricate(root: Path) -> None:
    for seed, (dense5, recipe) in enumerate([(52.0, 51.5), (50.0, 48.5)]):
        dense = [40.0, 45.0, 48.0, 49.0 + seed, dense5]
        fake_run(root, f"dense{seed}", ["+experiment=vit_recipe_dense"], "dense", seed, dense, 100.0)
        init = f"init_from=runs/dense{seed}/checkpoints/epoch_4.pt"
        # the warm-up epoch leaves the backbone as it was: the dense model's epoch-4 accuracy
        fake_run(root, f"recipe{seed}", ["+experiment=vit_recipe_sparse", init], "sparse", seed,
                 [dense[3], recipe], 60.0, kl=0.2)
    # the control: dense from the same epoch-4 weights with a fresh optimiser, one epoch
    fake_run(root, "restart0", ["+experiment=vit_recipe_dense", "init_from=runs/dense0/checkpoints/epoch_4.pt",
                                "training.epochs=1"], "dense", 0, [51.0], 100.0)
    fake_run(root, "scratch0", ["+experiment=vit_keep_ratio", "attention.top_k=32"], "sparse", 0,
             [36.0, 44.0, 45.0, 48.0, 47.0], 150.0, kl=0.9)
    fake_run(root, "recipe16", ["+experiment=vit_recipe_sparse", "attention.top_k=16",
                                "init_from=runs/dense0/checkpoints/epoch_4.pt"], "sparse", 0, [49.0, 46.0], 60.0)


def test_recipe_epochs_map_onto_the_backbone_and_the_goal_is_judged_per_seed(tmp_path):
    fabricate(tmp_path / "sweep")
    runs = vit.recipe_runs(analysis.collect_runs(tmp_path / "sweep"), vit.VIT)
    recipe = vit.of(runs, "recipe", 32)[0]
    assert (recipe.start_epoch, recipe.warmup, recipe.top_k) == (4, 1, 32)
    assert [recipe.backbone_epoch(e) for e in (1, 2)] == [None, 5]
    assert recipe.value_at(5) == 51.5 and recipe.value_at(4) is None
    text = vit.goal_section(runs)
    assert "| 0 | 49.00 (D = 4) | 49.00 | 51.50 (D + S = 5) | 52.00 | -0.50 |" in text
    assert "| 1 | 50.00 (D = 4) | 50.00 | 48.50 (D + S = 5) | 50.00 | -1.50 | – | – |" in text
    assert "| 0 | 49.00 (D = 4) | 49.00 | 51.50 (D + S = 5) | 52.00 | -0.50 | 51.00 | +0.50 |" in text
    assert "fresh Adam (what sparse attention and the warm-up cost by themselves): 0.50 points over 1 seed(s)" in text
    # mean -1.00; half-width t(1) 12.706 * sd 0.7071 / sqrt(2) = 6.353; seed 1 is 1.5 points down
    assert "-1.00 ± 6.35 points over 2 seed(s); within a point of dense on 1 of 2: goal **missed**" in text


def test_epochs_table_keys_and_costs_by_hand(tmp_path):
    fabricate(tmp_path / "sweep")
    runs = vit.recipe_runs(analysis.collect_runs(tmp_path / "sweep"), vit.VIT)
    table = vit.epochs_table(runs)
    assert "| 5 | 52.00 | 50.00 | 51.00 | 47.00 | 51.50 | 48.50 |" in table
    assert "| 4 + indexer warm-up |  |  |  |  | 49.00 | 50.00 |" in table
    keep = vit.keep_ratio_table(runs)
    assert "| 16 | 46.00 | 0 | – | – | 52.00 |" in keep
    assert "| 32 | 50.00 ± 19.06 | 0,1 | 47.00 | 0 | 51.00 ± 12.71 |" in keep
    cost = vit.cost_table(runs)
    # dense: 5 x 100 s; recipe: 4 dense epochs (400 s) + 2 x 60 s = 520 s; FLOPs 4 + 2 of dense's 5
    assert "| dense | 2 | 500 | 1.00 | 5 | 1.000 |" in cost
    assert "| recipe (dense epochs 1..D + warm-up + sparse) | 2 | 520 | 1.04 | 6 | 1.200 |" in cost
    assert "| sparse from scratch | 1 | 750 | 1.50 | 5 | 1.000 |" in cost


def test_page_lists_queue_lines_without_a_record(tmp_path):
    fabricate(tmp_path / "sweep")
    queue = tmp_path / "queue.txt"
    queue.write_text("+study=vit_recipe_dense seed=7\n")
    page = vit.write_page([tmp_path / "sweep"], tmp_path / "out", queue).read_text()
    assert "`+study=vit_recipe_dense seed=7`" in page and analysis.INTERVAL_NOTE in page
    assert (tmp_path / "out" / "accuracy_by_epoch.png").stat().st_size > 0


def test_the_stated_top_k_and_warm_up_are_what_the_presets_give():
    """The page is made from records alone, which do not hold attention.top_k or the recipe's
    warm-up: the study states them. A preset edited later fails here, so that the study decides
    what its recorded runs trained with."""
    for name, top_k in vit.TOP_K.items():
        assert compose_config([f"attention={name}"]).attention.top_k == top_k, name
    for study, preset in ((vit.VIT, "vit_recipe_sparse"), (vit.LONG_CONTEXT, "shakespeare_char_long_recipe")):
        assert compose_config([f"+study={preset}"]).attention.warmup_epochs == study.recipe_warmup, preset


def test_a_sparse_attention_without_a_stated_top_k_is_refused(tmp_path):
    fake_run(tmp_path / "sweep", "new0", ["attention=sparse_new"], "sparse_new", 0, [40.0], 100.0)
    with pytest.raises(SystemExit, match="attention=sparse_new"):
        vit.recipe_runs(analysis.collect_runs(tmp_path / "sweep"), vit.VIT)


def test_the_verdict_is_undecided_while_dense_training_sits_at_the_bigram_count():
    """The committed long-context runs: dense ends at 2.494 nats against a bigram count of 2.484,
    not 0.3 below it, so the recipe's 0.006 nats from dense decide nothing."""
    record = ROOT / "docs" / "results" / "long-context"
    runs = vit.recipe_runs(analysis.collect_runs(record / "runs.jsonl"), vit.LONG_CONTEXT)
    assert vit.context_learnt(vit.ngram_baselines(record), runs) is False
    assert "goal **undecided (dense training has not learnt" in vit.goal_section(runs, context_learnt=False)
    assert "goal **met**" in vit.goal_section(runs)  # the same differences, without the baseline to judge by


def test_a_verdict_met_seed_by_seed_says_when_its_interval_is_wider_than_the_tolerance():
    """The committed RoPE runs: the recipe ends -0.0029 and +0.0057 nats from dense, both within
    0.03, but two seeds that far apart give a 95% interval of ± 12.71 * 0.0043 = ± 0.0548."""
    record = ROOT / "docs" / "results" / "long-context-rope"
    runs = vit.recipe_runs(analysis.collect_runs(record / "runs.jsonl"), vit.LONG_CONTEXT)
    text = vit.goal_section(runs, vit.context_learnt(vit.ngram_baselines(record), runs))
    assert "0.0014 ± 0.0548 nats over 2 seed(s); within 0.03 nats of dense on 2 of 2: goal **met**" in text
    assert "Met seed by seed only: the interval on the mean difference (± 0.0548) is wider" in text


def test_the_goal_can_be_judged_at_another_top_k(tmp_path):
    """--goal-top-k 16 judges the fabricated ViT study's one recipe run at 16 (seed 0: 46.00 after
    D + S against dense's 52.00, 6 points worse), and the command on the page says so."""
    fabricate(tmp_path / "sweep")
    page = vit.write_page([tmp_path / "sweep"], tmp_path / "out", None, goal_top_k=16).read_text()
    assert "## The goal: recipe-trained sparse within a point of dense at equal epochs (top_k 16 of 65)" in page
    assert "--goal-top-k 16" in page
    assert "top_k 16: -6.00 points over 1 seed(s); within a point of dense on 0 of 1: goal **missed**" in page


def test_the_context_is_read_from_the_runs_and_must_be_one(tmp_path):
    """A study trained by override at another context (model.block_size=4096) says so in its goal's
    "top_k of N"; runs at two contexts in one record are refused in one line."""
    fabricate(tmp_path / "sweep")
    for run in (tmp_path / "sweep").iterdir():
        overrides = run / ".hydra" / "overrides.yaml"
        overrides.write_text(yaml.safe_dump([*yaml.safe_load(overrides.read_text()), "model.block_size=129"]))
    page = vit.write_page([tmp_path / "sweep"], tmp_path / "out", None).read_text()
    assert "(top_k 32 of 129)" in page
    overrides = tmp_path / "sweep" / "dense0" / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("model.block_size=129", "model.block_size=65"))
    with pytest.raises(SystemExit, match=r"different contexts \[65, 129\]: one study, one context"):
        vit.write_page([tmp_path / "sweep"], tmp_path / "out", None)
