"""Dense against sparse attention, alone, at the ViT's width: time, FLOPs and peak memory per length.

    python -m scripts.bench_attention --seq-lens 256,1024,4096,16384 --json bench_attention.json

For each length n: `DenseAttention` (fused `scaled_dot_product_attention`) and `SparseAttention`
in each variant (`token` and `block` granularity; `token-mask`: token's selection through the
mask kernel), batch 1, dim 192 (3 heads of 64), top-k 64 by default.

- forward: eval mode under `no_grad` (inference; no indexer loss);
- forward+backward: train mode, backward of `out.sum()` plus, for sparse, its indexer loss, i.e.
  what one training step of the layer costs (the indexer's selection and its KL loss included);
- milliseconds: median of `--reps` runs after one warm-up run;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on meta-device copies (matmuls and attention
  kernels; element-wise ops, top-k and gathers count zero by that counter's convention);
- peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set size
  (VmHWM, reset through /proc/self/clear_refs) during one forward+backward, minus the resident
  size just before it, in a fresh subprocess per configuration.

Each (length, variant) runs in its own subprocess so that the memory of one cannot hide
another's. Writes one JSON row per (length, granularity), a PNG plot and a markdown table,
and prints the crossover length from which sparse forward+backward beats dense.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_sparse.attention import DenseAttention, SparseAttention, auxiliary_loss
from adaptive_sparse.training.tracking import hardware_description
from scripts.timing import json_from_child, median_ms

# the sparse variants: attention.granularity, and for token granularity attention.kernel
VARIANTS = {"token": {"granularity": "token"}, "token-mask": {"granularity": "token", "kernel": "mask"},
            "block": {"granularity": "block"}}
GRANULARITIES = tuple(VARIANTS)
COLOURS = ("tab:blue", "tab:green", "tab:red")


# ------------------------------------------------------------------ one configuration (child process)
def build(variant: str, args: argparse.Namespace) -> torch.nn.Module:
    if variant == "dense":
        return DenseAttention(args.dim, args.heads)
    return SparseAttention(args.dim, args.heads, top_k=args.top_k, **VARIANTS[variant],
                           block_size=args.block_size, local_window=args.local_window,
                           global_tokens=args.global_tokens)


def training_step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward and backward of the layer as it trains: output gradient plus its indexer loss."""
    module.train()
    loss = module(x).sum()
    aux = auxiliary_loss(module)
    (loss if aux is None else loss + aux.weighted).backward()


def inference_step(module: torch.nn.Module, x: torch.Tensor) -> None:
    module.eval()
    with torch.no_grad():
        module(x)


def counted_flops(module: torch.nn.Module, shape: tuple[int, ...], backward: bool) -> int:
    meta = copy.deepcopy(module).to("meta")
    x = torch.empty(shape, device="meta", requires_grad=backward)
    with FlopCounterMode(display=False) as counter:
        (training_step if backward else inference_step)(meta, x)
    return counter.get_total_flops()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Peak memory of one step above what was held before it, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda max_memory_allocated"
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    step()
    return (rss_kib("VmHWM") - before) / 1024, "cpu peak RSS (VmHWM) increase, fresh process"


