"""Sparse attention's tensor kernels: which keys (or key blocks) each query keeps, and attention
over only those; pure functions of tensors."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from adaptive_sparse.attention.indexer import (
    IndexerFeatures,
    gather_rows,
    index_scores,
)


def forced_keys(query_pos: torch.Tensor, num_keys: int, global_keys: int, local_radius: int,
                causal: bool = False) -> torch.Tensor:
    """[T, S] True where key s is always kept for query t: s < global_keys or |s - t| <= local_radius.
    Causal: the window is one-sided (0 <= t - s <= local_radius) and no future key is forced."""
    key_pos = torch.arange(num_keys, device=query_pos.device)  # [S]
    offset = query_pos.view(-1, 1) - key_pos.view(1, -1)  # [T, S]: t - s
    local = (offset >= 0) & (offset <= local_radius) if causal else offset.abs() <= local_radius
    forced = local | (key_pos < global_keys).view(1, -1)
    return forced & (offset >= 0) if causal else forced


def later_than(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] True where column s comes after row t (s > t): the causal mask of n positions."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def future_keys(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """True where a key lies after its query: key_pos > query_pos, broadcast (e.g. [T, 1] and [T, K])."""
    return key_pos > query_pos


@torch.no_grad()
def select_keys(features: IndexerFeatures, top_k: int, global_keys: int, local_radius: int,
                query_chunk: int, causal: bool = False) -> torch.Tensor:
    """Each query's top_k keys [B, T, K] by indexer score, forced keys first.

    Forced keys (global tokens, local window) score +inf so they always make the cut and take
    their share of the budget; the indexer's best keys fill the rest. The n x n scores are made
    one chunk of queries at a time, so at most [B, query_chunk, S] of them exist at once.

    Causal: future keys score -inf, so they are picked only by a query with fewer than top_k
    keys in its past, as padding; the attention kernels mask every pick with s > t.
    """
    b, t = features.query.shape[:2]
    s = features.key.shape[1]
    if top_k >= s:  # everything fits: no scoring needed
        return torch.arange(s, device=features.key.device).expand(b, t, s)
    picks = []
    for start in range(0, t, query_chunk):
        stop = min(start + query_chunk, t)
        scores = index_scores(features.query[:, start:stop], features.weight[:, start:stop],
                              features.key)  # [B, c, S]
        query_pos = torch.arange(start, stop, device=scores.device)
        if causal:
            key_pos = torch.arange(s, device=scores.device)
            scores = scores.masked_fill(future_keys(query_pos.view(-1, 1), key_pos.view(1, -1)), float("-inf"))
        scores = scores.masked_fill(forced_keys(query_pos, s, global_keys, local_radius, causal), float("inf"))
        picks.append(scores.topk(top_k, dim=-1, sorted=False).indices)  # [B, c, K]
    return torch.cat(picks, dim=1)  # [B, T, K]


def gather_per_head(t: torch.Tensor, idx: torch.Tensor, rows_per_item: int) -> torch.Tensor:
    """Rows of each head of t [B, H, N, D] picked by idx [B, R, K] (the same for every head).

    t is cut into R' rows of `rows_per_item` tokens per head ([B*H, N / rows_per_item,
    rows_per_item*D]); returns [B*H, R, K, rows_per_item*D], contiguous and head-major, so the
    matmuls that follow read it without another copy.
    """
    b, h, n, d = t.shape
    r, k = idx.shape[1:]
    idx = idx.unsqueeze(1).expand(b, h, r, k).reshape(b * h, r, k)  # [B*H, R, K]
    return gather_rows(t.reshape(b * h, n // rows_per_item, rows_per_item * d), idx)


def selected_future(idx: torch.Tensor) -> torch.Tensor:
    """[B, N, K] True where query t's selected key idx[b, t, j] lies after t (causal padding)."""
    query_pos = torch.arange(idx.shape[1], device=idx.device).view(1, -1, 1)
    return future_keys(query_pos, idx)


