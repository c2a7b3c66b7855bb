"""The Hugging Face Trainer subclass on the real Trainer with a tiny random GPT-2 built in code:
the example's epochs at the target rate, a resumed run training what an uninterrupted one trains,
checkpoints from inside an epoch refused on resume, and one-line refusals. Slow: each trains."""
from __future__ import annotations

import json

import pytest
import torch

from adaptive_sparse import RandomGate, SundewGate

pytestmark = pytest.mark.slow


def _callbacks(stop_after: int | None = None):
    """A callback recording each epoch's trained indices (from the sampler, at the epoch's end) and,
    with `stop_after`, stopping the run after that many epochs (the epoch's checkpoint still saved)."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.chosen: dict[int, list[int]] = {}

        def on_epoch_end(self, args, state, control, train_dataloader=None, **kwargs):
            sampler = train_dataloader.batch_sampler
            self.chosen[sampler.epoch] = torch.cat([idx for idx, _ in sampler.batches]).tolist()
            if stop_after is not None and len(self.chosen) == stop_after:
                control.should_training_stop = True

    return Record()


def test_the_hf_example_trains_each_epoch_at_about_the_target_rate_and_learns(tmp_path):
    from examples import hf_sundew

    out = tmp_path / "epochs.json"
    records = hf_sundew.main(["--epochs", "2", "--samples", "256", "--json", str(out)])
    assert json.loads(out.read_text()) == records and [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["samples_seen"] == 256
        assert abs(record["activation_rate"] - 0.5) <= 0.05
    assert records[-1]["held_out_loss"] < 0.9 * torch.log(torch.tensor(16.0)).item()  # below a uniform guess


def test_a_run_resumed_from_epoch_1s_checkpoint_trains_epoch_2_as_the_uninterrupted_run(tmp_path):
    """Both runs are asked for 2 epochs (one learning-rate schedule); one stops after its first,
    checkpoint saved, and a third run resumes from that checkpoint."""
    from examples import hf_sundew

    args = ["--samples", "256", "--epochs", "2"]
    whole = _callbacks()
    uninterrupted = hf_sundew.main([*args, "--output-dir", str(tmp_path / "whole")], callbacks=(whole,))
    hf_sundew.main([*args, "--output-dir", str(tmp_path / "cut")], callbacks=(_callbacks(stop_after=1),))
    resumed_part = _callbacks()
    resumed = hf_sundew.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"], callbacks=(resumed_part,))
    assert list(resumed_part.chosen) == [2]  # only the second epoch ran
    assert resumed_part.chosen[2] == whole.chosen[2] and len(whole.chosen[2]) > 0
    assert [r["samples_trained"] for r in resumed] == [r["samples_trained"] for r in uninterrupted]


def _trainer(tmp_path, gate=None, **training):
    from transformers import TrainingArguments, default_data_collator

    from adaptive_sparse.integrations.hf import SelectingTrainer
    from examples import hf_sundew

    data = hf_sundew.make_sequences(64)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", **{"num_train_epochs": 1, **training})
    return SelectingTrainer(model=hf_sundew.tiny_gpt2(), args=args, train_dataset=data,
                            data_collator=default_data_collator, gate=gate or RandomGate(64, 0.5))


def test_a_checkpoint_saved_inside_an_epoch_is_marked_and_refused_on_resume(tmp_path):
    from adaptive_sparse.integrations.hf import SAMPLER_FILE

    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()  # saving inside the epoch does not stop the run
    assert torch.load(tmp_path / "checkpoint-2" / SAMPLER_FILE, weights_only=False) == {"mid_epoch": 1}
    with pytest.raises(ValueError, match="was saved inside epoch 1, where the sampler cannot resume"):
        _trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_misuse_is_refused_in_one_line_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 is not supported"):
        _trainer(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gate=SundewGate needs a scoring forward"):
        _trainer(tmp_path, gate=SundewGate(64, 0.5, scoring="forward"))
    foreign = tmp_path / "checkpoint-7"
    foreign.mkdir()
    with pytest.raises(ValueError, match="holds no adaptive_sparse_sampler.pt"):
        _trainer(tmp_path).train(resume_from_checkpoint=str(foreign))


def test_a_pruned_epoch_is_dealt_evenly_into_the_first_epochs_steps(tmp_path):
    """InfoBatch trains everything in epoch 1 (8 steps of 8) and prunes in epoch 2: its fewer samples
    come in the same 8 steps, sizes differing by at most one, each with its own weights."""
    from transformers import TrainerCallback

    from adaptive_sparse import InfoBatchGate

    sizes: dict[int, list[int]] = {}
    trainer = _trainer(tmp_path, gate=InfoBatchGate(64, epochs=4, seed=0), num_train_epochs=2, save_strategy="no")

    class Sizes(TrainerCallback):
        def on_epoch_end(self, args, state, control, train_dataloader=None, **kwargs):
            sampler = train_dataloader.batch_sampler
            sizes[sampler.epoch] = [len(idx) for idx, _ in sampler.batches]

    trainer.add_callback(Sizes())
    trainer.train()
    assert sizes[1] == [8] * 8 and len(sizes[2]) == 8 and sum(sizes[2]) < 64
    assert max(sizes[2]) - min(sizes[2]) <= 1
    assert trainer.state.global_step == 16
