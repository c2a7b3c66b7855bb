"""What gating really saves: none, random, sundew (forward scoring) and sundew (memory scoring)
side by side, through train.py itself, on one machine, in one invocation.

    python scripts/bench_gates.py --dataset-root ../shared/data/cifar10 \
        --target-rate 0.1 --epochs 2 --limit-train-batches 150 --json bench_gates.json

Each configuration is a `python train.py ...` subprocess (the project's own training loop, no
second one). Runs are interleaved round-robin over `--repeats`, so machine drift hits every
configuration alike; per configuration the median over repeats is reported. Speedups are
wall-clock ratios against `gate=none` measured in this invocation, on the epoch given by
`--compare-epoch` (default: the last; epoch 1 includes warm-up). The FLOPs columns come from
torch's flop counter (summary.json); MFU is the training step's counted FLOPs over its wall-clock,
against this machine's matmul peak measured here first in the precision the runs used (fp32 or
bf16: bf16 autocast runs its matmuls and convolutions in bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from adaptive_sparse.training.records import short_source, time_to_accuracy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "none": ["gate=none"],
    "random": ["gate=random"],
    "random-packed": ["gate=random", "gate.pack=true"],
    "sundew-forward": ["gate=sundew", "gate.scoring=forward"],
    "sundew-memory": ["gate=sundew", "gate.scoring=memory"],
    "sundew-memory-packed": ["gate=sundew", "gate.scoring=memory", "gate.pack=true"],
    "sundew-proxy": ["gate=sundew", "gate.scoring=proxy"],
    "sundew-proxy-packed": ["gate=sundew", "gate.scoring=proxy", "gate.pack=true"],
    # airbench's selection: the proxy's highest-loss share of every batch, one step per batch
    "keep-top-proxy": ["gate=sundew", "gate.scoring=proxy", "gate.selection=top", "gate.exploration=0",
                       "gate.weights.entropy=0", "gate.weights.learning_value=0"],
}
DEFAULT_CONFIGS = "none,random,sundew-forward,sundew-memory"


def measure_matmul_peak(device: str, dtype: torch.dtype = torch.float32, size: int = 2048, reps: int = 5) -> float:
    """Best matmul FLOP/s of `reps` timed [size x size] products in `dtype` (after one warm-up)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def runs_dir_name(out: Path) -> str:
    """The runs folder as the JSON records it: relative to the repository when inside it."""
    return str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)


def run_config(name: str, overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "summary": json.loads((run_dir / "summary.json").read_text())}


def row_for(name: str, runs: list[dict], epoch: int, accuracies: list[float], peak: float) -> dict:
    """Medians over repeats of one configuration's figures on the compared epoch."""
    epoch_records = [run["records"][epoch - 1] for run in runs]
    median = lambda key: statistics.median(r[key] for r in epoch_records)
    summaries = [run["summary"] for run in runs]
    step_flops_per_s = median("flops_training") / max(median("train_step_time_s"), 1e-12)
    return {
        "config": name,
        "epoch_time_s": median("epoch_time_s"),
        "data_time_s": median("data_time_s"),
        "scoring_time_s": median("scoring_time_s"),
        "train_step_time_s": median("train_step_time_s"),
        "data_share": median("data_time_s") / median("epoch_time_s"),
        "activation_rate": median("activation_rate"),
        "optimizer_steps": median("optimizer_steps"),
        # FLOPs spent on scoring per sample seen (a forward, or a proxy's forward and training)
        "scoring_flops_per_sample": median("flops_scoring") / median("samples_seen"),
        "flops_executed": median("flops_executed"),
        "compute_savings": median("compute_savings"),
        "sample_savings": median("sample_savings"),
        "val_acc": statistics.median(s["val_acc"] for s in summaries),
        # the figure the run's task is judged by (val_acc; val_loss for task=char_lm)
        "metric": summaries[0].get("metric", "val_acc"),
        "metric_value": statistics.median(s[summaries[0].get("metric", "val_acc")] for s in summaries),
        "mfu_train_step": step_flops_per_s / peak,
        "time_to_acc_s": {f"{a:g}": _median_or_none([time_to_accuracy(r["records"], a) for r in runs])
                          for a in accuracies},
        "epoch_times_s": [run["records"][epoch - 1]["epoch_time_s"] for run in runs],
        "flops_per_sample_forward": summaries[0]["flops_per_sample_forward"],
        "flops_per_sample_train": summaries[0]["flops_per_sample_train"],
    }


