"""FlexAttention (attention.kernel=flex) on CUDA: its backward checked against the gather kernel,
then its speed against SDPA's flash kernel at contexts 2,048 to 32,768.

    python -m scripts.bench_flex --out OUT.json

Needs torch and a CUDA device alone (no Hydra). Two parts, each written to OUT.json as it ends:
- check: output and input gradients of `attend_with_flex` (compiled) against
  `attend_to_selected_blocks` for one random selection (fp32 and bf16, causal and bidirectional,
  a length that is a multiple of the block and one that is not), and a `SparseAttention` layer
  under bf16 autocast with kernel=auto (which must pick flex on CUDA) against a kernel=gather
  copy, its parameter gradients included; `ok` where every relative error (norm of the
  difference over the norm of the reference) is under 1e-4 (fp32) or 2e-2 (bf16);
- timing: at each context, bf16 q, k, v of --heads x --head-dim on --batch-tokens tokens (batch =
  tokens // context, at least 1): causal flash SDPA against causal flex over a random selection of
  top_k / block_size key blocks per query block (its own block always; the selection is given:
  the indexer's cost is not flex's). Flex times include building the BlockMask (done every step).
  Median milliseconds of --reps after one warm-up call (which compiles); forward under no_grad,
  then forward plus backward. Each context is compiled for its static shape, as a run at one
  context compiles it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from adaptive_sparse.attention.flex import attend_with_flex, selection_block_mask
from adaptive_sparse.attention.kernels import attend_to_selected_blocks
from adaptive_sparse.attention.sparse import SparseAttention
from scripts.timing import median_ms

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10)
    return parser.parse_args()


def random_selection(batch: int, num_blocks: int, keep: int, causal: bool, device: str) -> torch.Tensor:
    """[B, NB, KB] key blocks per query block: its own, then random others (causal: past ones
    first, future ones only as padding), as `select_keys` returns them."""
    scores = torch.rand(batch, num_blocks, num_blocks, device=device)  # [B, NB, NB]
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -1.0)  # [B, NB, NB]
    scores = scores + 2 * torch.eye(num_blocks, device=device)  # [B, NB, NB]: the own block first
    return scores.topk(min(keep, num_blocks), dim=-1).indices  # [B, NB, KB]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def outputs_and_grads(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      grad: torch.Tensor) -> list[torch.Tensor]:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def check_kernel(dtype: torch.dtype, causal: bool, tokens: int, args: argparse.Namespace) -> dict:
    """Flex against gather on the same q, k, v and selection: output, dq, dk, dv."""
    q, k, v, grad = (torch.randn(2, args.heads, tokens, args.head_dim, device="cuda", dtype=dtype) for _ in range(4))
    idx = random_selection(2, -(-tokens // args.block_size), 4, causal, "cuda")
    flex = outputs_and_grads(lambda *t: attend_with_flex(*t, idx, args.block_size, causal), q, k, v, grad)
    gather = outputs_and_grads(lambda *t: attend_to_selected_blocks(*t, idx, args.block_size, causal)[0], q, k, v, grad)
    errors = dict(zip(["out", "dq", "dk", "dv"], map(relative_error, flex, gather), strict=True))
    return {"dtype": str(dtype), "causal": causal, "tokens": tokens, "errors": errors,
            "ok": max(errors.values()) < TOLERANCE[dtype]}


def check_layer(args: argparse.Namespace) -> dict:
    """A causal SparseAttention layer under bf16 autocast (as training runs it), kernel=auto
    against kernel=gather: output, input and parameter gradients."""
    dim, tokens = args.heads * args.head_dim, 1000
    settings = dict(granularity="block", block_size=args.block_size, top_k=4 * args.block_size,
                    local_window=args.block_size, global_tokens=0)
    torch.manual_seed(0)
    auto = SparseAttention(dim, args.heads, kernel="auto", **settings).cuda()
    gather = SparseAttention(dim, args.heads, kernel="gather", **settings).cuda()
    gather.load_state_dict(auto.state_dict())
    x = torch.randn(2, tokens, dim, device="cuda")
    results = []
    for layer in (auto, gather):
        x_in = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x_in, is_causal=True)
        out.float().square().sum().backward()
        results.append([out.detach(), x_in.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    error = max(relative_error(a, b) for a, b in zip(*results, strict=True))
    picks_flex = auto.uses_flex(x.device)
    return {"layer": "autocast bf16", "picks_flex": picks_flex, "max_error": error,
            "ok": picks_flex and error < TOLERANCE[torch.bfloat16]}


def check(args: argparse.Namespace) -> list[dict]:
    cases = [(torch.float32, True, 1000), (torch.float32, False, 1024),
             (torch.bfloat16, True, 1024), (torch.bfloat16, False, 1000)]
    return [check_kernel(dtype, causal, tokens, args) for dtype, causal, tokens in cases] + [check_layer(args)]


def forward_and_backward(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """A step: attend, then backward into fresh leaves (the gradients are freed with them)."""
    def step() -> None:
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        attend(*leaves).sum().backward()
    return step


def time_context(tokens: int, args: argparse.Namespace) -> dict:
    batch = max(1, args.batch_tokens // tokens)
    q, k, v = (torch.randn(batch, args.heads, tokens, args.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    keep = -(-args.top_k // args.block_size)
    idx = random_selection(batch, -(-tokens // args.block_size), keep, True, "cuda")

    def flash(*t: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*t, is_causal=True)

    def flex(*t: torch.Tensor) -> torch.Tensor:
        return attend_with_flex(*t, idx, args.block_size, causal=True)

    sync = torch.cuda.synchronize
    row = {"context": tokens, "batch": batch, "kept_blocks": keep,
           "mask_ms": median_ms(lambda: selection_block_mask(idx, args.block_size, tokens, True), args.reps, sync)}
    for name, attend in (("flash", flash), ("flex", flex)):
        with torch.no_grad():
            row[f"{name}_forward_ms"] = median_ms(lambda: attend(q, k, v), args.reps, sync)
        row[f"{name}_step_ms"] = median_ms(forward_and_backward(attend, q, k, v), args.reps, sync)
    row["flash_over_flex_step"] = row["flash_step_ms"] / row["flex_step_ms"]
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    args = parse_args()
    torch._dynamo.config.automatic_dynamic_shapes = False  # a static compile per context, as in a run
    torch._dynamo.config.recompile_limit = 64
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "settings": vars(args) | {"out": str(args.out)}}

    def save(key: str, value: list[dict]) -> None:
        report[key] = value
        args.out.write_text(json.dumps(report, indent=1))

    save("check", check(args))
    print(json.dumps(report["check"]), flush=True)
    rows = []
    for tokens in args.contexts:
        rows.append(time_context(tokens, args))
        print(json.dumps(rows[-1]), flush=True)
        save("timing", rows)


if __name__ == "__main__":
    main()
