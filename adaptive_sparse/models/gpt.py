"""A small causal decoder (GPT) for character-level language modelling (`model=gpt`).

The shape of nanoGPT's model, written here: token and position embeddings, pre-LayerNorm
blocks of causal self-attention and a GELU MLP, a final LayerNorm, and an output layer tied
to the token embedding. Each block's attention is built from the `attention` group and
called with `is_causal=True`: dense attention is `scaled_dot_product_attention(is_causal=True)`,
sparse attention the causal lightning indexer (adaptive_sparse/attention/sparse.py).

Positions (`position`): "learned", nanoGPT's table of block_size learned vectors added to the
token embeddings; or "rope", no table: attention rotates its queries and keys by position
(adaptive_sparse/attention/rope.py), as nanochat and modded-nanogpt do at long context, where
each of thousands of learned rows would see few examples.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention import DenseAttention

POSITIONS = ("learned", "rope")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's own takes bias= only from 2.1 on)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)); dropout on each residual branch."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 attention: Callable[..., nn.Module], rope: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        rotary = {"rope": True} if rope else {}  # learned positions call the factory as before: any attention serves
        self.attn = attention(dim=n_embd, num_heads=n_head, qkv_bias=bias, **rotary)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C]
        x = x + self.drop(self.attn(self.ln_1(x), is_causal=True))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """tokens [B, T] (int64, T <= block_size) -> next-token logits [B, T, vocab_size]."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 128, dropout: float = 0.0, bias: bool = False,
                 attention: Callable[..., nn.Module] | None = None, position: str = "learned"):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}")
        if position not in POSITIONS:
            raise ValueError(f"model.position={position!r} is not allowed: {' or '.join(POSITIONS)}")
        self.block_size = int(block_size)
        attention = attention or DenseAttention
        rope = position == "rope"
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = None if rope else nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, attention, rope) for _ in range(n_layer))
        self.ln_f = LayerNorm(n_embd, bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # weight tying: one matrix in and out
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        """GPT-2's: normal(0, 0.02) weights, zero biases, and each residual branch's output
        projection scaled by 1/sqrt(2 * n_layer) so the residual stream's variance stays put.
        Indexer weights are left as their own module made them."""
        for name, module in self.named_modules():
            if ".indexer" in name:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} tokens is longer than model.block_size={self.block_size}")
        x = self.token_embedding(tokens)  # [B, T, C]
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(t, device=tokens.device))  # + [T, C]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, V]
