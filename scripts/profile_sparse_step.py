"""Where a sparse GPT training step spends its time, phase by phase (issue 37, item 2).

    python -m scripts.profile_sparse_step --context 2048 --top-k 256 --threads 2

Builds scripts/bench_gpt_attention.py's GPT (4 layers, 4 heads, 128 wide, rotary positions,
block-sparse causal attention: blocks of --block-size, top_k keys per query block, the own
block and --local-window // block_size blocks before it always), runs --warmup steps, times
--steps unprofiled steps (median), then profiles --steps more with torch.profiler (CPU) and
prints each phase's milliseconds per step and share of the profiled step.

The phases come from `torch.profiler.record_function` ranges this script puts around library
functions by replacing the module attributes they are called through (in this process only;
adaptive_sparse/ is not edited), and from op names inside them:
- indexer scoring: `SparseAttention.indexer_features` (pooled-key and first-token-query
  projections) and `kernels.index_scores` (the [B, NB, NB] block scores inside select_keys);
- top-k: `aten::topk` inside `kernels.select_keys`, and the rest of select_keys (the future and
  forced-key masks, the chunk concatenation);
- gather: `kernels.gather_per_head` (the kept key and value blocks, per head);
- causal mask: `kernels.block_keep_mask`;
- attention: the rest of `kernels.attend_to_selected_blocks` (in training its explicit scores:
  two batched matmuls, the mask, the softmax; padding and reshapes); the dense step's fused
  call, `aten::scaled_dot_product_attention`, apart;
- indexer target: `kernels.block_mass` (read off the attention weights), whole;
- indexer loss: `index_scores_at`, `selected_future`, `indexer_kl`, whole;
- the rest of the forward: embeddings, projections, MLP, norms, cross-entropy, autocast casts;
- backward, in two calls: the main loss, then the indexer's KL (their graphs share nothing: the
  indexer sees x.detach() and its target is computed without grad, so this is the gradient of
  their sum at the same cost); the main loss's backward split into attention's (the fused
  kernel's, or the explicit scores': batched matmuls, softmax, mask), the gathers' (embedding)
  backward and the rest;
- optimizer: the fused AdamW step and zero_grad.
Each range counts its own time less the labelled ranges inside it (the indexer target and loss
count whole). The profiler's own overhead inflates small ops: compare the profiled step with the
unprofiled one printed above the table, and read shares, not absolute times. `--dense` profiles
the dense step (SDPA is_causal=True) the same way, for comparison. `--quick`: context 128,
top_k 32, blocks of 16, 256 tokens, 1 thread, one step: a smoke, never a measurement.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from adaptive_sparse.attention import auxiliary_loss, kernels, sparse
from adaptive_sparse.training.runtime import resolve_precision
from adaptive_sparse.training.step import autocast_context
from adaptive_sparse.training.tracking import hardware_description
from scripts.bench_gpt_attention import VOCAB, batch_size, build_gpt

# Phase names, in the order printed.
FEATURES, SCORES = "indexer scoring: features (projections)", "indexer scoring: block scores"
TOPK, SELECT = "top-k: aten::topk", "top-k: masks and concatenation around it"
GATHER, MASK = "gather: key/value blocks", "causal mask (block_keep_mask)"
FUSED, GLUE = "fused attention call (SDPA forward)", "attention: scores, mask, softmax, values (attend_to_selected_blocks)"
TARGET, INDEXER_LOSS = "indexer target (block_mass)", "indexer loss (scores at picks, KL)"
FORWARD = "forward: rest (embeddings, linears, MLP, norms, loss, casts)"
BACKWARD_FUSED, BACKWARD_GATHER = "backward: attention", "backward: gathers (embedding backward)"
BACKWARD = "backward: rest of the main loss"
BACKWARD_INDEXER = "backward: indexer loss"
OPTIMIZER, STEP = "optimizer (fused AdamW, zero_grad)", "unattributed (between phases)"
PHASES = [FEATURES, SCORES, TOPK, SELECT, GATHER, MASK, FUSED, GLUE, TARGET, INDEXER_LOSS, FORWARD,
          BACKWARD_FUSED, BACKWARD_GATHER, BACKWARD, BACKWARD_INDEXER, OPTIMIZER, STEP]
CLOSED = {TARGET, INDEXER_LOSS}
# autograd nodes of attention's backward: the fused kernel's, or the explicit scores' (the model's
# linears run addmm/mm, so batched matmuls here are attention's)
ATTENTION_BACKWARD = ("FlashAttention", "BmmBackward", "SoftmaxBackward", "MaskedFillBackward")  # counted whole: what runs inside them is theirs
# (module, attribute, phase): the library functions wrapped in a record_function range
WRAPPED = [(sparse.SparseAttention, "indexer_features", FEATURES), (kernels, "index_scores", SCORES),
           (sparse, "select_keys", SELECT), (kernels, "gather_per_head", GATHER),
           (kernels, "block_keep_mask", MASK), (sparse, "attend_to_selected_blocks", GLUE),
           (kernels, "block_mass", TARGET), (sparse, "index_scores_at", INDEXER_LOSS),
           (sparse, "selected_future", INDEXER_LOSS), (sparse, "indexer_kl", INDEXER_LOSS)]
RANGES = {"step": STEP, "forward": FORWARD, "backward: main loss": BACKWARD, "backward: indexer loss": BACKWARD_INDEXER,
          "optimizer": OPTIMIZER, **{phase: phase for *_, phase in WRAPPED}}
QUICK = {"context": 128, "top_k": 32, "block_size": 16, "local_window": 16, "batch_tokens": 256, "threads": 1,
         "warmup": 1, "steps": 1}
FULL = {"context": 2048, "top_k": 256, "block_size": 64, "local_window": 64, "batch_tokens": 8192, "threads": 2,
        "warmup": 2, "steps": 3}


def labelled(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def wrap_library() -> list[tuple]:
    """Put the phase ranges around the library functions (undo with `unwrap`)."""
    originals = []
    for owner, attribute, phase in WRAPPED:
        original = getattr(owner, attribute)
        originals.append((owner, attribute, original))
        setattr(owner, attribute, labelled(original, phase))
    return originals


def unwrap(originals: list[tuple]) -> None:
    for owner, attribute, original in reversed(originals):
        setattr(owner, attribute, original)


def phase_of(name: str, enclosing: str | None) -> str | None:
    """The phase an event starts, from its range name or its op name (None: it belongs to the
    phase enclosing it)."""
    if name in RANGES:
        return RANGES[name]
    if name == "aten::topk":
        return TOPK
    if name == "aten::scaled_dot_product_attention" and enclosing != TARGET:
        return FUSED
    if enclosing == BACKWARD and name.startswith("autograd::engine::evaluate_function:"):
        if any(node in name for node in ATTENTION_BACKWARD):
            return BACKWARD_FUSED
        if "EmbeddingBackward" in name:
            return BACKWARD_GATHER
    return None


def attribute(events) -> dict[str, float]:
    """Microseconds per phase over all `step` ranges: each labelled event counts its total less
    the labelled events nearest below it (closed phases count whole)."""
    spent: dict[str, float] = collections.defaultdict(float)

    def walk(event, enclosing: str | None) -> None:
        phase = phase_of(event.name, enclosing)
        if phase is not None:
            spent[phase] += event.cpu_time_total
            if enclosing is not None:
                spent[enclosing] -= event.cpu_time_total
            if phase in CLOSED:
                return
            enclosing = phase
        for child in event.cpu_children:
            walk(child, enclosing)

    for event in events:
        if event.cpu_parent is None and event.name == "step":
            walk(event, None)
    return dict(spent)


def profiled_step(model, optimizer, tokens: torch.Tensor, precision: str) -> None:
    """scripts.bench_gpt_attention.gpt_step in labelled parts; the backward of loss + indexer
    loss as two calls on disjoint graphs."""
    with record_function("step"):
        with record_function("forward"):
            with autocast_context(tokens.device, precision):
                logits = model(tokens[:, :-1])  # [B, T, V]
                loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            aux = auxiliary_loss(model)
        with record_function("backward: main loss"):
            loss.backward()
        if aux is not None:
            with record_function("backward: indexer loss"):
                aux.weighted.backward()
        with record_function("optimizer"):
            optimizer.step()
            model.zero_grad(set_to_none=True)


def profile_step(args: argparse.Namespace) -> dict:
    """Warm up, time unprofiled steps, profile more; the phases in ms per step."""
    torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", torch.device("cpu"))
    variant = "dense" if args.dense else "sparse"
    batch = batch_size(args.context, args.batch_tokens)
    model = build_gpt(variant, args.context, args.top_k, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(VOCAB, (batch, args.context + 1))
    originals = wrap_library()
    try:
        step = functools.partial(profiled_step, model, optimizer, tokens, precision)
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - start))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    finally:
        unwrap(originals)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = prof.events()
    spent = attribute(events)
    profiled_ms = sum(e.cpu_time_total for e in events if e.cpu_parent is None and e.name == "step") / 1000 / args.steps
    phases = {name: spent.get(name, 0.0) / 1000 / args.steps for name in PHASES}
    return {"variant": variant, "context": args.context, "top_k": None if args.dense else args.top_k,
            "block_size": args.block_size, "local_window": args.local_window, "batch": batch,
            "threads": args.threads, "precision": precision, "position": args.position,
            "hardware": hardware_description(torch.device("cpu")), "torch": torch.__version__,
            "steps": args.steps, "unprofiled_step_ms": statistics.median(times), "profiled_step_ms": profiled_ms,
            "phases_ms": phases, "shares": {name: ms / profiled_ms for name, ms in phases.items()}}


def report(result: dict) -> str:
    what = ("dense (SDPA is_causal=True)" if result["variant"] == "dense" else
            f"sparse, top_k {result['top_k']} (blocks of {result['block_size']})")
    lines = [(f"GPT training step, {what}, context {result['context']}, batch {result['batch']}, "
              f"{result['precision']}, {result['hardware']}"),
             (f"unprofiled step {result['unprofiled_step_ms']:.1f} ms (median of {result['steps']}); profiled step "
              f"{result['profiled_step_ms']:.1f} ms (the phases below add up to it)"), "",
             "| phase | ms / step | share of step |", "|---|---:|---:|"]
    for name, ms in result["phases_ms"].items():
        if ms or name in (FORWARD, BACKWARD, OPTIMIZER):
            lines.append(f"| {name} | {ms:.1f} | {100 * result['shares'][name]:.1f}% |")
    lines.append(f"| total | {sum(result['phases_ms'].values()):.1f} | "
                 f"{100 * sum(result['shares'].values()):.1f}% |")
    kernel = result["shares"][FUSED] + result["shares"][GLUE] + result["shares"][BACKWARD_FUSED]
    lines += ["", f"attention itself, forward and backward: {100 * kernel:.1f}% of the step"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, kind in (("context", int), ("top_k", int), ("block_size", int), ("local_window", int),
                      ("batch_tokens", int), ("threads", int), ("warmup", int), ("steps", int)):
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=None, help=f"default {FULL[key]}")
    parser.add_argument("--position", choices=("rope", "learned"), default="rope")
    parser.add_argument("--dense", action="store_true", help="profile the dense step instead")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke: " + json.dumps(QUICK))
    parser.add_argument("--json", default=None, help="write the phases here")
    parser.add_argument("--trace", default=None, help="write the profiler's Chrome trace here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # explicit options win over either preset
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        result = profile_step(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep theirs
    result["command"] = "python -m scripts.profile_sparse_step " + " ".join(argv)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
