"""On a CUDA device (skipped without one): the app trains there (a gated run; FastNet's recipe with
a packed gate in bf16), a checkpoint crosses between the GPU and the CPU both ways, and the phase
timer waits for the GPU before it reads the clock. The project never needs a GPU to build or test;
scripts/gpu_check.py runs this folder on a lent one. Every model and attention on CUDA against the
CPU: test_models_cuda.py."""
import pytest
import torch
from conftest import TINY, read_run, run_train, train_directly

from adaptive_sparse.training.metering import PhaseTimer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_a_gated_run_trains_on_cuda_in_bf16(tmp_path):
    train_directly(tmp_path / "run", *TINY, "device=cuda", "training.precision=bf16", "gate=random",
                   "gate.target_rate=0.5", "training.limit_train_batches=4")
    records, summary = read_run(tmp_path / "run")
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"
    assert 0.3 <= records[-1]["activation_rate"] <= 0.7


def test_fastnets_recipe_with_a_packed_gate_trains_full_batches_on_cuda(tmp_path):
    """What the GPU check times, small: the whitening fitted on the GPU, lookahead, the triangular
    schedule, the six-view TTA, sundew's memory scoring; every step a full packed batch (the
    recipe's pack_remainder=carry)."""
    summary = train_directly(tmp_path / "run", *TINY, "+experiment=fastnet", "model.widths=[16,32,32]",
                             "training.batch_size=64", "training.epochs=2", "gate=sundew_memory",
                             "gate.target_rate=0.5", "gate.pack=true", "device=cuda", "training.precision=bf16")
    records, _ = read_run(tmp_path / "run")
    assert all(r["samples_trained"] == 64 * r["optimizer_steps"] > 0 for r in records)
    assert 0.3 <= summary["activation_rate"] <= 0.7 and summary["val_acc_tta2"] > 10.0  # above chance


@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(tmp_path, first, then):
    """SIGTERM at the 6th training forward (packed at 0.5: about 4 steps an epoch) saves the run
    inside an epoch: gate memory, packed samples waiting, RNGs and optimiser state cross devices."""
    run = [*TINY, "training.epochs=2", "training.batch_size=64", "gate=sundew_memory", "gate.target_rate=0.5",
           "gate.pack=true", "training.pack_remainder=carry"]
    cut = run_train(tmp_path / "run", *run, f"device={first}", "debug.signal_at_step=6")
    assert cut.returncode == 143, cut.stderr[-2000:]
    resumed = run_train(tmp_path / "run", *run, f"device={then}", "resume=true")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    records, summary = read_run(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2] and summary["device"].startswith(then)
    assert summary["val_acc"] > 10.0 and summary["samples_seen"] == 2 * 512


def test_the_phase_timer_waits_for_the_gpu():
    """Without a synchronise the phase would hold only the launches (well under a millisecond)."""
    timer, x = PhaseTimer(torch.device("cuda")), torch.randn(4096, 4096, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with timer.phase("train_step"):
        start.record()
        for _ in range(20):  # ~55 ms of fp32 products on an H100
            x = torch.tanh(x @ x)
        end.record()
    end.synchronize()
    on_gpu_s = start.elapsed_time(end) / 1000
    assert on_gpu_s > 0.005 and timer.seconds["train_step"] >= 0.9 * on_gpu_s