def _median_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def add_ratios(rows: list[dict], target_rate: float) -> None:
    """Speedup and FLOPs ratio against gate=none of this invocation, and the ideal the FLOPs imply."""
    base = next(r for r in rows if r["config"] == "none")
    for row in rows:
        row["speedup_vs_none"] = base["epoch_time_s"] / row["epoch_time_s"]
        row["flops_ratio_vs_none"] = row["flops_executed"] / base["flops_executed"]
        row["ideal_speedup_from_flops"] = 1.0 / row["flops_ratio_vs_none"]
    forward_share = base["flops_per_sample_forward"] / base["flops_per_sample_train"]
    for row in rows:  # the FLOP model of docs/measuring.md: forward scoring ~ f + r, memory ~ r
        row["ideal_cost_model"] = (1.0 if row["config"] == "none"
                                   else forward_share + target_rate if row["config"] == "sundew-forward"
                                   else row["scoring_flops_per_sample"] / base["flops_per_sample_train"]
                                   + target_rate)


def markdown_table(rows: list[dict], accuracies: list[float], epoch: int) -> str:
    acc_cols = "".join(f" time to {a:g}% (s) |" for a in accuracies)
    lines = [f"| gate | epoch {epoch} time (s) | speedup vs none | ideal (1 / FLOPs ratio) | FLOPs ratio "
             f"| optimiser steps | scoring FLOPs / sample (share of a train step) | compute savings "
             f"| sample savings | activation rate | data share | MFU (train step) | val acc (%) |{acc_cols}",
             "|" + "---|" * (13 + len(accuracies))]
    for r in rows:
        reached = [r["time_to_acc_s"][f"{a:g}"] for a in accuracies]
        accs = "".join(f" {t:.1f} |" if t is not None else " - |" for t in reached)
        lines.append(
            f"| {r['config']} | {r['epoch_time_s']:.1f} | {r['speedup_vs_none']:.2f}x "
            f"| {r['ideal_speedup_from_flops']:.2f}x | {r['flops_ratio_vs_none']:.3f} "
            f"| {r['optimizer_steps']:.0f} | {r['scoring_flops_per_sample'] / 1e6:.1f}M "
            f"({r['scoring_flops_per_sample'] / r['flops_per_sample_train']:.3f}) "
            f"| {100 * r['compute_savings']:.1f}% | {100 * r['sample_savings']:.1f}% "
            f"| {r['activation_rate']:.3f} | {100 * r['data_share']:.1f}% | {100 * r['mfu_train_step']:.1f}% "
            f"| {r['val_acc']:.2f} |{accs}")
    return "\n".join(lines)


def shared_overrides(target_rate: float, epochs: int, limit_train_batches: int | None, device: str,
                     overrides: list[str], dataset_root: str | None = None) -> list[str]:
    """train.py overrides every configuration takes. The rate goes in as `budget`, which only the
    gates with a target rate read: gate=none has no `gate.target_rate` to override."""
    common = [f"budget={target_rate}", f"training.epochs={epochs}",
              f"training.limit_train_batches={limit_train_batches or 'null'}", f"device={device}",
              "wandb.mode=disabled", "progress=false", *overrides]
    return common + ([f"dataset.root={dataset_root}"] if dataset_root else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-root", default=None, help="dataset.root (default: the config's search)")
    parser.add_argument("--target-rate", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train-batches", type=int, default=150, help="0: whole epochs")
    parser.add_argument("--compare-epoch", type=int, default=None, help="default: the last epoch")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, from {', '.join(CONFIGS)} (none is always run first)")
    parser.add_argument("--accuracies", default="20,30", help="comma-separated val_acc levels (percent)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="outputs/bench_gates", help="folder for the runs")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = parser.parse_args()

    epoch = args.compare_epoch or args.epochs
    accuracies = [float(a) for a in args.accuracies.split(",") if a]
    peaks = {name: measure_matmul_peak(args.device, dtype) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(", ".join(f"{k} matmul peak on {args.device}: {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()),
          flush=True)
    common = shared_overrides(args.target_rate, args.epochs, args.limit_train_batches, args.device, args.overrides,
                              args.dataset_root)
    names = ["none", *(n for n in args.configs.split(",") if n and n != "none")]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    out = ROOT / args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):  # round-robin: drift hits every configuration alike
        for name in names:
            runs[name].append(run_config(name, CONFIGS[name] + common, out / f"{name}_r{repeat}"))

    precision = runs["none"][0]["summary"].get("precision", "fp32")
    peak = peaks["bf16" if precision == "bf16" else "fp32"]  # fp16: no CPU peak measured; fp32's
    rows = [row_for(name, runs[name], epoch, accuracies, peak) for name in names]
    add_ratios(rows, args.target_rate)
    table = markdown_table(rows, accuracies, epoch)
    print(table)
    summary = {"command": " ".join(sys.argv), "precision": precision, "peak_matmul_flops_per_s": peak,
               "peaks_matmul_flops_per_s": peaks, "compare_epoch": epoch, "target_rate": args.target_rate,
               "hardware": runs["none"][0]["summary"].get("hardware"),
               "data_source": short_source(runs["none"][0]["summary"].get("data_source")),
               "torch": torch.__version__, "rows": rows, "table": table, "runs_dir": runs_dir_name(out)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
