"""energy=none adds nothing; energy=codecarbon runs offline and says where its figure came from."""
import json

import pytest
from conftest import compose_config, read_run, run_train
from hydra.utils import instantiate

from adaptive_sparse.training.energy import NullMeter, energy_source

try:
    import codecarbon  # noqa: F401  (only whether it is installed)
    HAS_CODECARBON = True
except ImportError:
    HAS_CODECARBON = False


@pytest.mark.slow
def test_energy_none_adds_nothing(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "gate=none", "energy=none")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert summary["energy_kwh"] is None and summary["energy_source"] == "none"
    assert records[0]["energy_kwh"] is None
    assert isinstance(instantiate(compose_config(["energy=none"]).energy), NullMeter)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CODECARBON, reason="codecarbon is not installed")
def test_energy_codecarbon_runs_offline_and_labels_its_source(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "gate=none", "energy=codecarbon")
    assert result.returncode == 0, result.stderr[-3000:]
    _, summary = read_run(tmp_path / "run")
    assert summary["energy_source"] in ("measured", "estimated")
    assert summary["energy_kwh"] > 0


class _Hardware:
    def __init__(self, mode):
        self._mode = mode


class CPU(_Hardware):
    pass


class RAM(_Hardware):
    pass


def test_energy_is_measured_only_where_codecarbon_reads_a_counter():
    tracker = type("Tracker", (), {})()
    tracker._hardware = [RAM(None), CPU("intel_rapl")]
    assert energy_source(tracker) == "measured"
    tracker._hardware = [RAM(None), CPU("cpu_load")]  # TDP x utilisation: a model (this machine)
    assert energy_source(tracker) == "estimated"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CODECARBON, reason="codecarbon is not installed")
def test_energy_total_continues_across_a_resume(tmp_path, tiny):
    run_dir = tmp_path / "run"
    small = ["dataset.num_train=256", "dataset.num_test=64"]
    assert run_train(run_dir, *tiny, *small, "gate=none", "energy=codecarbon", "training.epochs=2",
                     "debug.inject_nan_at_step=6").returncode == 1  # 4 batches an epoch: stops in epoch 2
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    result = run_train(run_dir, *tiny, *small, "gate=none", "energy=codecarbon", "training.epochs=2", "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(run_dir)
    assert records[0]["energy_kwh"] == first["energy_kwh"] > 0
    assert records[1]["energy_kwh"] > records[0]["energy_kwh"]  # cumulative: epoch 2 adds to epoch 1
    assert summary["energy_kwh"] == records[1]["energy_kwh"]
