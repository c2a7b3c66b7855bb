"""How far back a trained language model reads: the same characters predicted with less and
less context before them.

    python -m scripts.studies.context_use multirun/long-context-rope/runs \\
        --data ../shared/data/shakespeare_char --json docs/results/long-context-rope/context_use.json

For every full validation window of the run's context T (stride T, no overlap), the last SCORED
(64) characters are predicted from the c characters before and among them, for c = 128, 256, ...,
T: the model sees only the window's last c inputs, so each scored character has between c - 64
and c - 1 characters of context. The same characters at every c, so the loss at c against the
loss at T is paired window by window: `gain` is the mean over windows of loss(c) - loss(T), with a
95% Student-t interval over windows (each a separate stretch of text). A gain at c = 128 whose
interval lies above 0 says the model uses context beyond 128 characters; a model that cannot see
past a local window (sparse attention keeping only the own block and the one before) gains
nothing there. Positions are rotary (relative), so a shorter input is the same model reading less.
One pass per run and c in fp32; the record (--json) holds the losses and gains by c, the command
and the hardware, and a plot beside it; the study's page (scripts/studies/recipe.py) shows it
when it sits beside the page.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptive_sparse.training.tracking import code_version, hardware_description
from scripts.studies import analysis, recipe

SCORED = 64  # the characters predicted at the end of each window
SHORTEST = 128  # the least context tried; then doubling up to the window


def contexts_for(window: int) -> list[int]:
    """128, 256, ... up to `window`, which is always last."""
    contexts = [c for c in (SHORTEST << i for i in range(16)) if c < window]
    return contexts + [window]


def run_config(run_dir: Path, data_root: str):
    """The run's resolved config, its dataset read from `data_root` (the same split and encoding)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.dataset.root, cfg.dataset.download = data_root, False
    return cfg


def validation_windows(cfg) -> tuple[torch.Tensor, int]:
    """Every full validation window of the run's context + 1 tokens, at stride context:
    [W, context + 1]; and the vocabulary's size."""
    from adaptive_sparse.training.data.text import load_shakespeare_char

    data, context = load_shakespeare_char(cfg.dataset), int(cfg.task.block_size)
    tokens = data.val.tokens
    starts = range(0, len(tokens) - context, context)
    return torch.stack([tokens[s:s + context + 1] for s in starts]), data.vocab_size


def load_model(run_dir: Path, cfg, vocab_size: int) -> torch.nn.Module:
    """The run's model as its config builds it, with the weights of its last checkpoint."""
    from hydra.utils import instantiate

    from adaptive_sparse.training.checkpoint import load_checkpoint

    model = instantiate(cfg.model, vocab_size=vocab_size)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    return model.eval()


@torch.no_grad()
def scored_losses(model: torch.nn.Module, windows: torch.Tensor, context: int, batch: int = 4) -> torch.Tensor:
    """Each window's mean loss over its last SCORED characters, predicted from its last `context`
    inputs: [W]. windows: [W, T + 1]."""
    T = windows.shape[1] - 1
    out = []
    for chunk in windows.split(batch):
        inputs, targets = chunk[:, T - context:T], chunk[:, T - SCORED + 1:]  # [b, context], [b, SCORED]
        logits = model(inputs)[:, -SCORED:].float()  # [b, SCORED, V]
        out.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1))
    return torch.cat(out)


def context_use(model: torch.nn.Module, windows: torch.Tensor) -> dict:
    """The scored loss at each context and its gain over the full window's, paired by window."""
    T = windows.shape[1] - 1
    with warnings.catch_warnings():  # a short input under sparse attention keeps every key: dense, as meant here
        warnings.filterwarnings("ignore", message="attention.top_k=.*every query keeps every key")
        losses = {c: scored_losses(model, windows, c) for c in contexts_for(T)}  # each [W]
    gains = {}
    for c, loss in losses.items():
        if c < T:
            estimate = analysis.interval((loss - losses[T]).tolist())
            gains[str(c)] = {"mean": estimate.mean, "interval": estimate.half}
    return {"loss": {str(c): loss.mean().item() for c, loss in losses.items()}, "gain_of_full_window_over": gains,
            "windows": len(windows)}


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for run in record["runs"]:
        contexts = sorted(int(c) for c in run["loss"])
        ax.plot(contexts, [run["loss"][str(c)] for c in contexts], marker="o", label=run["name"], linewidth=1.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("characters of context the model is given")
    ax.set_ylabel(f"validation loss on each window's last {SCORED} characters (nats)")
    ax.set_title("How far back each model reads: the same characters, less context", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the study's sweep directory (run directories with checkpoints)")
    parser.add_argument("--data", required=True, help="the shakespeare_char folder (its input.txt)")
    parser.add_argument("--json", type=Path, required=True, help="the record to write; the plot goes beside it")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [r for r in analysis.collect_runs(args.sweep)
            if r.complete and (r.path / "checkpoints" / "last.pt").exists()]
    if not runs:
        raise SystemExit(f"{args.sweep}: no finished run with checkpoints/last.pt")
    study = recipe.study_of(runs)
    found = sorted(recipe.recipe_runs(runs, study), key=lambda r: (r.kind != "dense", r.kind, r.top_k or 0, r.seed))
    windows: dict[int, tuple[torch.Tensor, int]] = {}  # by context: the windows and the vocabulary
    rows = []
    for r in found:
        cfg = run_config(r.run.path, args.data)
        context = int(cfg.task.block_size)
        if context not in windows:
            windows[context] = validation_windows(cfg)
        tokens, vocab = windows[context]
        rows.append({"run": r.run.path.name, "name": r.name, "kind": r.kind, "top_k": r.top_k, "seed": r.seed,
                     "context": context, "val_loss": r.final,
                     **context_use(load_model(r.run.path, cfg, vocab), tokens)})
        print(f"{r.name:>20}: " + ", ".join(f"{c} {loss:.4f}" for c, loss in rows[-1]["loss"].items()) + "; gain of "
              f"{context} over " + ", ".join(f"{c}: {g['mean']:+.4f} ± {g['interval']:.4f}"
                                             for c, g in rows[-1]["gain_of_full_window_over"].items()), flush=True)
    record = {"command": "python -m scripts.studies.context_use " + shlex.join(argv or sys.argv[1:]),
              "hardware": hardware_description(torch.device("cpu")), **code_version(),
              "scored": SCORED, "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
