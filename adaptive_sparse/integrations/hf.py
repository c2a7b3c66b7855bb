"""The selecting sampler in the Hugging Face Trainer: one Trainer subclass.

    pip install adaptive-sparse[hf]

    from adaptive_sparse.integrations.hf import SelectingTrainer

    gate = SundewGate(len(train_set), target_rate=0.5, scoring="memory")
    trainer = SelectingTrainer(model=model, args=args, train_dataset=train_set, gate=gate)   # was Trainer(...)
    trainer.train()                                     # or train(resume_from_checkpoint=True)

The train loader yields only the samples the gate picks, in batches of
`per_device_train_batch_size`, drawn with `args.seed`. `compute_loss` computes each example's loss
(`per_example_loss`; by default a causal language model's: the mean over the sequence's tokens
whose label is not -100, after the shift), hands them back to the gate and returns the loss to
backpropagate: their mean, or the gate's weighted loss. The dataset needs no index column: the
sampler knows which indices it served. Evaluation is not gated (the plain mean).

Steps: the Trainer counts an epoch's steps once, from the loader's length before training, and
finds the epoch to resume from as global_step // steps per epoch. The sampler plans the first
epoch when that length is read, so it is exact, and every later epoch's selection is dealt
evenly into that many steps (the sampler's `steps`), each with its own weights. Prefer
`num_train_epochs`; `max_steps` works, but a run that stops inside an epoch leaves it unfinished.

Checkpoints: at each save the sampler's state goes into the checkpoint folder beside the
Trainer's (`adaptive_sparse_sampler.pt`), and `train(resume_from_checkpoint=...)` restores it.
The state exists at epoch boundaries only: a save inside an epoch (`save_strategy="steps"`)
writes a marker instead, and resuming from that checkpoint is refused; use
`save_strategy="epoch"` (or steps that fall on epoch ends) for checkpoints to resume from.

Not supported: gradient_accumulation_steps > 1 (refused: the sampler's batches are the steps).
Under torchrun the sampler shards one global order itself and every rank gets as many steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import is_datasets_available

from adaptive_sparse.gating.gates import Gate
from adaptive_sparse.integrations.common import (
    PlannedSampler,
    causal_lm_losses,
    checkpoint_state,
    epoch_record,
    refuse_mid_epoch,
)

SAMPLER_FILE = "adaptive_sparse_sampler.pt"
PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> [B]


class SelectingTrainer(Trainer):
    """A `transformers.Trainer` whose training data a `SelectingBatchSampler` over `gate` picks.

    `per_example_loss(logits, labels)` gives each example's loss [B] (default: `causal_lm_losses`);
    `shuffle`, `pack`, `limit_batches` and `indices` are the sampler's. `epochs` holds one record
    per trained epoch: epoch (1-based), samples_trained and samples_seen summed over ranks, and
    activation_rate, also logged each epoch.
    """

    def __init__(self, *args: Any, gate: Gate, per_example_loss: PerExampleLoss = causal_lm_losses,
                 shuffle: bool = True, pack: bool = True, limit_batches: int | None = None,
                 indices: torch.Tensor | None = None, **kwargs: Any):
        if not gate.can_select_before_loading:
            raise ValueError(f"SelectingTrainer: gate={type(gate).__name__} needs a scoring forward of each loaded "
                             "batch, so it cannot select before loading")
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            steps = self.args.gradient_accumulation_steps
            raise ValueError(f"SelectingTrainer: gradient_accumulation_steps={steps} is not supported: pass 1 and "
                             "raise per_device_train_batch_size instead")
        # compute_loss returns a per-step mean already: no token count across the step is needed.
        self.model_accepts_loss_kwargs = False
        self.gate, self.per_example_loss = gate, per_example_loss
        self.sampler_args = dict(shuffle=shuffle, pack=pack, limit_batches=limit_batches, indices=indices)
        self.sampler: PlannedSampler | None = None
        self.epochs: list[dict] = []
        self.trained = 0  # examples handed back this epoch, on this rank
        self._restored: dict | None = None  # a checkpoint's sampler state, for the sampler not yet built
        self.add_callback(_SamplerInCheckpoints(self))

    def get_train_dataloader(self) -> DataLoader:
        """The training examples the gate picks, collated as the Trainer would (unused columns removed)."""
        if self.train_dataset is None:
            raise ValueError("SelectingTrainer: train_dataset= is required for training")
        if self.sampler is None:
            # Built here, after the Trainer's accelerator has set up torch.distributed: the sampler
            # finds the ranks when it is built.
            self.sampler = PlannedSampler(self.gate, self.args.per_device_train_batch_size, seed=self.args.seed,
                                          **self.sampler_args)
            if self._restored is not None:
                self._load_steps(self._restored)
                self._restored = None
            else:
                self.sampler.steps = max(len(self.sampler), 1)  # the first epoch's exact count, for every epoch
        dataset, collate = self.train_dataset, self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        workers = self.args.dataloader_num_workers
        return DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                          pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=self.args.dataloader_persistent_workers and workers > 0)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Training: each example's loss handed back to the gate, the gate's loss returned.
        Evaluation: the plain mean. `num_items_in_batch` is not used: the loss is a per-step mean."""
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = self.per_example_loss(outputs.logits, labels)  # [B]
        if model.training:
            self.trained += len(losses)
            loss = self.sampler.update(losses, outputs.logits.detach())
        else:
            loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`; resuming also restores the sampler's state saved in that checkpoint."""
        folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if folder:
            self._load_sampler_state(Path(folder))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_sampler_state(self, folder: Path) -> None:
        path = folder / SAMPLER_FILE
        if not path.exists():
            raise ValueError(f"SelectingTrainer: resume_from_checkpoint={folder} holds no {SAMPLER_FILE}: it was not "
                             "saved by a SelectingTrainer")
        state = torch.load(path, weights_only=False)
        refuse_mid_epoch(state, f"SelectingTrainer: resume_from_checkpoint={folder}", " (save_strategy='epoch')")
        self.epochs = list(state["epochs"])
        if self.sampler is None:
            self._restored = state["steps"]
        else:
            self._load_steps(state["steps"])

    def _load_steps(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.sampler.steps = state["steps"]

    def sampler_state(self) -> dict:
        """What a checkpoint keeps: the sampler's state at an epoch boundary (inside an epoch only a
        marker), the steps per epoch, and the epoch records."""
        # the shape the adapter's checkpoints have always had ("steps" held the sampler and the steps
        # per epoch), so checkpoints written before the sampler dealt the steps itself still resume
        return checkpoint_state(self.sampler, lambda: {
            "steps": {"sampler": self.sampler.state_dict(), "steps": self.sampler.steps}, "epochs": list(self.epochs)})


class _SamplerInCheckpoints(TrainerCallback):
    """Counts each epoch's activation rate and writes the sampler's state into each checkpoint."""

    def __init__(self, trainer: SelectingTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.trained = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        record = epoch_record(self.trainer.sampler, self.trainer.trained)  # every rank: a collective
        self.trainer.epochs.append(record)
        self.trainer.log({"activation_rate": record["activation_rate"]})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # every rank holds the same state: one order, merged memories
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            torch.save(self.trainer.sampler_state(), folder / SAMPLER_FILE)


def _is_hf_dataset(dataset: Any) -> bool:
    if not is_datasets_available():
        return False
    import datasets
    return isinstance(dataset, datasets.Dataset)