def attend_to_selected_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            idx: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token granularity: query t attends to keys idx[b, t] only, the same keys for every head.

    q, k, v: [B, H, N, D]; idx: [B, N, K]. Returns the output [B, H, N, D] and the attention
    weights [B, H, N, K] over the selected keys (0 on future keys when causal). Costs
    O(N * K * H * D): the selected keys and values are gathered, and no N x N score matrix is
    ever formed.
    """
    b, h, n, d = q.shape
    k_sel, v_sel = gather_per_head(k, idx, 1), gather_per_head(v, idx, 1)  # [B*H, N, K, D] each
    scores = torch.matmul(q.reshape(b * h, n, 1, d), k_sel.transpose(-1, -2)) * d ** -0.5  # [B*H, N, 1, K]
    if causal:  # every query keeps at least itself (the local window), so no row is all -inf
        future = selected_future(idx).unsqueeze(1).expand(b, h, n, idx.shape[-1]).reshape(b * h, n, 1, -1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = torch.matmul(weights, v_sel)  # [B*H, N, 1, D]
    return out.view(b, h, n, d), weights.view(b, h, n, -1)


def attend_with_key_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         idx: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as `attend_to_selected_keys`, computed densely: all N x N scores, the
    unselected keys masked to -inf before the softmax.

    Costs dense attention's O(N^2 * H * D), but as two batched matmuls instead of N tiny ones
    per head, so at short lengths (the ViT's 65 tokens) it runs faster than gathering: the
    kernel for accuracy studies there, never for savings. Same inputs and outputs.
    """
    b, h, n, d = q.shape
    keep = torch.zeros(b, n, k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, idx, True)  # [B, N, S]
    if causal:
        keep &= torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5  # [B, H, N, S]
    weights = scores.masked_fill(~keep.unsqueeze(1), float("-inf")).softmax(dim=-1)
    out = torch.matmul(weights, v)  # [B, H, N, D]
    return out, weights.gather(-1, idx.unsqueeze(1).expand(b, h, n, idx.shape[-1]))  # [B, H, N, K]