def measure(variant: str, n: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    module = build(variant, args).to(device)
    shape = (args.batch, n, args.dim)
    x = torch.randn(shape, device=device, requires_grad=True)
    train = lambda: training_step(module, x)  # noqa: E731
    memory_mb, memory_method = peak_memory_mb(train, device)  # first, before anything is cached
    module.zero_grad(set_to_none=True)
    return {
        "fwd_ms": median_ms(lambda: inference_step(module, x), args.reps, sync),
        "fwd_bwd_ms": median_ms(train, args.reps, sync),
        "fwd_flops": counted_flops(module, shape, backward=False),
        "flops": counted_flops(module, shape, backward=True),
        "peak_mem_mb": memory_mb,
        "memory_method": memory_method,
    }


# ------------------------------------------------------------------ the sweep (parent process)
def run_child(variant: str, n: int, argv: list[str]) -> dict:
    return json_from_child([sys.executable, "-m", "scripts.bench_attention", *argv, "--child", variant,
                            "--n", str(n)], f"{variant} at n={n}")


def rows_for_length(n: int, granularities: list[str], argv: list[str]) -> list[dict]:
    dense = run_child("dense", n, argv)
    rows = []
    for granularity in granularities:
        sparse = run_child(granularity, n, argv)
        rows.append({
            "seq_len": n, "granularity": granularity,
            "dense_fwd_ms": dense["fwd_ms"], "sparse_fwd_ms": sparse["fwd_ms"],
            "dense_fwd_bwd_ms": dense["fwd_bwd_ms"], "sparse_fwd_bwd_ms": sparse["fwd_bwd_ms"],
            "dense_flops": dense["flops"], "sparse_flops": sparse["flops"],
            "dense_fwd_flops": dense["fwd_flops"], "sparse_fwd_flops": sparse["fwd_flops"],
            "dense_peak_mem_mb": dense["peak_mem_mb"], "sparse_peak_mem_mb": sparse["peak_mem_mb"],
            "memory_method": dense["memory_method"],
            "fwd_bwd_speedup": dense["fwd_bwd_ms"] / sparse["fwd_bwd_ms"],
            "flops_ratio": dense["flops"] / sparse["flops"],
        })
    return rows


def crossover(rows: list[dict], granularity: str) -> str:
    """The shortest measured length from which sparse forward+backward wins at every longer one."""
    ours = sorted((r for r in rows if r["granularity"] == granularity), key=lambda r: r["seq_len"])
    wins = [r["sparse_fwd_bwd_ms"] < r["dense_fwd_bwd_ms"] for r in ours]
    if not any(wins):
        return f"{granularity}: sparse forward+backward never beats dense at the measured lengths"
    first = next(i for i in range(len(ours)) if all(wins[i:])) if wins[-1] else None
    if first is None:
        return f"{granularity}: sparse wins at some lengths but loses at the longest measured"
    if first == 0:
        return f"{granularity}: sparse forward+backward wins at every measured length, from n={ours[0]['seq_len']}"
    return (f"{granularity}: crossover between n={ours[first - 1]['seq_len']} (dense wins) and "
            f"n={ours[first]['seq_len']} (sparse wins from here on)")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| n | granularity | dense fwd ms | sparse fwd ms | dense fwd+bwd ms | sparse fwd+bwd ms "
             "| fwd+bwd speed-up | dense GFLOP | sparse GFLOP | FLOP ratio | dense peak MB | sparse peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['granularity']} | {r['dense_fwd_ms']:.2f} | {r['sparse_fwd_ms']:.2f} "
                     f"| {r['dense_fwd_bwd_ms']:.2f} | {r['sparse_fwd_bwd_ms']:.2f} | {r['fwd_bwd_speedup']:.2f}x "
                     f"| {r['dense_flops'] / 1e9:.3f} | {r['sparse_flops'] / 1e9:.3f} | {r['flops_ratio']:.2f}x "
                     f"| {r['dense_peak_mem_mb']:.0f} | {r['sparse_peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in rows})
    dense = {r["seq_len"]: r for r in rows}
    fig, (ax_ms, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style, label in (("fwd_bwd_ms", "-", "fwd+bwd"), ("fwd_ms", ":", "fwd")):
        ax_ms.plot(lengths, [dense[n]["dense_" + key] for n in lengths], "k" + style, marker="o",
                   label=f"dense {label}")
        for granularity, colour in zip(GRANULARITIES, COLOURS):
            ours = sorted((r for r in rows if r["granularity"] == granularity), key=lambda r: r["seq_len"])
            if ours:
                ax_ms.plot([r["seq_len"] for r in ours], [r["sparse_" + key] for r in ours], style,
                           color=colour, marker="o", label=f"sparse {granularity} {label}")
    ax_flops.plot(lengths, [dense[n]["dense_flops"] for n in lengths], "k-", marker="o", label="dense")
    for granularity, colour in zip(GRANULARITIES, COLOURS):
        ours = sorted((r for r in rows if r["granularity"] == granularity), key=lambda r: r["seq_len"])
        if ours:
            ax_flops.plot([r["seq_len"] for r in ours], [r["sparse_flops"] for r in ours], color=colour,
                          marker="o", label=f"sparse {granularity}")
    for ax, ylabel in ((ax_ms, "median ms"), (ax_flops, "FLOPs, fwd+bwd (flop_counter)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="256,1024,4096,16384")
    parser.add_argument("--json", type=Path, default=Path("bench_attention.json"))
    parser.add_argument("--png", type=Path, default=None, help="default: the --json path with .png")
    parser.add_argument("--granularities", default="token,block", help=f"from {','.join(GRANULARITIES)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--local-window", type=int, default=0)
    parser.add_argument("--global-tokens", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=("dense", *GRANULARITIES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.n, args)))
        return
    granularities = [g for g in args.granularities.split(",") if g]
    rows = []
    for n in (int(s) for s in args.seq_lens.split(",")):
        rows += rows_for_length(n, granularities, argv)
        print(f"n={n} done", file=sys.stderr, flush=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    png = args.png or args.json.with_suffix(".png")
    settings = (f"attention alone: batch {args.batch}, dim {args.dim} ({args.heads} heads), top-k {args.top_k}, "
                f"block_size {args.block_size}, global_tokens {args.global_tokens}, local_window {args.local_window}")
    where = (f"{hardware_description(torch.device(args.device))}, torch {torch.__version__}, "
             f"median of {args.reps}")
    plot(rows, png, f"{settings}\n{where}")
    print(f"{settings}; {where}")
    print(f"memory: {rows[0]['memory_method']}")
    print(markdown_table(rows))
    for granularity in granularities:
        print(crossover(rows, granularity))
    print(f"wrote {args.json} and {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
