"""scripts/bench_gates.py's arithmetic on fabricated runs (the benchmark itself is long)."""
import pytest

from scripts import bench_gates as bench


def fake_run(epoch_times, accs, flops_executed, rate, scoring_time=0.0):
    records = [{"epoch": i + 1, "epoch_time_s": t, "val_acc": a, "data_time_s": 0.1 * t,
                "scoring_time_s": scoring_time, "train_step_time_s": 0.5 * t, "activation_rate": rate,
                "flops_executed": flops_executed, "flops_training": 100.0, "compute_savings": 0.0,
                "sample_savings": 1 - rate, "optimizer_steps": 10, "flops_scoring": 0.0, "samples_seen": 64} for i, (t, a) in enumerate(zip(epoch_times, accs))]
    return {"records": records, "summary": {"val_acc": accs[-1], "flops_per_sample_forward": 1.0,
                                            "flops_per_sample_train": 3.0}}


def test_time_to_accuracy_sums_training_time_until_the_level_is_reached():
    records = fake_run([10, 20, 30], [15, 25, 35], 1, 1)["records"]
    assert bench.time_to_accuracy(records, 25) == 30
    assert bench.time_to_accuracy(records, 40) is None
    records[1]["val_acc"] = None  # an epoch without evaluation counts its time, cannot reach the level
    assert bench.time_to_accuracy(records, 25) == 60


def test_rows_take_medians_over_repeats_and_ratios_against_none():
    runs = {"none": [fake_run([12, 10], [20, 30], 1000, 1.0), fake_run([12, 14], [20, 30], 1000, 1.0),
                     fake_run([12, 12], [20, 30], 1000, 1.0)],
            "sundew-memory": [fake_run([5, 3], [10, 21], 100, 0.1)]}
    rows = [bench.row_for(name, r, epoch=2, accuracies=[20], peak=1e3) for name, r in runs.items()]
    bench.add_ratios(rows, target_rate=0.1)
    none, memory = rows
    assert none["epoch_time_s"] == 12  # median of 10, 14, 12
    assert memory["speedup_vs_none"] == pytest.approx(12 / 3)
    assert memory["flops_ratio_vs_none"] == pytest.approx(0.1)
    assert memory["ideal_speedup_from_flops"] == pytest.approx(10.0)
    assert memory["time_to_acc_s"]["20"] == 8  # reached in epoch 2: 5 + 3
    assert none["ideal_cost_model"] == 1.0 and memory["ideal_cost_model"] == 0.1
    assert memory["mfu_train_step"] == pytest.approx(100 / 1.5 / 1e3)  # 100 FLOPs in 1.5 s, peak 1e3


def test_runs_folder_is_recorded_relative_inside_the_repo_and_absolute_outside(tmp_path):
    assert bench.runs_dir_name(bench.ROOT / "outputs" / "bench_gates" / "x") == "outputs/bench_gates/x"
    assert bench.runs_dir_name(tmp_path / "x") == str(tmp_path / "x")  # --out /tmp/...: no crash at the end


@pytest.mark.parametrize("name", sorted(bench.CONFIGS))
def test_every_configuration_composes_with_the_shared_overrides(name):
    """The runs' overrides compose for every gate, gate=none included: the rate goes in as
    `budget`, since the gates' options hold no `target_rate` key to override."""
    from conftest import compose_config
    cfg = compose_config([*bench.CONFIGS[name], *bench.shared_overrides(0.25, 2, 62, "cpu", ["training.num_threads=2"])])
    assert cfg.budget == 0.25 and cfg.training.epochs == 2 and cfg.training.limit_train_batches == 62
