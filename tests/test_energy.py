"""energy=none adds nothing; energy=codecarbon runs offline and says where its figure came from."""
import importlib.util

import pytest
import torch

from adaptive_sparse.energy import NullMeter, RaplMeter, make_energy_meter
from conftest import read_run, run_train


def test_energy_none_adds_nothing(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "gate=none", "energy=none")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert summary["energy_kwh"] is None and summary["energy_source"] == "none"
    assert records[0]["energy_kwh"] is None
    assert isinstance(make_energy_meter("none", torch.device("cpu")), NullMeter)


@pytest.mark.skipif(importlib.util.find_spec("codecarbon") is None, reason="codecarbon is not installed")
def test_energy_codecarbon_runs_offline_and_labels_its_source(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "gate=none", "energy=codecarbon")
    assert result.returncode == 0, result.stderr[-3000:]
    _, summary = read_run(tmp_path / "run")
    expected = "measured" if RaplMeter.available() else "estimated"
    assert summary["energy_source"] == expected
    assert summary["energy_kwh"] > 0
