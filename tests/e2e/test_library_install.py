"""The library as a user installs it: a fresh interpreter imports the gates and the sampler with
torch and numpy alone (no Hydra, timm, torchvision, matplotlib or W&B), and the torch-only
example trains."""
import subprocess
import sys

from conftest import ROOT

APP_PACKAGES = {"hydra", "omegaconf", "timm", "torchvision", "matplotlib", "wandb"}


def test_importing_the_gates_loads_none_of_the_apps_packages():
    code = ("import sys, adaptive_sparse; from adaptive_sparse import SundewGate, SelectingBatchSampler; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(APP_PACKAGES)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_torch_only_example_runs_as_a_script():
    result = subprocess.run([sys.executable, "examples/minimal_loop.py", "--epochs", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["sundew,", "sundew,", "full"]
