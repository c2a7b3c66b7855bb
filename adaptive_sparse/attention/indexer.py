"""DeepSeek's lightning indexer: cheap per-key scores that choose what each query attends to,
and the KL loss that trains it toward the attention it stands in for."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention.rope import apply_rope


class IndexerFeatures(NamedTuple):
    """What the lightning indexer computes from its (detached) input tokens."""
    query: torch.Tensor   # [B, T, HI, dI]  one small query per indexer head
    weight: torch.Tensor  # [B, T, HI]      per-head weights w(t, j), computed from the query token
    key: torch.Tensor     # [B, S, dI]      one small key, shared by the indexer heads


class LightningIndexer(nn.Module):
    """I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)), with few heads HI of small width dI.

    Its scores over all n keys cost n^2 * HI * dI multiply-adds, against n^2 * 2C for dense
    attention's QK^T and AV; with HI * dI well below C that is the cheap part.

    `rope`: DeepSeek-V3.2's partial RoPE: the first half of each query head's dI dimensions and
    of the key's are rotated (non-interleaved), the rest carry no position. Positions are the
    rows' order in the input: tokens, or blocks where sparse attention passes one row per block
    (a block's query and its pooled key both sit at the block's index, so the offset is in blocks).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, rope: bool = False):
        super().__init__()
        if rope and head_dim % 4:
            raise ValueError(f"attention.indexer_dim={head_dim} is not allowed with rotary embeddings: "
                             "a multiple of 4 (its first half is rotated in pairs)")
        self.heads, self.head_dim = heads, head_dim
        self.rotated = head_dim // 2 if rope else 0
        self.query = nn.Linear(dim, heads * head_dim)
        self.key = nn.Linear(dim, head_dim)
        self.head_weight = nn.Linear(dim, heads)

    def forward(self, x: torch.Tensor) -> IndexerFeatures:
        b, n, _ = x.shape
        query = self.query(x).view(b, n, self.heads, self.head_dim)  # [B, N, HI, dI]
        key = self.key(x)  # [B, N, dI]
        if self.rotated:
            query = apply_rope(query.transpose(1, 2), self.rotated).transpose(1, 2)  # rotated along N
            key = apply_rope(key, self.rotated)
        # ReLU is positively homogeneous, so the 1/sqrt(dI) dot-product scale and DSA's
        # 1/sqrt(HI) head scale both fold into the weights: one multiply instead of n^2.
        weight = self.head_weight(x) * (self.heads * self.head_dim) ** -0.5  # [B, N, HI]
        return IndexerFeatures(query, weight, key)


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


def indexer_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(logits)); target rows [..., K] sum to 1.
    Logits of -inf (causal: future keys) must have target 0 there; they add nothing."""
    log_q = logits.float().log_softmax(dim=-1)
    cross = torch.where(target > 0, target * log_q, torch.zeros_like(log_q))  # 0 * -inf counts 0
    return (torch.xlogy(target, target) - cross).sum(-1).mean()
