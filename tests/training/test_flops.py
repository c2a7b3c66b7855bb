"""FLOPs counted as the kernels execute them (issue 37, item 4): causal attention as the CPU flash
kernel runs it (whole 512-key chunks up to each query tile's diagonal), every other count torch's
own, and sparse attention at its kept blocks plus its indexer, against hand-worked numbers."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from adaptive_sparse.attention import DenseAttention, SparseAttention
from adaptive_sparse.models.cnn import SimpleCNN
from adaptive_sparse.models.fastnet import FastNet
from adaptive_sparse.models.gpt import GPT
from adaptive_sparse.models.vit import build_vit
from adaptive_sparse.training import metering
from adaptive_sparse.training.metering import (
    KEY_CHUNK,
    FlopMeter,
    class_example,
    example_like,
    flops_as_executed,
    query_tile,
)

VOCAB = 65


# ------------------------------------------------------------------ the rule is the kernel's
def keys_computed(row: int, length: int) -> int:
    """Keys the CPU flash kernel computes for query `row` of a causal self-attention of `length`
    tokens, by the rule the meter counts: its tile's 512-key chunks up to the tile's last row."""
    tile, chunk = min(query_tile(length), length), min(KEY_CHUNK, length)
    tile_end = min((row // tile + 1) * tile, length)
    return min(-(-tile_end // chunk) * chunk, length)


@pytest.mark.parametrize("length,poisoned", [(128, 100), (600, 550), (1024, 300), (1024, 600)])
def test_the_cpu_flash_kernel_computes_the_keys_the_rule_counts(length, poisoned):
    """A NaN in value row `poisoned` reaches exactly the earlier queries whose tile multiplies it
    (by a probability of 0: the key is in the future, but the kernel computed it), forward and
    backward: the kernel computes what `causal_pairs` counts. A torch whose tiles change fails here."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, length, 16) for _ in range(3))
    poisoned_v = v.clone()
    poisoned_v[..., poisoned, :] = float("nan")
    expected = [row for row in range(poisoned) if keys_computed(row, length) > poisoned]
    out = F.scaled_dot_product_attention(q, k, poisoned_v, is_causal=True)
    assert out[0, 0, :poisoned].isnan().any(-1).nonzero().flatten().tolist() == expected
    out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    grad_q = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        torch.randn_like(out), q, k, poisoned_v, out, logsumexp, 0.0, True)[0]
    assert grad_q[0, 0, :poisoned].isnan().any(-1).nonzero().flatten().tolist() == expected


# ------------------------------------------------------------------ what does not change
SMALL_VIT = functools.partial(build_vit, embed_dim=48, depth=2, num_heads=2)
IMAGE_MODELS = {"cnn": SimpleCNN, "fastnet": functools.partial(FastNet, widths=(16, 32, 32)),
                "vit dense": functools.partial(SMALL_VIT, attention=DenseAttention),
                "vit sparse": functools.partial(SMALL_VIT, attention=functools.partial(SparseAttention, top_k=16))}


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_models_without_causal_attention_keep_torchs_count_to_the_flop(name, monkeypatch):
    model, example = IMAGE_MODELS[name](), class_example((3, 32, 32))
    executed = FlopMeter(model, example)
    monkeypatch.setattr(metering, "flops_as_executed", lambda: FlopCounterMode(display=False))
    raw = FlopMeter(model, example)
    assert (executed.forward_per_sample, executed.train_per_sample) == (raw.forward_per_sample, raw.train_per_sample)


def test_a_causal_gpt_of_512_tokens_or_fewer_keeps_torchs_count(monkeypatch):
    """Up to 512 keys the kernel's one chunk is every key: it computes the whole square."""
    model, tokens = GPT(VOCAB, 512, 2, 4, 128), torch.zeros(1, 512, dtype=torch.long)
    executed = FlopMeter(model, example_like(tokens, tokens))
    monkeypatch.setattr(metering, "flops_as_executed", lambda: FlopCounterMode(display=False))
    assert executed.train_per_sample == FlopMeter(model, example_like(tokens, tokens)).train_per_sample


# ------------------------------------------------------------------ dense causal attention by hand
def test_dense_causal_attention_at_1024_tokens_counts_the_tiles_the_kernel_runs():
    """4 heads of 32 at 1,024 tokens: tiles of 256 queries; the first two stop after keys 0-511,
    the last two after 0-1023, so 256 * (512 + 512 + 1024 + 1024) = 786,432 of the 1,048,576
    query-key pairs run (75%). QK^T and PV cost 2 * 32 FLOPs a pair and head each."""
    pairs, square = 256 * (512 + 512 + 1024 + 1024), 1024 * 1024
    layer = DenseAttention(128, 4).to("meta")
    x = torch.empty(1, 1024, 128, device="meta", requires_grad=True)
    projections = 2 * 1024 * 128 * (3 * 128 + 128)  # qkv and proj
    with FlopCounterMode(display=False) as raw:
        layer(x, is_causal=True)
    with flops_as_executed() as executed:
        layer(x, is_causal=True)
    assert raw.get_total_flops() - projections == 2 * 2 * 4 * 32 * square == 536_870_912  # torch: the square
    assert executed.get_total_flops() - projections == 2 * 2 * 4 * 32 * pairs == 402_653_184
    with flops_as_executed() as executed:
        layer(x, is_causal=True).sum().backward()
    # backward: dP, dV, dQ, dK, twice the forward (the products torch counts for any attention)
    assert executed.get_total_flops() - 3 * projections == 3 * 402_653_184


