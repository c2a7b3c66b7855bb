"""The Lightning callback on the real Trainer: the example's epochs at the target rate, two DDP
processes holding the global rate, a resumed run training what an uninterrupted one trains, and
one-line refusals. All slow: importing Lightning alone takes seconds."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from adaptive_sparse import RandomGate, SundewGate
from conftest import ROOT

pytestmark = pytest.mark.slow


def _recorder():
    """A callback keeping each epoch's trained dataset indices, read from the sampler at the epoch's end."""
    import lightning.pytorch as pl

    from adaptive_sparse.integrations.lightning import SelectingSamplerCallback

    class Record(pl.Callback):
        def __init__(self):
            self.chosen: dict[int, list[int]] = {}

        def on_train_epoch_end(self, trainer, pl_module):
            sampler = SelectingSamplerCallback.of(trainer).sampler
            self.chosen[sampler.epoch] = torch.cat([idx for idx, _ in sampler.batches]).tolist()

        def on_fit_end(self, trainer, pl_module):
            self.state_at_end = SelectingSamplerCallback.of(trainer).state_dict()  # what a last save would keep

    return Record()


def test_the_lightning_example_trains_each_epoch_at_about_the_target_rate(tmp_path):
    from examples import lightning_sundew

    out = tmp_path / "epochs.json"
    records = lightning_sundew.main(["--epochs", "2", "--samples", "1024", "--json", str(out)])
    assert json.loads(out.read_text()) == records and [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["samples_seen"] == 1024
        assert abs(record["activation_rate"] - 0.5) <= 0.03
        assert record["activation_rate"] == record["samples_trained"] / 1024


def test_two_ddp_processes_hold_the_global_rate_within_002_each_epoch(tmp_path):
    """`--devices 2 --strategy ddp` on CPU (gloo): Lightning starts the second process; the records
    are rank 0's, summed over both ranks."""
    out = tmp_path / "epochs.json"
    run = subprocess.run([sys.executable, "examples/lightning_sundew.py", "--epochs", "2", "--samples", "1024",
                          "--devices", "2", "--strategy", "ddp", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["epoch"] for r in records] == [1, 2] and "on 2 process(es)" in run.stdout
    for record in records:
        assert record["samples_seen"] == 1024  # 512 a rank
        assert abs(record["activation_rate"] - 0.5) <= 0.02


def test_a_run_resumed_from_epoch_2s_checkpoint_trains_epoch_3_as_the_uninterrupted_run(tmp_path):
    from examples import lightning_sundew

    args = ["--samples", "512"]
    whole = _recorder()
    uninterrupted = lightning_sundew.main([*args, "--epochs", "3"], callbacks=(whole,))
    lightning_sundew.main([*args, "--epochs", "2", "--checkpoint-dir", str(tmp_path)])
    resumed_part = _recorder()
    resumed = lightning_sundew.main([*args, "--epochs", "3", "--resume", str(tmp_path / "epoch=1.ckpt")],
                                    callbacks=(resumed_part,))
    assert list(resumed_part.chosen) == [3]  # only the third epoch ran
    assert resumed_part.chosen[3] == whole.chosen[3] and len(whole.chosen[3]) > 0
    assert resumed == uninterrupted  # the first two epochs' records came back from the checkpoint
    # Lightning plans a fourth epoch after the third (it reads the length): a save then keeps the state before it
    assert sorted(whole.state_at_end) == ["epochs", "sampler"] and whole.state_at_end["sampler"]["epoch"] == 3


def test_a_checkpoint_from_inside_an_epoch_is_marked_and_refused_on_resume():
    from adaptive_sparse.integrations.common import PlannedSampler
    from adaptive_sparse.integrations.lightning import SelectingSamplerCallback

    callback = SelectingSamplerCallback(RandomGate(64, 0.5), batch_size=8)
    callback.sampler = PlannedSampler(callback.gate, 8)
    next(iter(callback.sampler))  # epoch 1 started, its losses not back
    assert callback.state_dict() == {"mid_epoch": 1}
    with pytest.raises(ValueError, match="saved inside epoch 1, where the sampler cannot resume"):
        callback.load_state_dict(callback.state_dict())


def test_misuse_is_refused_in_one_line_naming_the_argument():
    from adaptive_sparse.integrations.lightning import SelectingSamplerCallback

    with pytest.raises(ValueError, match="gate=SundewGate needs a scoring forward"):
        SelectingSamplerCallback(SundewGate(64, 0.5, scoring="forward"), batch_size=8)
    callback = SelectingSamplerCallback(RandomGate(64, 0.5), batch_size=8)
    with pytest.raises(ValueError, match="the trainer has not set up yet"):
        callback.loader(list(range(64)))
    ddp = SimpleNamespace(world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(ValueError, match=r"pass Trainer\(use_distributed_sampler=False\)"):
        callback.setup(ddp, None, "fit")
    single = SimpleNamespace(world_size=1, reload_dataloaders_every_n_epochs=0)
    callback.setup(single, None, "fit")
    assert single.reload_dataloaders_every_n_epochs == 1  # each epoch's exact length read
    with pytest.raises(ValueError, match="shuffle= is the sampler's to decide"):
        callback.loader(list(range(64)), shuffle=True)
    with pytest.raises(ValueError, match="the trainer has 0 SelectingSamplerCallbacks"):
        SelectingSamplerCallback.of(SimpleNamespace(callbacks=[]))


def test_importing_the_library_loads_neither_lightning_nor_transformers():
    code = ("import sys, adaptive_sparse, adaptive_sparse.integrations, adaptive_sparse.integrations.common; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', "
            "'transformers', 'accelerate'}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]
