"""timm-style: every registered model (conf/model/*) with every attention it takes (conf/attention/*)
and its task, on a tiny batch: output shape, finite values, a gradient on every trainable
parameter, and FLOPs that the meter can count."""
from __future__ import annotations

import pytest
import torch
from conftest import LANGUAGE_MODELS, compose_config, model_cases
from hydra.utils import instantiate

from adaptive_sparse.attention.sparse import auxiliary_loss
from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.training.metering import FlopMeter

# smaller than their defaults, so the fast tier stays fast: the same code paths, fewer channels and blocks
SMALL = {"vit": ["model.depth=2", "model.embed_dim=48", "model.num_heads=2"],
         "fastnet": ["model.widths=[16,32,32]"], "gpt": ["model.n_layer=2", "model.block_size=32"]}


def build(model: str, attention: str):
    """(model, task, a tiny batch of inputs and targets) as train.py would build them."""
    language = model in LANGUAGE_MODELS
    overrides = [f"model={model}", f"attention={attention}", *SMALL.get(model, [])]
    if language:
        overrides += ["task=char_lm", "dataset=shakespeare_char"]
    cfg = compose_config(overrides)
    task = instantiate(cfg.task)
    torch.manual_seed(0)
    if language:
        net = instantiate(cfg.model, vocab_size=65)
        inputs, targets = torch.randint(65, (2, 32)), torch.randint(65, (2, 32))
    else:
        net = instantiate(cfg.model, num_classes=10)
        inputs, targets = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    return net, task, inputs, targets


def test_every_model_config_is_covered():
    assert {"cnn", "vit", "fastnet", "gpt"} <= {m for m, _ in model_cases()}
    assert ("gpt", "sparse") in model_cases() and ("vit", "sparse") in model_cases()


@pytest.mark.parametrize("model,attention", model_cases())
def test_forward_backward_finite_with_a_gradient_on_every_trainable_parameter(model, attention):
    net, task, inputs, targets = build(model, attention)
    net.train()
    logits = net(inputs)
    expected = (*targets.shape, 65) if model in LANGUAGE_MODELS else (len(targets), 10)
    assert logits.shape == expected and torch.isfinite(logits).all()
    loss = BatchScores.from_logits(logits, targets).loss.mean()
    aux = auxiliary_loss(net)  # sparse attention: the indexer learns from its own KL loss
    (loss if aux is None else loss + aux.weighted).backward()
    missing = [name for name, p in net.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("model,attention", model_cases())
def test_flops_are_counted_per_sample(model, attention):
    net, _, inputs, targets = build(model, attention)
    from adaptive_sparse.training.metering import example_like

    meter = FlopMeter(net, example_like(inputs, targets))
    assert 0 < meter.forward_per_sample < meter.train_per_sample
