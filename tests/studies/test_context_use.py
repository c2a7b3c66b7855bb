"""scripts/studies/context_use.py: the same characters scored with less context, and the page's
verdict on each run's gain, on made-up models whose answers are worked out by hand."""
import json
import math

import pytest
import torch
from torch import nn

from scripts.studies import context_use, recipe

V = 4


class FirstToken(nn.Module):
    """Predicts, at every position, the first token of its input with logit 5: it reads the whole input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        return 5.0 * nn.functional.one_hot(x[:, :1], V).float().expand(-1, x.shape[1], -1)


class LastToken(nn.Module):
    """Predicts the current token again: it reads nothing before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5.0 * nn.functional.one_hot(x, V).float()


def windows(count: int = 3, length: int = 256) -> torch.Tensor:
    """[count, length + 1]: token 1 everywhere except 2 at input position length - 128 (where a
    128-character input starts)."""
    w = torch.ones(count, length + 1, dtype=torch.long)
    w[:, length - 128] = 2
    return w


def test_contexts_double_from_128_and_end_at_the_window():
    assert context_use.contexts_for(2048) == [128, 256, 512, 1024, 2048]
    assert context_use.contexts_for(300) == [128, 256, 300]


def test_a_model_reading_the_whole_input_gains_from_the_whole_window_by_hand():
    """Every scored target is 1. With 256 characters the first input is 1: loss log(1 + 3 e^-5) =
    0.0200; with 128 it is 2: loss log(e^5 + 3) = 5.0200. Gain 5.0 on every window: interval 0."""
    result = context_use.context_use(FirstToken(), windows())
    assert result["loss"]["256"] == pytest.approx(math.log(1 + 3 * math.exp(-5)), abs=1e-5)
    assert result["loss"]["128"] == pytest.approx(math.log(math.exp(5) + 3), abs=1e-5)
    gain = result["gain_of_full_window_over"]["128"]
    assert gain["mean"] == pytest.approx(5.0, abs=1e-5) and gain["interval"] == pytest.approx(0.0, abs=1e-6)
    assert result["windows"] == 3


def test_a_model_reading_nothing_before_gains_nothing():
    result = context_use.context_use(LastToken(), windows())
    assert result["loss"]["128"] == result["loss"]["256"]
    assert result["gain_of_full_window_over"]["128"]["mean"] == 0.0


def test_the_page_says_per_run_whether_it_reads_beyond_the_shortest_context(tmp_path):
    def run(name, gain, interval):
        return {"name": name, "loss": {"128": 1.8, "2048": 1.8 - gain},
                "gain_of_full_window_over": {"128": {"mean": gain, "interval": interval}}}

    record = {"scored": 64, "command": "python -m scripts.studies.context_use ...", "hardware": "CPU",
              "runs": [run("dense s0", 0.03, 0.01), run("scratch k256 s0", -0.003, 0.009),
                       run("worse s0", -0.02, 0.01)]}
    (tmp_path / "context_use.json").write_text(json.dumps(record))
    text = "\n".join(recipe.context_use_section(tmp_path))
    assert "| dense s0 | 1.8000 | 1.7700 | +0.0300 ± 0.0100 | yes |" in text
    assert "| scratch k256 s0 | 1.8000 | 1.8030 | -0.0030 ± 0.0090 | no gain measured |" in text
    assert "| worse s0 | 1.8000 | 1.8200 | -0.0200 ± 0.0100 | no: worse with more |" in text
    assert recipe.context_use_section(tmp_path / "elsewhere") == []
