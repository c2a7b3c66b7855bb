"""Rotary position embeddings (model.position=rope): rotations that keep norms and make a
query-key score depend on the offset alone, a RoPE GPT that stays causal with dense and with
block-sparse attention and has no position table, and `position=learned` as the GPT was."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from adaptive_sparse.attention import DenseAttention, SparseAttention
from adaptive_sparse.attention.indexer import LightningIndexer, index_scores
from adaptive_sparse.attention.rope import apply_rope
from adaptive_sparse.models.gpt import GPT

SMALL = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8)
# conf/attention/sparse_causal_long.yaml at a small size: query blocks of 4 keep 2 of the (up
# to 4) key blocks at or before them, their own and the one before (local_window 4), no global tokens
SPARSE_CAUSAL_LONG = functools.partial(SparseAttention, granularity="block", block_size=4, top_k=8,
                                       local_window=4, global_tokens=0)


def at_every_position(vector: torch.Tensor, length: int) -> torch.Tensor:
    """The same vector [D] at positions 0..length-1, rotated: [length, D]."""
    return apply_rope(vector.expand(length, -1).contiguous())


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ the rotation
def test_a_pair_turns_by_its_frequency_times_the_position():
    # D = 4: pairs (0, 2) and (1, 3) turn by p * 10000^0 = p and p * 10000^(-1/2) = p / 100 rad;
    # e_0 lies in pair (0, 2) alone, so at position p it is (cos p, 0, sin p, 0)
    rotated = at_every_position(torch.tensor([1.0, 0.0, 0.0, 0.0]), 3)
    assert rotated[1].tolist() == pytest.approx([math.cos(1), 0.0, math.sin(1), 0.0], abs=1e-6)
    assert rotated[2].tolist() == pytest.approx([math.cos(2), 0.0, math.sin(2), 0.0], abs=1e-6)
    # e_1 lies in the slow pair (1, 3): at position 2 it has turned by 0.02 rad
    slow = at_every_position(torch.tensor([0.0, 1.0, 0.0, 0.0]), 3)
    assert slow[2].tolist() == pytest.approx([0.0, math.cos(0.02), 0.0, math.sin(0.02)], abs=1e-6)
    assert torch.equal(rotated[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # position 0: no turn


def test_rotation_keeps_norms_and_passes_unrotated_dimensions_through():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 8)  # [B, H, T, D]
    torch.testing.assert_close(apply_rope(x).norm(dim=-1), x.norm(dim=-1))
    partly = apply_rope(x, rotated=4)
    torch.testing.assert_close(partly[..., 4:], x[..., 4:], rtol=0, atol=0)
    torch.testing.assert_close(partly[..., :4], apply_rope(x[..., :4]))
    with pytest.raises(ValueError, match="odd"):
        apply_rope(x, rotated=3)


def test_a_table_first_made_in_an_evaluation_serves_training():
    """Evaluation runs under torch.inference_mode: the cached table it makes must still be one a
    backward can save (an inference tensor would fail here)."""
    x = torch.randn(1, 37, 6)  # a length and width no other test caches
    with torch.inference_mode():
        apply_rope(x)
    leaf = x.clone().requires_grad_(True)
    apply_rope(leaf).square().sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * leaf.detach())  # |R x|^2 = |x|^2: its gradient is 2x


def test_a_score_depends_on_the_offset_alone():
    torch.manual_seed(0)
    q, k = at_every_position(torch.randn(16), 40), at_every_position(torch.randn(16), 40)  # [40, 16] each
    for m, n, shift in ((3, 1, 10), (7, 7, 30), (0, 5, 34), (20, 2, 19)):
        torch.testing.assert_close(q[m + shift] @ k[n + shift], q[m] @ k[n], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q[3] @ k[1], q[3] @ k[0])  # and it does depend on the offset


def test_the_indexer_rotates_the_first_half_of_its_queries_and_keys():
    """DeepSeek-V3.2's partial RoPE: dI = 8, dimensions 0-3 rotated, 4-7 the same at every
    position; the indexer's score of a query at m for a key at n depends on m - n alone."""
    torch.manual_seed(0)
    indexer = LightningIndexer(dim=6, heads=2, head_dim=8, rope=True)
    plain = LightningIndexer(dim=6, heads=2, head_dim=8)
    plain.load_state_dict(indexer.state_dict())
    x = torch.randn(6).expand(1, 30, 6)  # one token at every position
    rotated, unrotated = indexer(x), plain(x)
    torch.testing.assert_close(rotated.query[..., 4:], unrotated.query[..., 4:], rtol=0, atol=0)
    torch.testing.assert_close(rotated.key[..., 4:], unrotated.key[..., 4:], rtol=0, atol=0)
    assert not torch.allclose(rotated.query[:, 5, :, :4], unrotated.query[:, 5, :, :4])
    scores = index_scores(rotated.query, rotated.weight, rotated.key)[0]  # [30, 30]
    torch.testing.assert_close(scores[12, 4], scores[20, 12], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.diagonal(), scores.diagonal()[:1].expand(30), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention.indexer_dim=6"):
        LightningIndexer(dim=6, heads=2, head_dim=6, rope=True)


# ------------------------------------------------------------------ the RoPE GPT
@pytest.mark.parametrize("attention", [DenseAttention, SPARSE_CAUSAL_LONG], ids=["dense", "sparse_block"])
def test_a_rope_gpt_is_causal(attention):
    torch.manual_seed(0)
    model = GPT(**SMALL, attention=attention, position="rope").eval()
    assert all(block.attn.rope for block in model.blocks)
    tokens = torch.randint(11, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 11
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=0)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_the_sparse_indexer_rotates_too():
    model = GPT(**SMALL, attention=functools.partial(SPARSE_CAUSAL_LONG, indexer_dim=8), position="rope")
    assert all(block.attn.indexer.rotated == 4 for block in model.blocks)


def test_a_rope_gpt_has_no_position_table():
    learned, rope = GPT(**SMALL), GPT(**SMALL, position="rope")
    assert rope.position_embedding is None
    assert not any("position" in name for name, _ in rope.named_parameters())
    assert parameter_count(learned) - parameter_count(rope) == 16 * 8  # block_size * n_embd
    assert set(learned.state_dict()) - set(rope.state_dict()) == {"position_embedding.weight"}


def test_rope_changes_what_attention_computes_and_nothing_it_holds():
    torch.manual_seed(0)
    rotary, plain = DenseAttention(8, 2, rope=True), DenseAttention(8, 2)
    plain.load_state_dict(rotary.state_dict())  # the same keys: rotation adds no parameter or buffer
    x = torch.randn(1, 5, 8)
    turned, unturned = rotary(x, is_causal=True), plain(x, is_causal=True)
    torch.testing.assert_close(turned[:, 0], unturned[:, 0])  # position 0 sees only itself, at offset 0
    assert not torch.allclose(turned[:, 1:], unturned[:, 1:])
    with pytest.raises(ValueError, match="even head width"):
        DenseAttention(6, 2, rope=True)


def test_an_unknown_position_is_refused_by_its_key():
    with pytest.raises(ValueError, match="model.position='alibi'"):
        GPT(**SMALL, position="alibi")


# ------------------------------------------------------------------ learned positions, as before
def test_learned_positions_reproduce_the_gpt_as_it_was():
    """The GPT before model.position existed, seed 0, tokens 0..10, 0 (these numbers are its
    output, taken from that code): the same state_dict keys, in order, and the same logits."""
    torch.manual_seed(0)
    model = GPT(**SMALL, position="learned").eval()
    keys = list(model.state_dict())
    assert keys[:2] == ["token_embedding.weight", "position_embedding.weight"] and len(keys) == 16
    logits = model(torch.arange(12).remainder(11).view(2, 6))
    expected = [0.05294786, -0.00555736, 0.01914150, 0.00821284, 0.03591024, -0.01109756]
    assert logits[0, :, 0].tolist() == pytest.approx(expected, abs=1e-7)
    assert logits.sum().item() == pytest.approx(0.5212992429733276, abs=1e-6)
    torch.manual_seed(0)
    default = GPT(**SMALL).eval()  # a committed run's config has no model.position
    torch.testing.assert_close(default(torch.arange(12).remainder(11).view(2, 6)), logits, rtol=0, atol=0)
