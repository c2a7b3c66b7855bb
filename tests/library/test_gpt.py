"""The char GPT (models/gpt.py): tied weights, causal end to end, and a sequence's score as the mean
of its token losses."""
from __future__ import annotations

import math

import pytest
import torch

from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.models.gpt import GPT


def test_gpt_ties_weights_shapes_logits_and_refuses_long_windows():
    model = GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8)
    assert model.head.weight is model.token_embedding.weight
    assert model(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, 11)
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_is_causal_end_to_end():
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8).eval()
    tokens = torch.randint(11, (1, 16))
    changed = tokens.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 11
    torch.testing.assert_close(model(changed)[:, :9], model(tokens)[:, :9])


def test_a_sequence_scores_the_mean_of_its_token_losses():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # one sequence, 2 tokens, 2 classes
    targets = torch.tensor([[1, 0]])
    scores = BatchScores.from_logits(logits, targets)
    # token 1: p(1) = 3/4 -> -ln(3/4); token 2: p(0) = 1/2 -> ln 2
    assert scores.loss.item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2)
    entropy_1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert scores.entropy.item() == pytest.approx((entropy_1 + math.log(2)) / 2)