def pad_to_blocks(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad the token dimension (-2) of t up to a multiple of block_size (no copy when it is one)."""
    pad = -t.shape[-2] % block_size
    return F.pad(t, (0, 0, 0, pad)) if pad else t


# Query blocks a chunk of the explicit kernel takes: scores of about 2^21 elements (4 MiB in bf16)
# stay in cache from the matmul through the softmax to the values, where one [B, H, NB, bs, KB*bs]
# tensor of 33 MB (8,192 tokens a batch, top_k 512, 4 heads) ran at a third of the speed. Chosen
# by an in-process A/B on the AMD EPYC (2 threads, idle, one attention forward and backward at
# 8,192 tokens a batch): at top_k 512, 2^21 ran 4-9% faster than 2^20 at 2,048-8,192 tokens and
# tied it at top_k 256; 2^18 and 2^19 were slower everywhere, 2^22 mixed.
CHUNK_SCORES = 1 << 21


def attend_to_selected_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                              block_size: int, causal: bool = False, with_mass: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block granularity: the queries of a block share its selected key blocks.

    q, k, v: [B, H, N, D]; block_idx: [B, NB, KB], the key blocks of each of the NB query blocks.
    Keys and values move as contiguous blocks (one gathered row per block and head), and each
    query block attends over its KB*bs keys only: O(N * KB*bs * H * D). N is zero-padded to
    NB*bs and padded keys are masked out. Causal: each query sees the keys of its selected
    blocks at or before its own position (past blocks whole, its own block up to itself; a
    future block picked as padding not at all).

    Returns the output [B, H, N, D] and, `with_mass`, the indexer's target: the attention's
    mass on each selected block, averaged over heads and the block's real queries [B, NB, KB]
    (rows sum to 1); None otherwise.

    Two computations of one function. Where a gradient flows or the mass is wanted, the scores
    are formed explicitly, a chunk of query blocks at a time (`explicit_block_attention`): on
    CPU autograd's backward of those runs faster than the fused kernel's backward at 64-query
    tiles (docs/bench/gpt_attention_limit.json), and the target is read off the weights instead
    of recomputing the attention. Otherwise (evaluation) one fused `scaled_dot_product_attention`
    call, the faster forward.
    """
    b, h, n, d = q.shape
    nb, kb = block_idx.shape[1:]
    q, k, v = (pad_to_blocks(t, block_size) for t in (q, k, v))  # [B, H, NB*bs, D]
    keep = block_keep_mask(block_idx, block_size, n, causal)  # [B, NB, bs or 1, KB*bs] or None
    q_blocks = q.view(b, h, nb, block_size, d)  # [B, H, NB, bs, D]
    if not (with_mass or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        k_sel, v_sel = (gather_per_head(t, block_idx, block_size).view(b, h, nb, kb * block_size, d)
                        for t in (k, v))  # [B, H, NB, KB*bs, D]
        out = fused_block_attention(q_blocks, k_sel, v_sel, keep)
        return out.reshape(b, h, nb * block_size, d)[:, :, :n], None
    step = max(1, CHUNK_SCORES // (b * h * block_size * kb * block_size))
    # split, not slices: autograd joins split's gradients in one copy, where each slice's backward
    # would write a zero tensor the size of all of q
    keeps = itertools.repeat(None) if keep is None else keep.split(step, dim=1)
    outs, masses = [], []
    for start, q_chunk, idx_chunk, keep_chunk in zip(range(0, nb, step), q_blocks.split(step, dim=2),
                                                     block_idx.split(step, dim=1), keeps):
        out, mass = explicit_block_attention(q_chunk, k, v, idx_chunk, keep_chunk, n, start, with_mass)
        outs.append(out)
        masses.append(mass)
    out = torch.cat(outs, dim=2).view(b, h, nb * block_size, d)[:, :, :n]  # [B, H, N, D]
    return out, torch.cat(masses, dim=1) if with_mass else None


def explicit_block_attention(q_blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                             keep: torch.Tensor | None, n: int, first_block: int, with_mass: bool
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of c query blocks over their selected key blocks, scores formed explicitly.

    q_blocks [B, H, c, bs, D] (blocks first_block.. of the sequence); k, v [B, H, NB*bs, D];
    block_idx [B, c, KB]; keep [B, c, bs or 1, KB*bs] or None; n the real tokens. Returns the
    output [B, H, c, bs, D] and, `with_mass`, each selected block's mass [B, c, KB].
    """
    b, h, c, bs, d = q_blocks.shape
    k_sel, v_sel = (gather_per_head(t, block_idx, bs).view(b, h, c, -1, d) for t in (k, v))  # [B, H, c, KB*bs, D]
    scores = torch.matmul(q_blocks * d ** -0.5, k_sel.transpose(-1, -2))  # [B, H, c, bs, KB*bs]
    if keep is not None:  # an added -inf bias, not masked_fill: its backward is free, masked_fill's a pass
        scores = scores + scores.new_zeros(keep.shape).masked_fill_(~keep, float("-inf")).unsqueeze(1)
    weights = scores.softmax(-1)  # every row keeps at least one key: causal, itself; else a real one
    out = torch.matmul(weights, v_sel)  # [B, H, c, bs, D]
    return out, block_mass(weights.detach(), n, first_block) if with_mass else None


def fused_block_attention(q_blocks: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
                          keep: torch.Tensor | None) -> torch.Tensor:
    """One fused SDPA call over query blocks folded into the batch: q_blocks [B, H, NB, bs, D],
    k_sel and v_sel [B, H, NB, KB*bs, D], keep [B, NB, bs or 1, KB*bs] (copied per head: the
    kernel takes 4-D masks). Returns [B, H, NB, bs, D]."""
    b, h, nb, bs, d = q_blocks.shape
    if keep is not None:
        keep = keep.unsqueeze(1).expand(b, h, *keep.shape[1:]).reshape(b * h * nb, 1, keep.shape[2], -1)
    out = F.scaled_dot_product_attention(q_blocks.reshape(b * h * nb, 1, bs, d),
                                         k_sel.reshape(b * h * nb, 1, -1, d),
                                         v_sel.reshape(b * h * nb, 1, -1, d), attn_mask=keep)
    return out.view(b, h, nb, bs, d)


def block_keep_mask(block_idx: torch.Tensor, block_size: int, n: int, causal: bool) -> torch.Tensor | None:
    """Which selected keys each query of a block may see: [B, NB, bs, KB*bs] when causal (key
    position <= query position, padding excluded), [B, NB, 1, KB*bs] for padding alone, None
    when nothing needs masking."""
    key_pos = block_key_positions(block_idx, block_size).unsqueeze(2)  # [B, NB, 1, KB*bs]
    if causal:
        query_pos = torch.arange(block_idx.shape[1] * block_size, device=block_idx.device)
        return ~future_keys(query_pos.view(1, -1, block_size, 1), key_pos) & (key_pos < n)
    return key_pos < n if n % block_size else None  # only the last block is short


def block_key_positions(block_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token positions of the selected key blocks: [B, NB, KB] -> [B, NB, KB*bs]."""
    offsets = torch.arange(block_size, device=block_idx.device)  # [bs]
    return (block_idx.unsqueeze(-1) * block_size + offsets).flatten(-2)


def block_mass(weights: torch.Tensor, n: int, first_block: int = 0) -> torch.Tensor:
    """Attention weights [B, H, c, bs, KB*bs] over selected blocks (query blocks first_block..
    of the sequence) -> each block's mass, averaged over heads and over the query block's real
    queries (those < n): [B, c, KB], rows sum to 1.

    The sum over a block's queries is one matmul with a row of ones (fp32 accumulation, a
    fraction of the cost of a reduction over the weights' row dimension); the rows are normalised
    afterwards, which divides by heads x real queries and absorbs the bf16 rounding of the sums.
    """
    b, h, c, bs, _ = weights.shape
    positions = torch.arange(first_block * bs, (first_block + c) * bs, device=weights.device)
    real = (positions < n).view(c, 1, bs).to(weights.dtype)  # [c, 1, bs]
    per_key = torch.matmul(real, weights).squeeze(-2)  # [B, H, c, KB*bs]
    mass = per_key.float().sum(1).view(b, c, -1, bs).sum(-1)  # [B, c, KB]
    return mass / mass.sum(-1, keepdim=True)


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of bs consecutive tokens: [B, N, C] -> [B, NB, C] (a short last block averages its own tokens)."""
    b, n, c = x.shape
    nb = -(-n // block_size)
    sums = F.pad(x, (0, 0, 0, nb * block_size - n)).view(b, nb, block_size, c).sum(2)  # [B, NB, C]
    counts = (n - torch.arange(nb, device=x.device) * block_size).clamp(max=block_size)  # [NB]
    return sums / counts.view(1, nb, 1).to(x.dtype)
