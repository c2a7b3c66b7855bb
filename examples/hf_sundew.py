"""The selecting sampler in the Hugging Face Trainer: a tiny causal language model on made-up text.

    pip install .[hf]
    python examples/hf_sundew.py --epochs 3

A one-layer GPT-2 (32 wide, 16-token vocabulary), built from a config in code with random
weights (nothing is downloaded), learns 512 made-up sequences: counting up mod 16 from a random
start by a random stride (1 or 3), the first 2 tokens of each not scored (labels -100). The
sundew gate picks, before loading, half of each epoch's sequences (`SelectingTrainer`); each
sequence's loss is the mean over its scored tokens. Prints each epoch's activation rate and the
final loss on held-out sequences; `--json` writes the per-epoch records; checkpoints are saved at
each epoch's end under --output-dir, and `--resume` continues from the last one there.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments, default_data_collator
from transformers.utils import logging as hf_logging

from adaptive_sparse import SundewGate
from adaptive_sparse.integrations.hf import SelectingTrainer

VOCAB, LENGTH, PROMPT = 16, 16, 2


def make_sequences(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n examples {input_ids, labels} [LENGTH]: start + stride * t mod VOCAB, the first PROMPT labels -100."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(0, 2, (n, 1), generator=g) * 2 + 1
    ids = (start + stride * torch.arange(LENGTH)) % VOCAB
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target-rate", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--output-dir", type=Path, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--json", type=Path, help="write the per-epoch records here")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.exit(2, f"hf_sundew: --epochs {args.epochs}: nothing would train; pass 1 or more\n")
    return args


def main(argv: list[str] | None = None, callbacks: tuple[TrainerCallback, ...] = ()) -> list[dict]:
    """Train; returns (and prints) each epoch's record, the last with the held-out loss. `callbacks`
    join the trainer's (a test records what each epoch trained, or stops early)."""
    args = parse(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the checkpoint writer's bars
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or Path(scratch)
        train_set, held_out = make_sequences(args.samples, seed=0), make_sequences(128, seed=1)
        training = TrainingArguments(output_dir=str(output_dir), num_train_epochs=args.epochs,
                                     per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
                                     learning_rate=3e-3, save_strategy="epoch", logging_strategy="no",
                                     report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        gate = SundewGate(len(train_set), args.target_rate, scoring="memory", seed=0)
        trainer = SelectingTrainer(model=tiny_gpt2(), args=training, train_dataset=train_set, eval_dataset=held_out,
                                   data_collator=default_data_collator, gate=gate,
                                   callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=True if args.resume else None)
        held_out_loss = trainer.evaluate()["eval_loss"]
    records = [dict(r) for r in trainer.epochs]
    records[-1]["held_out_loss"] = held_out_loss
    if trainer.is_world_process_zero():  # under torchrun: every rank holds the same global records
        for record in records:
            print(f"epoch {record['epoch']}: trained {record['samples_trained']} of {record['samples_seen']} "
                  f"sequences (activation rate {record['activation_rate']:.3f})")
        print(f"held-out loss {held_out_loss:.3f} (uniform guess: {torch.log(torch.tensor(float(VOCAB))):.3f})")
        if args.json:
            args.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
