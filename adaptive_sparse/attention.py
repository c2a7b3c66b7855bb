"""Attention modules that replace the `attn` of timm's ViT blocks.

Each takes (dim, num_heads, qkv_bias) and is called as timm's Block calls its attention:
`attn(x, attn_mask=None, is_causal=False)` with x of shape [B, N, C]. The GPT
(adaptive_sparse/gpt.py) calls them with `is_causal=True`: token t may attend to keys s <= t only,
and sparse attention then never selects, scores or attends to a future key.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class DenseAttention(nn.Module):
    """Multi-head self-attention through the fused `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)  # the ViT passes True (timm's layout), the GPT its `bias`

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, D]
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, D]

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))  # [B, N, C]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.merge_heads(out)


# ---------------------------------------------------------------------------------------------
# Sparse attention after DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp): a lightning indexer
# picks each query's top-k keys, and the main attention's softmax runs over those keys only.
# ---------------------------------------------------------------------------------------------

class IndexerFeatures(NamedTuple):
    """What the lightning indexer computes from its (detached) input tokens."""
    query: torch.Tensor   # [B, T, HI, dI]  one small query per indexer head
    weight: torch.Tensor  # [B, T, HI]      per-head weights w(t, j), computed from the query token
    key: torch.Tensor     # [B, S, dI]      one small key, shared by the indexer heads


class LightningIndexer(nn.Module):
    """I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)), with few heads HI of small width dI.

    Its scores over all n keys cost n^2 * HI * dI multiply-adds, against n^2 * 2C for dense
    attention's QK^T and AV; with HI * dI well below C that is the cheap part.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = nn.Linear(dim, heads * head_dim)
        self.key = nn.Linear(dim, head_dim)
        self.head_weight = nn.Linear(dim, heads)

    def forward(self, x: torch.Tensor) -> IndexerFeatures:
        b, n, _ = x.shape
        query = self.query(x).view(b, n, self.heads, self.head_dim)  # [B, N, HI, dI]
        # ReLU is positively homogeneous, so the 1/sqrt(dI) dot-product scale and DSA's
        # 1/sqrt(HI) head scale both fold into the weights: one multiply instead of n^2.
        weight = self.head_weight(x) * (self.heads * self.head_dim) ** -0.5  # [B, N, HI]
        return IndexerFeatures(query, weight, self.key(x))


def index_scores(query: torch.Tensor, weight: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Indexer scores of queries [B, T, HI, dI] (weights [B, T, HI]) against all keys [B, S, dI]."""
    b, t, heads, width = query.shape
    dots = torch.matmul(query.reshape(b, t * heads, width), key.transpose(1, 2)).relu()  # [B, T*HI, S]
    weighted = torch.matmul(weight.reshape(b * t, 1, heads), dots.view(b * t, heads, -1))  # [B*T, 1, S]
    return weighted.view(b, t, -1)  # [B, T, S]


def index_scores_at(features: IndexerFeatures, idx: torch.Tensor) -> torch.Tensor:
    """Indexer scores of each query at its own keys idx [B, T, K] only: [B, T, K], O(T*K*HI*dI)."""
    key = gather_rows(features.key, idx)  # [B, T, K, dI]
    dots = torch.matmul(features.query, key.transpose(-1, -2)).relu()  # [B, T, HI, K]
    return torch.matmul(features.weight.unsqueeze(-2), dots).squeeze(-2)  # [B, T, K]


def gather_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows [B, S, F], idx [B, T, K] -> [B, T, K, F], row idx[b, t, j] of batch b.

    One F.embedding over the flattened rows: on CPU a row gather is several times faster than
    torch.gather with an index broadcast over the feature dimension.
    """
    b, s, f = rows.shape
    offsets = torch.arange(b, device=idx.device).view(b, 1, 1) * s  # [B, 1, 1]
    return F.embedding(idx + offsets, rows.reshape(b * s, f))


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


def attend_to_selected_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                              block_size: int, causal: bool = False) -> torch.Tensor:
    """Block granularity: the queries of a block share its selected key blocks.

    q, k, v: [B, H, N, D]; block_idx: [B, NB, KB], the key blocks of each of the NB query blocks.
    Keys and values move as contiguous blocks (one gathered row per block and head), and each
    query block runs the fused `scaled_dot_product_attention` over its KB*bs keys:
    O(N * KB*bs * H * D). N is zero-padded to NB*bs and padded keys are masked out.
    Causal: each query sees the keys of its selected blocks at or before its own position
    (past blocks whole, its own block up to itself; a future block picked as padding not at all).
    Returns the output [B, H, N, D].
    """
    b, h, n, d = q.shape
    nb, kb = block_idx.shape[1:]
    q, k, v = (pad_to_blocks(t, block_size) for t in (q, k, v))  # [B, H, NB*bs, D]
    k_sel, v_sel = (gather_per_head(t, block_idx, block_size).view(b * h * nb, 1, kb * block_size, d)
                    for t in (k, v))  # [B*H*NB, 1, KB*bs, D]
    q_blocks = q.reshape(b * h * nb, 1, block_size, d)  # [B*H*NB, 1, bs, D]
    keep = block_keep_mask(block_idx, block_size, n, causal)  # [B, NB, bs or 1, KB*bs] or None
    if keep is not None:
        keep = keep.unsqueeze(1).expand(b, h, *keep.shape[1:]).reshape(b * h * nb, 1, keep.shape[2], -1)
    out = F.scaled_dot_product_attention(q_blocks, k_sel, v_sel, attn_mask=keep)  # [B*H*NB, 1, bs, D]
    return out.view(b, h, nb * block_size, d)[:, :, :n]


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


@torch.no_grad()
def selected_block_mass(q: torch.Tensor, k: torch.Tensor, block_idx: torch.Tensor, block_size: int,
                        causal: bool = False) -> torch.Tensor:
    """The indexer's target in block granularity: the main attention's mass on each selected key
    block, averaged over heads and over the query block's real queries. [B, NB, KB], rows sum to 1.

    The fused kernel returns no weights, so they are recomputed here without grad (training only).
    """
    b, h, n, d = q.shape
    nb, kb = block_idx.shape[1:]
    q, k = pad_to_blocks(q, block_size), pad_to_blocks(k, block_size)
    k_sel = gather_per_head(k, block_idx, block_size).view(b * h, nb, kb * block_size, d)
    scores = torch.matmul(q.reshape(b * h, nb, block_size, d), k_sel.transpose(-1, -2)) * d ** -0.5
    hidden = ~block_keep_mask(block_idx, block_size, n, causal=True) if causal else \
        (block_key_positions(block_idx, block_size) >= n).unsqueeze(2)  # [B, NB, bs or 1, KB*bs]
    weights = scores.view(b, h, nb, block_size, -1).masked_fill(hidden.unsqueeze(1), float("-inf")).softmax(-1)
    mass = weights.view(b, h, nb, block_size, kb, block_size).sum(-1).mean(1)  # [B, NB, bs, KB]
    real = (torch.arange(nb * block_size, device=q.device) < n).view(1, nb, block_size, 1).to(mass.dtype)
    return (mass * real).sum(2) / real.sum(2)


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of bs consecutive tokens: [B, N, C] -> [B, NB, C] (a short last block averages its own tokens)."""
    b, n, c = x.shape
    nb = -(-n // block_size)
    sums = F.pad(x, (0, 0, 0, nb * block_size - n)).view(b, nb, block_size, c).sum(2)  # [B, NB, C]
    counts = (n - torch.arange(nb, device=x.device) * block_size).clamp(max=block_size)  # [NB]
    return sums / counts.view(1, nb, 1).to(x.dtype)


def indexer_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(logits)); target rows [..., K] sum to 1.
    Logits of -inf (causal: future keys) must have target 0 there; they add nothing."""
    log_q = logits.float().log_softmax(dim=-1)
    cross = torch.where(target > 0, target * log_q, torch.zeros_like(log_q))  # 0 * -inf counts 0
    return (torch.xlogy(target, target) - cross).sum(-1).mean()


class SparseAttention(DenseAttention):
    """Multi-head attention whose softmax runs over each query's top_k keys only (DSA-style).

    A lightning indexer on the detached input picks the keys, one selection shared by all
    heads; the `global_tokens` first tokens and a local window of `local_window` positions on
    either side of the query (in sequence order) are always kept and count against the `top_k`
    budget.

    granularity="token" is DSA's per-query selection. granularity="block" selects for query
    blocks of `block_size`: the indexer scores block-pooled queries against block-pooled keys
    and each query block keeps its top_k / block_size key blocks, gathered contiguously (the
    form that turns sparsity into wall-clock on a CPU; see docs/sparse-attention.md). There
    the always-kept keys are the blocks holding the global tokens, the query's own block and
    local_window // block_size whole blocks on either side. In token granularity `kernel`
    picks how the selected keys are attended: "gather" (cost follows top_k) or "mask" (the
    same function computed densely, faster at short lengths; see `attend_with_key_mask`).

    In training with grad enabled, each forward leaves `indexer_loss`: the KL divergence from
    the main attention's (detached, head-averaged) distribution over the selected keys to the
    indexer's. The indexer sees x.detach(), so the main loss never reaches it and this loss
    reaches nothing else. `dense_warmup` (set by `set_attention_epoch`) swaps in dense attention
    and fits the indexer to the full distribution.

    Called with `is_causal=True` (the GPT), nothing in the future is selected, attended or used
    as a target: future keys score -inf, the local window is one-sided, the warm-up target is
    the causal attention distribution, and in block granularity a query block's indexer query
    is made from the block's first token (a mean over the block would let its earlier queries'
    selection depend on later tokens).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, top_k: int = 32,
                 local_window: int = 4, global_tokens: int = 1, indexer_heads: int = 4,
                 indexer_dim: int = 16, granularity: str = "token", block_size: int = 16,
                 query_chunk: int = 1024, indexer_loss_weight: float = 1.0, warmup_epochs: int = 0,
                 kernel: str = "gather"):
        super().__init__(dim, num_heads, qkv_bias)
        check_sparse_settings(top_k=top_k, local_window=local_window, global_tokens=global_tokens,
                              indexer_heads=indexer_heads, indexer_dim=indexer_dim, granularity=granularity,
                              block_size=block_size, query_chunk=query_chunk,
                              indexer_loss_weight=indexer_loss_weight, warmup_epochs=warmup_epochs,
                              kernel=kernel)
        self.attend_to_keys = attend_to_selected_keys if kernel == "gather" else attend_with_key_mask
        self.top_k, self.local_window, self.global_tokens = top_k, local_window, global_tokens
        self.granularity, self.block_size, self.query_chunk = granularity, block_size, query_chunk
        self.indexer_loss_weight, self.warmup_epochs = indexer_loss_weight, warmup_epochs
        self.indexer = LightningIndexer(dim, indexer_heads, indexer_dim)
        self.dense_warmup = False
        self.indexer_loss: torch.Tensor | None = None

    def _warn_if_dense(self, num_tokens: int) -> None:
        """Once per module: top_k at or above the sequence keeps every key, so this is dense
        attention (with an indexer's cost on top) under the name sparse."""
        if self.top_k >= num_tokens and not getattr(self, "warned_dense", False):
            self.warned_dense = True
            warnings.warn(f"attention.top_k={self.top_k} >= the {num_tokens} tokens of a sequence: every query "
                          "keeps every key, so sparse attention computes dense attention here; lower attention.top_k")

    # ------------------------------------------------------------------ selection
    def indexer_features(self, x: torch.Tensor, causal: bool = False) -> IndexerFeatures:
        """Indexer features of tokens (token granularity) or of blocks (block granularity: keys
        from block means; queries from block means, or causally from each block's first token)."""
        x = x.detach()  # DSA: the main loss must not train the indexer
        if self.granularity == "token":
            return self.indexer(x)
        keys = self.indexer(pool_blocks(x, self.block_size))
        if not causal:
            return keys
        queries = self.indexer(x[:, ::self.block_size])  # [B, NB, C]: each block's first token
        return IndexerFeatures(queries.query, queries.weight, keys.key)

    def select(self, x: torch.Tensor, features: IndexerFeatures | None = None, causal: bool = False) -> torch.Tensor:
        """Selected keys [B, N, K] (token) or key blocks [B, NB, KB] (block) for input x [B, N, C]."""
        features = self.indexer_features(x, causal) if features is None else features
        if self.granularity == "token":
            return select_keys(features, self.top_k, self.global_tokens, self.local_window, self.query_chunk,
                               causal)
        # in blocks: the blocks holding the global tokens, the query's own block and the
        # local_window // block_size whole blocks on either side of it (causal: before it)
        bs = self.block_size
        return select_keys(features, -(-self.top_k // bs), -(-self.global_tokens // bs),
                           self.local_window // bs, self.query_chunk, causal)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("SparseAttention takes no attn_mask (is_causal=True for a decoder)")
        if not is_causal and not getattr(self, "checked_two_sided", False):
            check_top_k_holds_forced_keys(self.top_k, self.local_window, self.global_tokens, self.granularity,
                                          self.block_size, causal=False)
            self.checked_two_sided = True
        q, k, v = self.split_heads(x)  # 3 x [B, H, N, D]
        self._warn_if_dense(x.shape[1])
        features = self.indexer_features(x, is_causal)
        train_indexer = self.training and torch.is_grad_enabled() and self.indexer_loss_weight > 0
        if self.dense_warmup:
            out, target, logits = self._dense_warmup(q, k, v, features, train_indexer, is_causal)
        elif self.granularity == "token":
            idx = self.select(x, features, is_causal)  # [B, N, K]
            out, weights = self.attend_to_keys(q, k, v, idx, is_causal)
            if train_indexer:  # target: head-averaged weights (DSA sums over heads, then normalises)
                target, logits = weights.detach().mean(1), index_scores_at(features, idx)  # [B, N, K] each
                if is_causal:
                    logits = logits.masked_fill(selected_future(idx), float("-inf"))
        else:
            idx = self.select(x, features, is_causal)  # [B, NB, KB]
            out = attend_to_selected_blocks(q, k, v, idx, self.block_size, is_causal)
            if train_indexer:
                target = selected_block_mass(q, k, idx, self.block_size, is_causal)  # [B, NB, KB]
                logits = index_scores_at(features, idx)
                if is_causal:
                    logits = logits.masked_fill(selected_future(idx), float("-inf"))
        self.indexer_loss = indexer_kl(target, logits) if train_indexer else None
        return self.merge_heads(out)

    def _dense_warmup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: IndexerFeatures,
                      train_indexer: bool, causal: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """DSA's warm-up: dense attention, and the indexer fitted to the full (causal) distribution (O(N^2))."""
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if not train_indexer:
            return out, None, None
        n = q.shape[2]
        with torch.no_grad():
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, N, N]
            if causal:
                scores = scores.masked_fill(later_than(n, q.device), float("-inf"))
            target = scores.softmax(-1).mean(1)
            if self.granularity == "block":
                bs, nb = self.block_size, -(-n // self.block_size)
                target = pool_blocks(target, bs)  # [B, NB, N]: mean over each block's queries
                target = F.pad(target, (0, nb * bs - n)).view(*target.shape[:2], nb, bs).sum(-1)  # [B, NB, NB]
        logits = index_scores(features.query, features.weight, features.key)  # [B, N or NB, N or NB]
        if causal:  # future tokens, or future blocks (j > i): never a target, never a logit
            logits = logits.masked_fill(later_than(logits.shape[1], q.device), float("-inf"))
        return out, target, logits


def check_sparse_settings(*, top_k: int, local_window: int, global_tokens: int, indexer_heads: int,
                          indexer_dim: int, granularity: str, block_size: int, query_chunk: int,
                          indexer_loss_weight: float, warmup_epochs: int, kernel: str = "gather") -> None:
    """Refuse settings that cannot work, naming the config key (attention.KEY)."""
    def require(ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            raise ValueError(f"attention.{key}={value!r} is not allowed: {allowed}")

    for key, value in (("top_k", top_k), ("indexer_heads", indexer_heads), ("indexer_dim", indexer_dim),
                       ("block_size", block_size), ("query_chunk", query_chunk)):
        require(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
    for key, value in (("local_window", local_window), ("global_tokens", global_tokens),
                       ("warmup_epochs", warmup_epochs)):
        require(isinstance(value, int) and value >= 0, key, value, "an integer >= 0")
    require(granularity in ("token", "block"), "granularity", granularity, "token or block")
    require(kernel in ("gather", "mask"), "kernel", kernel, "gather or mask")
    require(kernel == "gather" or granularity == "token", "kernel", kernel,
            "mask only with granularity=token (block granularity has its own fused kernel)")
    require(indexer_loss_weight >= 0, "indexer_loss_weight", indexer_loss_weight, "a number >= 0")
    require(warmup_epochs == 0 or indexer_loss_weight > 0, "warmup_epochs", warmup_epochs,
            "0 unless indexer_loss_weight > 0 (the warm-up trains only the indexer)")
    check_top_k_holds_forced_keys(top_k, local_window, global_tokens, granularity, block_size, causal=True)


def check_top_k_holds_forced_keys(top_k: int, local_window: int, global_tokens: int, granularity: str,
                                  block_size: int, causal: bool) -> None:
    """Refuse a top_k below the always-kept keys: the global tokens, the local window (one side
    when causal, both sides otherwise) and the query's own token or block. Built, a layer is
    held to the causal count, the smaller (it does not yet know how it will be called); its
    first bidirectional call checks the other."""
    unit = 1 if granularity == "token" else block_size
    sides = 1 if causal else 2
    forced = -(-global_tokens // unit) + sides * (local_window // unit) + 1
    if forced > -(-top_k // unit):
        window = "the keys before the query in local_window" if causal else "both sides of local_window"
        raise ValueError(f"attention.top_k={top_k!r} is not allowed: at least the {forced * unit} always-kept "
                         f"keys (global_tokens + {window} + the query's own {'token' if unit == 1 else 'block'})")


class IndexerLoss(NamedTuple):
    weighted: torch.Tensor  # sum over layers of indexer_loss_weight * KL: add it to the training loss
    mean_kl: torch.Tensor   # the layers' mean KL, detached: what gets logged as indexer_loss


def auxiliary_loss(model: nn.Module) -> IndexerLoss | None:
    """Collect (and clear) the indexer losses the last forward left; None if there were none.

    Clearing means no graph outlives its step, and a loss is never counted twice.
    """
    losses = []
    for module in model.modules():
        if isinstance(module, SparseAttention) and module.indexer_loss is not None:
            losses.append((module.indexer_loss_weight, module.indexer_loss))
            module.indexer_loss = None
    if not losses:
        return None
    weighted = sum(weight * loss for weight, loss in losses)
    return IndexerLoss(weighted, torch.stack([loss.detach() for _, loss in losses]).mean())


def set_attention_epoch(model: nn.Module, epoch: int) -> None:
    """Start epoch `epoch` (1-based): epochs 1..warmup_epochs of a sparse attention are dense warm-up.

    While any layer warms up, every parameter outside the indexers is frozen (requires_grad
    False), so only the indexers train, and the frozen weights cost no backward pass and get no
    optimiser update (Adam skips parameters without a gradient; zeroing their gradients instead
    would still let weight decay and momentum move them). Afterwards each parameter trains
    again as it did before the warm-up: one frozen on purpose (FastNet's whitening filters, a
    frozen embedding) stays frozen. A model without SparseAttention is left untouched.
    """
    sparse = [m for m in model.modules() if isinstance(m, SparseAttention)]
    if not sparse:
        return
    for module in sparse:
        module.dense_warmup = epoch <= module.warmup_epochs
    warming_up = any(m.dense_warmup for m in sparse)
    indexer_params = {id(p) for m in sparse for p in m.indexer.parameters()}
    for param in model.parameters():
        if id(param) in indexer_params:
            continue
        if warming_up:
            if not hasattr(param, "trains_after_warmup"):  # its own setting, kept once
                param.trains_after_warmup = param.requires_grad
            param.requires_grad_(False)
        else:
            param.requires_grad_(getattr(param, "trains_after_warmup", param.requires_grad))
