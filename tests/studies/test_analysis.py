"""The sweep report (scripts.studies.analysis, run by scripts.studies.report) on fabricated run
directories: figures and intervals by hand, incomplete runs, plots, W&B."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, ROOT
from omegaconf import OmegaConf

from adaptive_sparse.training.checkpoint import resumable_change
from adaptive_sparse.training.records import PLACEMENT_KEYS, Metric
from scripts.studies import analysis as report
from scripts.studies.report import main as report_main

T1 = 12.706  # t(0.975, 1): two seeds' interval is T1 * sd / sqrt(2) = T1 * |a - b| / 2


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


def test_interval_by_hand():
    # [1, 2, 3]: mean 2, sd 1, t(0.975, 2) = 4.303: half-width 4.303 * 1 / sqrt(3) = 2.484
    figure = report.interval([1.0, 2.0, 3.0])
    assert figure.mean == 2.0 and figure.n == 3 and round(figure.half, 3) == 2.484
    assert report.pm(figure) == "2.00 ± 2.48" and report.pm(figure, 1, 100) == "200.0 ± 248.4"
    single = report.interval([5.0])
    assert single == (5.0, None, 1) and report.pm(single) == "5.00"  # a single seed: no interval


def test_t_quantiles_beyond_the_table_follow_the_expansion():
    # published two-sided 95% quantiles: df 11, 20, 30, 60
    for df, t in ((11, 2.201), (20, 2.086), (30, 2.042), (60, 2.000)):
        assert report.t95(df) == pytest.approx(t, abs=1e-3)
    assert report.t95(10) == 2.228 and report.t95(10) > report.t95(11) > report.t95(1000) > 1.96


def test_rows_by_hand(sweep: Path):
    runs = report.collect_runs(sweep)
    assert [r.complete for r in runs] == [True, True, True, True, False]
    rows = report.summarise(runs)
    none, sundew = rows
    assert none.key.overrides == {"gate": "none"} and sundew.key.overrides == {"gate": "sundew"}
    assert sorted(sundew.runs) == [0, 1]  # by seed; the unfinished seed 2 is not averaged in
    # means and 95% intervals over two seeds: half-width T1 * |a - b| / 2
    assert sundew.figure("val_acc") == pytest.approx((42.0, T1 * 4 / 2, 2))
    assert sundew.figure("train_time_s") == pytest.approx((5.0, T1 * 2 / 2, 2))
    assert sundew.figure("activation_rate") == pytest.approx((0.06, T1 * 0.02 / 2, 2))
    assert sundew.figure("compute_savings") == pytest.approx((0.94, T1 * 0.02 / 2, 2))
    assert none.figure("train_time_s") == pytest.approx((11.0, T1 * 2 / 2, 2))
    # speedup: mean gate=none time 11 s / mean sundew time 5 s
    assert report.speedup(sundew, rows) == pytest.approx(2.2) and report.speedup(none, rows) == pytest.approx(1.0)
    # lossless goal: none's mean final accuracy 52 - 0.3 = 51.7; sundew's epochs (30, 40) and
    # (34, 44) never reach it; none's seed 1 does (54) after its 12 s, of none's mean 11 s
    assert report.time_to_baseline(sundew, rows) == [None, None]
    assert report.time_to_baseline(none, rows) == [None, pytest.approx(12 / 11)]


def test_two_runs_of_one_seed_in_one_row_are_refused(sweep: Path):
    fake_run(sweep, "5_gate=none,seed=0,again", ["gate=none", "seed=0", "resume=auto"], gate="none",
             train_time=10.0)  # resume= never tells rows apart: a second seed 0 of gate=none
    with pytest.raises(ValueError, match="two runs of seed 0"):
        report.summarise(report.collect_runs(sweep))


def test_time_to_full_training_accuracy_by_hand(sweep: Path):
    fake_run(sweep, "5_gate=random,seed=0", ["gate=random", "seed=0", "dataset.root=/data/cifar10"],
             gate="random", train_time=4.0, val_acc=62.0, rate=0.25, target=0.25)
    path, rows, _ = report.write_report(sweep)
    random_row = next(row for row in rows if row.key.overrides == {"gate": "random"})
    # epochs at 52 and 62 %, 2 s each: 52 >= 51.7 after 2 s, of none's mean 11 s
    assert report.time_to_baseline(random_row, rows) == [pytest.approx(2 / 11)]
    assert "| random | 1 | 62.00 | 4.0 | 2.75x | 0.18 |" in path.read_text()  # one seed: no ±


def test_table_and_report_list_the_incomplete_run(sweep: Path):
    path, rows, _ = report.write_report(sweep)
    table = report.table_markdown(rows)
    # 95% intervals: val acc 40, 44 -> 12.706 * 2 = 25.41; times 4, 6 s -> 12.7; rates 0.05, 0.07 -> 0.1271
    assert ("| sundew | 2 | 42.00 ± 25.41 | 5.0 ± 12.7 | 2.20x | not reached by 2 of 2 | 94.0 ± 12.7 | 94.0 ± 12.7 "
            "| 0.0600 ± 0.1271 / 0.06 |") in table
    assert ("| none | 2 | 52.00 ± 25.41 | 11.0 ± 12.7 | 1.00x | not reached by 1 of 2 | 0.0 ± 0.0 | 0.0 ± 0.0 "
            "| 1.0000 ± 0.0000 / 1 |") in table
    text = path.read_text()
    assert table in text and report.INTERVAL_NOTE in text  # the page states its convention
    assert "- `4_gate=sundew,seed=2`: no summary.json: failed or still running (1 of 2 epochs" in text
    assert "dataset.root=/data/cifar10" in text  # a fixed setting, reported once, not a row


def test_one_list_of_placement_keys_names_sweep_directories_rows_and_resumable_changes():
    exclude = OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys
    assert list(exclude) == list(PLACEMENT_KEYS)  # Hydra's YAML cannot import it: held equal here
    assert report.NOT_ROW_KEYS == {"seed", *PLACEMENT_KEYS}
    assert all(resumable_change(key) for key in PLACEMENT_KEYS)


@pytest.mark.slow
def test_the_library_imports_without_matplotlib_or_wandb():
    """Plotting and W&B load when used (the record contract it reads comes with adaptive_sparse,
    and so with torch)."""
    code = "import sys, scripts.studies.analysis; print(sorted({'matplotlib', 'wandb_workspaces'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_metric_axis_labels():
    assert Metric().axis_label() == "validation accuracy (%)"
    assert Metric("val_loss", False).axis_label(final=True) == "final validation loss (nats)"


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
    rows = report.summarise(report.collect_runs(tmp_path))
    by_setting = {tuple(r.key.overrides.values()): r for r in rows}
    assert report.speedup(by_setting[("sundew", "dense")], rows) == pytest.approx(10 / 5)
    assert report.speedup(by_setting[("sundew", "sparse")], rows) == pytest.approx(8 / 2)


def test_no_speedup_without_a_gate_none_run(tmp_path: Path):
    fake_run(tmp_path, "0", ["gate=random"], gate="random", train_time=3.0)
    fake_run(tmp_path, "1", ["gate=sundew"], gate="sundew", train_time=4.0)
    rows = report.summarise(report.collect_runs(tmp_path))
    assert [report.speedup(r, rows) for r in rows] == [None, None]
    assert "| – |" in report.table_markdown(rows)


def test_wandb_report_is_built_for_the_sweep_group(sweep: Path):
    import wandb_workspaces.reports.v2 as wr

    from adaptive_sparse.training.tracking import CUMULATIVE_WANDB_KEYS, WANDB_KEYS

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
    """The command line, python -m scripts.studies.report SWEEP --wandb."""
    monkeypatch.setattr(report, "network_reachable", lambda *a, **k: False)
    assert report_main([str(sweep), "--wandb"]) == 0
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
    infobatch = next(row for row in rows if row.key.overrides["gate"] == "infobatch")
    assert infobatch.figure("target_rate") is None
    assert infobatch.figure("val_acc") == pytest.approx((50.5, T1 * 1 / 2, 2))
    assert report.curve(infobatch, "epoch_time_s") == ([8.0], [50.5], [50.0], [51.0])  # epoch 2 only
    assert "0.7000 ± 0.0000 / none" in path.read_text()


def test_presets_side_by_side_share_the_gate_none_baseline(tmp_path: Path):
    """gate_ablation and gate_ablation_baselines sit in one directory: the gated rows' speedup
    is measured against the baselines preset's gate=none runs."""
    fake_run(tmp_path / "baselines", "0_gate=none", ["+study=gate_ablation_baselines", "gate=none"],
             gate="none", train_time=12.0)
    fake_run(tmp_path / "gated", "0_gate=random", ["+study=gate_ablation", "gate=random"],
             gate="random", train_time=3.0, rate=0.25, target=0.25)
    rows = report.summarise(report.collect_runs(tmp_path))
    random_row = next(row for row in rows if row.key.overrides["gate"] == "random")
    assert report.speedup(random_row, rows) == pytest.approx(4.0)


