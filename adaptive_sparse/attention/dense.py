"""Attention modules that replace the `attn` of timm's ViT blocks.

Each takes (dim, num_heads, qkv_bias) and is called as timm's Block calls its attention:
`attn(x, attn_mask=None, is_causal=False)` with x of shape [B, N, C]. The GPT
(adaptive_sparse/models/gpt.py) calls them with `is_causal=True`: token t may attend to keys s <= t
only, and sparse attention then never selects, scores or attends to a future key. The GPT with
`position=rope` builds them with `rope=True`: queries and keys rotated by their positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention.rope import apply_rope


class DenseAttention(nn.Module):
    """Multi-head self-attention through the fused `scaled_dot_product_attention`.

    `rope`: queries and keys get rotary position embeddings in `split_heads`, the path every
    subclass takes to its q and k, so sparse attention rotates the same way."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rope: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if rope and (dim // num_heads) % 2:
            raise ValueError(f"rotary embeddings need an even head width: dim={dim} / num_heads={num_heads} is odd")
        self.num_heads, self.head_dim, self.rope = num_heads, dim // num_heads, rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)  # the ViT passes True (timm's layout), the GPT its `bias`

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, D]
        if self.rope:
            q, k = apply_rope(q), apply_rope(k)  # rotated along N
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))  # [B, N, C]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.merge_heads(out)