# ------------------------------------------------------------------ sparse attention by hand
def weight_flops(tokens: int, layers: int, width: int) -> int:
    """Forward FLOPs of the GPT's matrices for a sequence: per layer qkv 3C^2, proj C^2, MLP 8C^2;
    the tied head C * vocab. Training triples them (input and weight gradients)."""
    return 2 * tokens * (layers * 12 * width ** 2 + width * VOCAB)


def sparse_layer_flops(tokens: int, width: int, heads: int, block: int, kept: int, heads_i: int, dim_i: int,
                       train: bool) -> int:
    """One causal block-sparse attention layer beyond its projections, by what runs:
    - each query block's SDPA over its `kept` gathered blocks, whole (a boolean mask skips no work):
      QK^T and PV at 2 C FLOPs a pair each, over tokens * kept * block pairs; backward twice that;
    - the indexer's projections (C -> HI dI + dI + HI) of the blocks' first tokens (queries) and
      of the pooled blocks (keys), NB rows each; backward: the weight gradients of the outputs the
      loss uses (queries and weights of the first, the key of the second);
    - selection: indexer scores of every block pair, ReLU(q . k) and the head weighting,
      2 NB^2 HI (dI + 1), when fewer blocks are kept than exist (top-k counts nothing);
    - training only: the KL target, the attention weights summed over each block's queries by one
      matmul (2 FLOPs a pair and head, no gradient), and the indexer's scores at the kept blocks,
      2 NB KB HI (dI + 1), with a backward of twice that.
    """
    blocks, pairs = tokens // block, tokens * kept * block
    projection = 2 * blocks * width * (heads_i * dim_i + dim_i + heads_i)
    selection = 2 * blocks ** 2 * heads_i * (dim_i + 1) if kept < blocks else 0
    forward = 2 * 2 * width * pairs + 2 * projection + selection
    if not train:
        return forward
    kept_scores = 2 * blocks * kept * heads_i * (dim_i + 1)
    return forward + 2 * 2 * 2 * width * pairs + projection + 2 * heads * pairs + 3 * kept_scores


def sparse_gpt_meter(tokens: int, layers: int, heads: int, width: int, top_k: int, block: int,
                     heads_i: int, dim_i: int) -> FlopMeter:
    attention = functools.partial(SparseAttention, top_k=top_k, granularity="block", block_size=block,
                                  local_window=block, global_tokens=0, indexer_heads=heads_i, indexer_dim=dim_i)
    window = torch.zeros(1, tokens, dtype=torch.long)
    return FlopMeter(GPT(VOCAB, tokens, layers, heads, width, attention=attention), example_like(window, window))


def test_a_sparse_causal_gpt_counts_its_kept_blocks_and_its_indexer():
    """2 layers, 2 heads of 16, 256 tokens in 8 blocks of 32, each query block keeping 3."""
    tokens, layers, width, block, kept, heads_i, dim_i = 256, 2, 32, 32, 3, 2, 8
    meter = sparse_gpt_meter(tokens, layers, 2, width, kept * block, block, heads_i, dim_i)
    layer = functools.partial(sparse_layer_flops, tokens, width, 2, block, kept, heads_i, dim_i)
    assert meter.forward_per_sample == weight_flops(tokens, layers, width) + layers * layer(train=False)
    assert meter.train_per_sample == 3 * weight_flops(tokens, layers, width) + layers * layer(train=True)


def test_the_long_context_step_ratio_is_near_the_notes_ideal():
    """The 4 x 128 GPT at 2,048 tokens, top_k 512 in blocks of 64 (attention=sparse_causal_long).

    Dense: tiles of 256 queries over 512, 512, 1024, 1024, 1536, 1536, 2048 and 2048 keys,
    2,621,440 pairs a head (62.5% of the square). The note's ideal, about 1.4x, counts dense
    attention at T/2 keys a query and no indexer; as executed, dense attention runs 25% more than
    that (+14% on the dense step), while the sparse step's extras (its whole own blocks, the
    indexer, the KL target read off the attention weights) add under 1%, so the ratio lands near
    1.4 * 1.14 = 1.6. Tolerance 5%: it holds that, and refuses torch's full-square count (over 2).
    """
    tokens, layers, width, pairs = 2048, 4, 128, 256 * 2 * (512 + 1024 + 1536 + 2048)
    window = torch.zeros(1, tokens, dtype=torch.long)
    dense = FlopMeter(GPT(VOCAB, tokens, layers, 4, width), example_like(window, window))
    assert dense.train_per_sample == 3 * (weight_flops(tokens, layers, width) + layers * 2 * 2 * width * pairs)
    sparse = sparse_gpt_meter(tokens, layers, 4, width, 512, 64, 4, 16)
    assert sparse.train_per_sample == 3 * weight_flops(tokens, layers, width) + layers * sparse_layer_flops(
        tokens, width, 4, 64, 8, 4, 16, train=True)
    assert dense.train_per_sample / sparse.train_per_sample == pytest.approx(1.6, rel=0.05)
