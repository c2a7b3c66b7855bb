"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) for queries and keys.

Each pair of dimensions (i, i + R/2) of the R rotated ones turns by the angle p * base^(-2i/R)
at position p: the "non-interleaved" (half-split) layout of nanochat, modded-nanogpt and
DeepSeek-V3.2's indexer. A rotation keeps the vector's norm, and the dot product of a query
at position m with a key at position n depends on the positions only through m - n, so
attention sees relative offsets and no position table has to be learned.
"""
from __future__ import annotations

import functools

import torch

ROPE_BASE = 10000.0  # the transformer's and nanochat's; its slowest pair turns ~0.4 rad over 2,048 positions at R = 32


@functools.lru_cache(maxsize=64)
def rotary_tables(length: int, rotated: int, device: torch.device, dtype: torch.dtype,
                  base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, each [length, rotated // 2], computed once per
    length, width, device and dtype (in float32, then cast)."""
    # Outside inference mode: a table first made by an evaluation under torch.inference_mode
    # would otherwise be an inference tensor, which training's backward cannot save.
    with torch.inference_mode(False):
        frequencies = base ** (-torch.arange(0, rotated, 2, device=device, dtype=torch.float32) / rotated)  # [R/2]
        positions = torch.arange(length, device=device, dtype=torch.float32)  # [T]
        angles = positions[:, None] * frequencies[None, :]  # [T, R/2]: elementwise, which autocast leaves in float32
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, rotated: int | None = None, base: float = ROPE_BASE) -> torch.Tensor:
    """x [..., T, D] with its first `rotated` dimensions (all D by default; even) rotated by
    position along T; the other D - rotated pass through unchanged. Returns [..., T, D]."""
    rotated = x.shape[-1] if rotated is None else rotated
    if rotated % 2:
        raise ValueError(f"rotary embeddings rotate pairs of dimensions: {rotated} is odd")
    cos, sin = rotary_tables(x.shape[-2], rotated, x.device, x.dtype, base)  # [T, R/2] each
    half = rotated // 2
    x1, x2, rest = x[..., :half], x[..., half:rotated], x[..., rotated:]  # [..., T, R/2] twice, [..., T, D-R]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
