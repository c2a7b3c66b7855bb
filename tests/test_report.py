"""scripts/report.py on fabricated run directories: figures by hand, incomplete runs, plots, W&B."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

spec = importlib.util.spec_from_file_location("sweep_report", ROOT / "scripts" / "report.py")
report = sys.modules["sweep_report"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(report)


def fake_run(sweep: Path, name: str, overrides: list[str], *, gate: str, train_time: float | None,
             val_acc: float = 50.0, rate: float = 1.0, target: float = 1.0, epochs: int = 2,
             epochs_done: int | None = None, threshold: float | None = None) -> Path:
    """A run directory as train.py leaves it; train_time=None: no summary.json (unfinished)."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"training": {"epochs": epochs}, "wandb": {"project": "proj", "entity": None}}))
    done = epochs if epochs_done is None else epochs_done
    per_epoch = (train_time or 10.0) / epochs
    records = [{"epoch": e + 1, "val_acc": val_acc - 10 * (epochs - 1 - e), "epoch_time_s": per_epoch,
                "flops_executed": 1e9 * rate * (e + 1), "threshold": threshold} for e in range(done)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if train_time is not None:
        (run / "summary.json").write_text(json.dumps({
            "val_acc": val_acc, "train_time_s": train_time, "activation_rate": rate, "target_rate": target,
            "compute_savings": 1 - rate, "sample_savings": 1 - rate, "gate": gate, "model": "cnn",
            "attention": "dense", "dataset": "synthetic", "epochs": epochs, "wandb_group": "2026_sweep"}))
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """gate none and sundew, seeds 0 and 1, plus a sundew seed 2 that stopped after 1 of 2 epochs."""
    root = ["dataset.root=/data/cifar10"]  # fixed for all runs, and a key that never makes rows
    fake_run(tmp_path, "0_gate=none,seed=0", ["gate=none", "seed=0", *root], gate="none",
             train_time=10.0, val_acc=50.0)
    fake_run(tmp_path, "1_gate=none,seed=1", ["gate=none", "seed=1", *root], gate="none",
             train_time=12.0, val_acc=54.0)
    fake_run(tmp_path, "2_gate=sundew,seed=0", ["gate=sundew", "seed=0", *root], gate="sundew",
             train_time=4.0, val_acc=40.0, rate=0.05, target=0.06, threshold=1.0)
    fake_run(tmp_path, "3_gate=sundew,seed=1", ["gate=sundew", "seed=1", *root], gate="sundew",
             train_time=6.0, val_acc=44.0, rate=0.07, target=0.06, threshold=1.5)
    fake_run(tmp_path, "4_gate=sundew,seed=2", ["gate=sundew", "seed=2", *root], gate="sundew",
             train_time=None, epochs_done=1)
    return tmp_path


def test_rows_by_hand(sweep: Path):
    runs = report.collect_runs(sweep)
    assert [r.complete for r in runs] == [True, True, True, True, False]
    none, sundew = report.summarise(runs)
    assert none.label == {"gate": "none"} and sundew.label == {"gate": "sundew"}
    assert len(sundew.runs) == 2  # the unfinished seed 2 is not averaged in
    # means and sample SDs over two seeds: sd(a, b) = |a - b| / sqrt(2)
    assert sundew.figures["val_acc"] == pytest.approx((42.0, 4 / math.sqrt(2)))
    assert sundew.figures["train_time_s"] == pytest.approx((5.0, 2 / math.sqrt(2)))
    assert sundew.figures["activation_rate"] == pytest.approx((0.06, 0.02 / math.sqrt(2)))
    assert sundew.figures["compute_savings"] == pytest.approx((0.94, 0.02 / math.sqrt(2)))
    assert none.figures["train_time_s"] == pytest.approx((11.0, math.sqrt(2)))
    # speedup: mean gate=none time 11 s / mean sundew time 5 s
    assert sundew.speedup == pytest.approx(2.2) and none.speedup == pytest.approx(1.0)
    # lossless goal: none's mean final accuracy 52 - 0.3 = 51.7; sundew's epochs (30, 40) and
    # (34, 44) never reach it; none's seed 1 does (54) after its 12 s, of none's mean 11 s
    assert sundew.time_to_baseline == [None, None]
    assert none.time_to_baseline == [None, pytest.approx(12 / 11)]


def test_time_to_full_training_accuracy_by_hand(sweep: Path):
    fake_run(sweep, "5_gate=random,seed=0", ["gate=random", "seed=0", "dataset.root=/data/cifar10"],
             gate="random", train_time=4.0, val_acc=62.0, rate=0.25, target=0.25)
    path, rows, _ = report.write_report(sweep)
    random_row = next(row for row in rows if row.label == {"gate": "random"})
    # epochs at 52 and 62 %, 2 s each: 52 >= 51.7 after 2 s, of none's mean 11 s
    assert random_row.time_to_baseline == [pytest.approx(2 / 11)]
    assert "| random | 1 | 62.00 | 4.0 | 2.75x | 0.18 |" in path.read_text()


def test_table_and_report_list_the_incomplete_run(sweep: Path):
    path, rows, _ = report.write_report(sweep)
    table = report.table_markdown(rows)
    assert ("| sundew | 2 | 42.00 ± 2.83 | 5.0 ± 1.4 | 2.20x | not reached by 2 of 2 | 94.0 ± 1.4 | 94.0 ± 1.4 "
            "| 0.0600 ± 0.0141 / 0.06 |") in table
    assert ("| none | 2 | 52.00 ± 2.83 | 11.0 ± 1.4 | 1.00x | not reached by 1 of 2 | 0.0 ± 0.0 | 0.0 ± 0.0 "
            "| 1.0000 ± 0.0000 / 1 |") in table
    text = path.read_text()
    assert table in text
    assert "- `4_gate=sundew,seed=2`: no summary.json: failed or still running (1 of 2 epochs" in text
    assert "dataset.root=/data/cifar10" in text  # a fixed setting, reported once, not a row


def test_plots_are_written_small(sweep: Path):
    report.write_report(sweep)
    for name in report.PLOTS:
        png = sweep / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 2_000 < png.stat().st_size < 100_000
        assert f"]({name}.png)" in (sweep / "report.md").read_text()


def test_speedup_is_matched_on_the_other_varying_keys(tmp_path: Path):
    times = {("none", "dense"): 10.0, ("sundew", "dense"): 5.0,
             ("none", "sparse"): 8.0, ("sundew", "sparse"): 2.0}
    for i, ((gate, attention), t) in enumerate(times.items()):
        fake_run(tmp_path, f"{i}", [f"gate={gate}", f"attention={attention}"], gate=gate, train_time=t)
    rows = {tuple(r.label.values()): r for r in report.summarise(report.collect_runs(tmp_path))}
    assert rows[("sundew", "dense")].speedup == pytest.approx(10 / 5)
    assert rows[("sundew", "sparse")].speedup == pytest.approx(8 / 2)


def test_no_speedup_without_a_gate_none_run(tmp_path: Path):
    fake_run(tmp_path, "0", ["gate=random"], gate="random", train_time=3.0)
    fake_run(tmp_path, "1", ["gate=sundew"], gate="sundew", train_time=4.0)
    rows = report.summarise(report.collect_runs(tmp_path))
    assert [r.speedup for r in rows] == [None, None]
    assert "| – |" in report.table_markdown(rows)


def test_wandb_report_is_built_for_the_sweep_group(sweep: Path):
    import wandb_workspaces.reports.v2 as wr
    from adaptive_sparse.tracking import CUMULATIVE_WANDB_KEYS, WANDB_KEYS

    runs = report.collect_runs(sweep)
    groups, project, entity = report.wandb_target(sweep, runs)
    assert (groups, project, entity) == (["2026_sweep"], "proj", "")
    built = report.build_wandb_report(groups, project, entity, report.summarise(runs), "Sweep x")
    assert isinstance(built, wr.Report) and built.project == "proj"
    grid = built.blocks[-1]
    assert [rs.filters for rs in grid.runsets] == ["Group = '2026_sweep'"]
    assert grid.runsets[0].groupby == ["summary.gate"]
    lines = [panel for panel in grid.panels if isinstance(panel, wr.LinePlot)]
    # the panels plot keys that train.py logs ("Step" is W&B's own)
    assert {key for panel in lines for key in panel.y} <= set(WANDB_KEYS.values())
    assert {panel.x for panel in lines} <= {*CUMULATIVE_WANDB_KEYS.values(), "Step"}
    assert len(grid.panels) == len(report.PLOTS)
    # serialisable offline, the string filter parsed into W&B's run-group filter
    spec_json = built._to_model().spec.model_dump_json()
    assert '{"key":{"section":"run","name":"group"},"op":"=","value":"2026_sweep"' in spec_json


def test_wandb_flag_without_network_keeps_the_local_report(sweep: Path, monkeypatch, capsys):
    monkeypatch.setattr(report, "network_reachable", lambda *a, **k: False)
    assert report.main([str(sweep), "--wandb"]) == 0
    out = capsys.readouterr().out
    assert "W&B Report not published: api.wandb.ai is unreachable" in out
    assert "incomplete:" in out and (sweep / "report.md").exists()


def test_a_gate_without_target_and_runs_evaluated_only_at_the_end(tmp_path: Path):
    """gate=infobatch has target_rate null; training.eval_every_epochs leaves val_acc null in
    the epochs between: the table says 'none', the curves skip the unevaluated epochs."""
    for seed in (0, 1):
        run = fake_run(tmp_path, f"{seed}_gate=infobatch,seed={seed}", ["gate=infobatch", f"seed={seed}"],
                       gate="infobatch", train_time=8.0, val_acc=50.0 + seed, rate=0.7, target=None)
        records = report.read_metrics(run / "metrics.jsonl")
        records[0]["val_acc"] = None
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fake_run(tmp_path, "2_gate=random,seed=0", ["gate=random", "seed=0"], gate="random",
             train_time=5.0, rate=0.25, target=0.25)
    path, rows, _ = report.write_report(tmp_path)
    infobatch = next(row for row in rows if row.label["gate"] == "infobatch")
    assert infobatch.figures["target_rate"] is None
    assert infobatch.figures["val_acc"] == pytest.approx((50.5, math.sqrt(0.5)))
    assert report._curve(infobatch, "epoch_time_s") == ([8.0], [50.5], [50.0], [51.0])  # epoch 2 only
    assert "0.7000 ± 0.0000 / none" in path.read_text()


def test_presets_side_by_side_share_the_gate_none_baseline(tmp_path: Path):
    """gate_ablation and gate_ablation_baselines sit in one directory: the gated rows' speedup
    is measured against the baselines preset's gate=none runs."""
    fake_run(tmp_path / "baselines", "0_gate=none", ["+experiment=gate_ablation_baselines", "gate=none"],
             gate="none", train_time=12.0)
    fake_run(tmp_path / "gated", "0_gate=random", ["+experiment=gate_ablation", "gate=random"],
             gate="random", train_time=3.0, rate=0.25, target=0.25)
    rows = report.summarise(report.collect_runs(tmp_path))
    random_row = next(row for row in rows if row.label["gate"] == "random")
    assert random_row.speedup == pytest.approx(4.0)