def test_a_studys_records_share_rows_whether_they_name_the_preset_experiment_or_study(tmp_path: Path):
    """Records written before conf/study say `+experiment=NAME`, new runs `+study=NAME`: one
    preset column (named after the first key the runs set), the same rows, one baseline."""
    fake_run(tmp_path, "old", ["+experiment=convergence", "gate=none", "seed=0"], gate="none", train_time=10.0)
    fake_run(tmp_path, "new", ["+study=convergence", "gate=none", "seed=1"], gate="none", train_time=14.0)
    fake_run(tmp_path, "gated", ["+study=convergence_infobatch", "gate=infobatch", "seed=0"], gate="infobatch",
             train_time=6.0, rate=0.5, target=0.5)
    path, rows, _ = report.write_report(tmp_path)
    assert {row.key.label: sorted(row.runs) for row in rows} == {
        "experiment=convergence, gate=none": [0, 1], "experiment=convergence_infobatch, gate=infobatch": [0]}
    infobatch = next(row for row in rows if row.key.overrides["gate"] == "infobatch")
    assert report.speedup(infobatch, rows) == pytest.approx(2.0)  # the mean of 10 s and 14 s over 6 s
    assert "(all but `gate`, `gate.*`, `+experiment`, `+study` and `seed`)" in path.read_text()
