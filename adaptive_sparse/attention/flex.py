"""FlexAttention for block-granularity sparse attention: the indexer's block selection as a
`BlockMask`, so that the fused CUDA kernel visits only the kept key blocks.

The mask is rebuilt from the selection every step (plain tensor ops on [B, NB, NB] tables);
index values may change without recompiling, shapes and block size may not. Eager
(uncompiled) FlexAttention ignores the mask's block lists and evaluates `mask_mod` on every
query-key pair, so `mask_mod` encodes the selection too: eager flex, which the CPU tests use,
is then exact, and the compiled kernel evaluates it only on the blocks it masks (causal: each
query block's own). FlexAttention has no CPU backward, so CPU training keeps the gather kernel.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

MIN_TILE = 16  # Triton's matmul tiles are at least 16 wide: a smaller block or head does not compile
MAX_TILE = 64  # the bf16 default forward tile can be 128, which does not divide 64-token blocks


def flex_fits(block_size: int, head_dim: int) -> bool:
    """Whether the compiled kernel can tile these blocks and heads: torch shrinks its default
    tiles to a block that is a power of 2 (and at least 16), no other."""
    return block_size >= MIN_TILE and block_size & (block_size - 1) == 0 and head_dim >= MIN_TILE


def kept_blocks(block_idx: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, NB, NB] True where query block i keeps key block j, from the selection [B, NB, KB];
    causal: a future block (picked only as padding) is not kept."""
    b, nb, _ = block_idx.shape
    kept = torch.zeros(b, nb, nb, dtype=torch.bool, device=block_idx.device)  # [B, NB, NB]
    kept.scatter_(-1, block_idx, True)  # [B, NB, NB]
    return kept.tril() if causal else kept  # [B, NB, NB]


def ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block table [B, NB, NB] as `from_kv_blocks` takes it, one row list for all heads: int32
    counts [B, 1, NB] and indices [B, 1, NB, NB], the kept blocks first (ascending), then the
    others as padding: training needs the full width, the backward's transpose is built from it."""
    counts = table.sum(-1, dtype=torch.int32).unsqueeze(1)  # [B, 1, NB]
    order = table.to(torch.int32).argsort(dim=-1, descending=True, stable=True)  # [B, NB, NB]
    return counts, order.to(torch.int32).unsqueeze(1)  # [B, 1, NB], [B, 1, NB, NB]


def selection_mask_mod(kept: torch.Tensor, block_size: int, causal: bool) -> Callable:
    """mask_mod(b, h, q, kv): kv is in a block that q's block keeps (and kv <= q when causal)."""
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        visible = kept[b, q_idx // block_size, kv_idx // block_size]  # one table load per score
        return visible & (kv_idx <= q_idx) if causal else visible
    return mask_mod


def selection_block_mask(block_idx: torch.Tensor, block_size: int, num_tokens: int, causal: bool) -> BlockMask:
    """The BlockMask of a block selection [B, NB, KB] over num_tokens tokens.

    Causal: a query block's strictly-past kept blocks are full (no mask_mod: the kernel's fast
    path) and its own block is partial (causal mask_mod); bidirectional: every kept block is full.
    """
    kept = kept_blocks(block_idx, causal)  # [B, NB, NB]
    if causal:
        own = torch.eye(kept.shape[-1], dtype=torch.bool, device=kept.device)  # [NB, NB]
        partial, full = kept & own, kept.tril(-1)  # [B, NB, NB] each
    else:
        partial, full = torch.zeros_like(kept), kept  # [B, NB, NB] each
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=selection_mask_mod(kept, block_size, causal),
                                    seq_lengths=(num_tokens, num_tokens))


def kernel_options(block_size: int) -> dict:
    """Forward tiles of the block (64 for 64-token blocks). The backward keeps torch's default
    tiles (16 wide in fp32), which torch shrinks to a power-of-2 block."""
    tile = min(block_size, MAX_TILE)
    # the main Triton kernel at every length: below 128 queries AUTO switches to the decoding kernel, tiled otherwise
    return {"fwd_BLOCK_M": tile, "fwd_BLOCK_N": tile, "BACKEND": "TRITON"}


@functools.cache
def compiled_flex_attention() -> Callable:
    """flex_attention compiled once per process, shared by every layer (a module attribute
    would also travel into deepcopies and pickles of the model)."""
    return torch.compile(flex_attention)


def attend_with_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                     block_size: int, causal: bool = False) -> torch.Tensor:
    """The function of `attend_to_selected_blocks` through FlexAttention: compiled on CUDA, eager
    elsewhere (forward only). q, k, v: [B, H, N, D]; block_idx: [B, NB, KB]. Returns [B, H, N, D]."""
    mask = selection_block_mask(block_idx, block_size, q.shape[2], causal)
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask)
    return compiled_flex_attention()(q, k, v, block_mask=mask, kernel_options=kernel_options(block_size))
