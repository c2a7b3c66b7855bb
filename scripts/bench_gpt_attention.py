"""Dense against sparse attention where context makes attention matter: the whole GPT training
step and its attention layer alone, at contexts 1,024 to 8,192, on 1 and 2 threads.

    python -m scripts.bench_gpt_attention --json docs/bench/gpt_attention.json

Model: `model=gpt` at 4 layers, 4 heads, 128 wide (the language task's baby GPT, context
raised), batch of --batch-tokens tokens (batch = tokens // context, at least 1). Dense is
`scaled_dot_product_attention(is_causal=True)`; sparse is `SparseAttention` with the causal
block kernel (query blocks pick top-k key blocks among past blocks, the own block always).
- step: forward, cross-entropy plus the indexer's KL loss, backward and one fused AdamW step,
  under the precision `training.precision=auto` picks here (bf16 on CPUs with native bf16);
- attention alone: one layer's forward and backward on [batch, context, 128] (indexer loss
  included for sparse);
- milliseconds: median of --reps after one warm-up; each (threads, context, variant) in its own
  process; FLOPs: torch.utils.flop_counter on a meta-device copy (matmuls and attention kernels,
  the indexer included; top-k and gathers count zero), causal attention counted as the CPU flash
  kernel executes it (`flops_as_executed` in adaptive_sparse/training/metering.py; records made
  before it counted dense causal attention as the full square).
Nothing else should run on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptive_sparse.attention import DenseAttention, SparseAttention, auxiliary_loss
from adaptive_sparse.models.gpt import GPT
from adaptive_sparse.training.metering import flops_as_executed
from adaptive_sparse.training.runtime import resolve_precision
from adaptive_sparse.training.step import autocast_context
from adaptive_sparse.training.tracking import code_version, hardware_description
from scripts.timing import json_from_child, median_ms

VOCAB, WIDTH, LAYERS, HEADS = 65, 128, 4, 4


def attention_factory(variant: str, args: argparse.Namespace):
    if variant == "dense":
        return DenseAttention
    return functools.partial(SparseAttention, top_k=args.top_k, granularity="block", block_size=args.block_size,
                             local_window=args.local_window, global_tokens=0)


def gpt_step(model: GPT, optimizer, tokens: torch.Tensor, precision: str) -> None:
    """One training step: forward, loss (with the indexer's), backward, update."""
    with autocast_context(tokens.device, precision):
        logits = model(tokens[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    aux = auxiliary_loss(model)
    (loss if aux is None else loss + aux.weighted).backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def layer_step(layer: torch.nn.Module, x: torch.Tensor, precision: str) -> None:
    with autocast_context(x.device, precision):
        out = layer(x, is_causal=True)
    aux = auxiliary_loss(layer)
    (out.float().sum() if aux is None else out.float().sum() + aux.weighted).backward()
    layer.zero_grad(set_to_none=True)


def counted_gflop(run) -> float:
    with flops_as_executed() as counter:
        run()
    return counter.get_total_flops() / 1e9


def measure(variant: str, context: int, threads: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    precision = resolve_precision("auto", torch.device("cpu"))
    batch = max(1, args.batch_tokens // context)
    model = GPT(VOCAB, context, LAYERS, HEADS, WIDTH, attention=attention_factory(variant, args))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(VOCAB, (batch, context + 1))
    layer = copy.deepcopy(model.blocks[0].attn)
    x = torch.randn(batch, context, WIDTH, requires_grad=True)
    meta_model, meta_layer = copy.deepcopy(model).to("meta"), copy.deepcopy(layer).to("meta")
    return {
        "variant": variant, "context": context, "threads": threads, "batch": batch, "precision": precision,
        "step_ms": median_ms(lambda: gpt_step(model, optimizer, tokens, precision), args.reps),
        "attention_ms": median_ms(lambda: layer_step(layer, x, precision), args.reps),
        "step_gflop": counted_gflop(lambda: gpt_step(meta_model, None, tokens.to("meta"), "fp32")),
        "attention_gflop": counted_gflop(lambda: layer_step(meta_layer, torch.empty(x.shape, device="meta",
                                                                                    requires_grad=True), "fp32")),
    }


def run_child(variant: str, context: int, threads: int, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench_gpt_attention", *argv, "--child", f"{variant},{context},{threads}"]
    return json_from_child(cmd, f"{variant} at {context} on {threads} threads")


def row(dense: dict, sparse: dict) -> dict:
    return {"context": dense["context"], "threads": dense["threads"], "batch": dense["batch"],
            **{f"{v}_{k}": r[k] for v, r in (("dense", dense), ("sparse", sparse))
               for k in ("step_ms", "attention_ms", "step_gflop", "attention_gflop")},
            "step_speedup": dense["step_ms"] / sparse["step_ms"],
            "attention_speedup": dense["attention_ms"] / sparse["attention_ms"],
            "step_flop_ratio": dense["step_gflop"] / sparse["step_gflop"],
            "attention_flop_ratio": dense["attention_gflop"] / sparse["attention_gflop"]}


def table(rows: list[dict]) -> str:
    lines = ["| context | threads | batch | dense step ms | sparse step ms | step speed-up | step FLOP ratio "
             "| dense attn ms | sparse attn ms | attn speed-up | attn FLOP ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['context']} | {r['threads']} | {r['batch']} | {r['dense_step_ms']:.0f} | {r['sparse_step_ms']:.0f} "
              f"| {r['step_speedup']:.2f}x | {r['step_flop_ratio']:.2f}x | {r['dense_attention_ms']:.1f} "
              f"| {r['sparse_attention_ms']:.1f} | {r['attention_speedup']:.2f}x | {r['attention_flop_ratio']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for threads, style in ((1, ":"), (2, "-")):
        ours = sorted((r for r in rows if r["threads"] == threads), key=lambda r: r["context"])
        if not ours:
            continue
        contexts = [r["context"] for r in ours]
        ax.plot(contexts, [r["step_speedup"] for r in ours], "k" + style, marker="o", label=f"GPT step, {threads} thr")
        ax.plot(contexts, [r["attention_speedup"] for r in ours], "tab:red", linestyle=style, marker="s",
                label=f"attention layer, {threads} thr")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("sparse speed-up over dense (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,2048,4096,8192")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--top-k", type=int, default=512, help="keys per query (sparse), in whole blocks")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--local-window", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        variant, context, threads = args.child.split(",")
        print(json.dumps(measure(variant, int(context), int(threads), args)))
        return 0
    forwarded = [f"--top-k={args.top_k}", f"--block-size={args.block_size}", f"--local-window={args.local_window}",
                 f"--reps={args.reps}", f"--batch-tokens={args.batch_tokens}"]  # what a child measures with
    rows = []
    for threads in map(int, args.threads.split(",")):
        for context in map(int, args.contexts.split(",")):
            rows.append(row(run_child("dense", context, threads, forwarded),
                            run_child("sparse", context, threads, forwarded)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        out = Path(args.json)
        record = {"command": "python -m scripts.bench_gpt_attention " + " ".join(argv),
                  "hardware": hardware_description(torch.device("cpu")), "torch": torch.__version__,
                  "model": {"n_layer": LAYERS, "n_head": HEADS, "n_embd": WIDTH, "vocab": VOCAB},
                  "sparse": {"granularity": "block", "top_k": args.top_k, "block_size": args.block_size,
                             "local_window": args.local_window}, **code_version(), "rows": rows}
        out.write_text(json.dumps(record, indent=1) + "\n")
        cpu = record["hardware"].split(",")[0]  # the rows say their own thread counts
        plot(rows, out.with_suffix(".png"), f"GPT 4x128, sparse block top-k {args.top_k} (bs {args.block_size}); {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
