"""On a CUDA device (skipped without one): every registered model (conf/model/*) with every attention
it takes (conf/attention/*) and its task runs the training forward and backward on CUDA, under bf16
autocast and in fp32, finite and close to the CPU's fp32 result on the same weights and batch.

On CUDA the image models run channels_last, as training runs them, and block-granularity sparse
attention runs compiled FlexAttention where the CPU runs the gather kernel, so the CPU result is
also the check of FlexAttention inside a model. The kernels' own equality on CUDA (outputs and
gradients, fp32 and bf16, causal and not) is tests/library/test_flex.py's
test_flex_forward_and_backward_equal_the_gather_kernel_on_cuda, run with this folder by
scripts/gpu_check.py."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import LANGUAGE_MODELS, compose_config, model_cases
from hydra.utils import instantiate

from adaptive_sparse.gating.scorers import autocast_context
from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.training.step import add_indexer_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# small, the same code paths: the GPT's 256 tokens make 4 blocks of sparse_causal_long's 64, of
# which top_k=128 keeps 2 (its default 512 would keep all); no dropout, whose draws differ by device
SMALL = {"vit": ["model.depth=2", "model.embed_dim=48", "model.num_heads=2"], "cnn": ["model.dropout=0.0"],
         "fastnet": ["model.widths=[16,32,32]"], "gpt": ["model.n_layer=2", "model.block_size=256"]}
ATTENTION = {("gpt", "sparse_causal_long"): ["attention.top_k=128"]}
# The relative error (norm of the difference over the norm of the CPU's fp32 result) of the logits and
# of all gradients allowed on CUDA: in fp32 up to FLOOR (cuDNN convolves fp32 in TF32 by default:
# 10-bit mantissas, amplified by FastNet's BatchNorm of 4 images); in bf16 up to 3x the CPU's own
# bf16 error, whose 8-bit mantissas reach 6e-2 (FastNet's gradient; ViT's indexer picking another
# key where two score alike, which the GPU's rounding may do elsewhere), or FLOOR where that is
# smaller. A wrong kernel, mask or scale is off by O(1).
FLOOR = {"fp32": 3e-2, "bf16": 1e-1}


def build(model: str, attention: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model on the CPU, a batch of inputs and targets) as train.py builds them for the task."""
    language = model in LANGUAGE_MODELS
    overrides = [f"model={model}", f"attention={attention}", *SMALL.get(model, []),
                 *ATTENTION.get((model, attention), [])]
    cfg = compose_config(overrides + (["task=char_lm", "dataset=shakespeare_char"] if language else []))
    torch.manual_seed(0)
    if language:
        tokens = torch.randint(65, (2, 257))
        return instantiate(cfg.model, vocab_size=65), tokens[:, :-1], tokens[:, 1:]
    return instantiate(cfg.model, num_classes=10), torch.randn(4, 3, 32, 32), torch.randint(10, (4,))


def forward_backward(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     precision: str) -> list[torch.Tensor]:
    """The training forward and backward as train_on_subset runs them (the loss with a sparse
    attention's indexer loss): [logits, every trainable gradient in one vector], returned in fp32 on the CPU."""
    net.train()
    net.zero_grad(set_to_none=True)
    with autocast_context(inputs.device, precision):
        logits = net(inputs)  # [B, C] or [B, T, V]
    add_indexer_loss(BatchScores.from_logits(logits, targets).loss.mean(), net, None).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "a trainable parameter got no gradient"
    return [logits.detach().float().cpu(), torch.cat([g.float().flatten() for g in grads]).cpu()]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def tolerances(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, expected: list[torch.Tensor],
               precision: str) -> list[float]:
    """The error allowed to the logits and the gradient at this precision (see FLOOR)."""
    if precision == "fp32":
        return [FLOOR["fp32"]] * 2
    on_cpu = forward_backward(copy.deepcopy(net), inputs, targets, precision)
    return [max(3 * relative_error(g, e), FLOOR[precision]) for g, e in zip(on_cpu, expected)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model,attention", model_cases())
def test_forward_and_backward_on_cuda_match_the_cpu(model, attention, precision):
    net, inputs, targets = build(model, attention)
    on_cuda, inputs_cuda = copy.deepcopy(net).cuda(), inputs.cuda()
    if model not in LANGUAGE_MODELS:  # the classification task's layout on the GPU
        on_cuda, inputs_cuda = (t.to(memory_format=torch.channels_last) for t in (on_cuda, inputs_cuda))
    expected = forward_backward(net, inputs, targets, "fp32")
    allowed = tolerances(net, inputs, targets, expected, precision)
    got = forward_backward(on_cuda, inputs_cuda, targets.cuda(), precision)
    for name, g, e, tolerance in zip(("logits", "gradient"), got, expected, allowed):
        assert torch.isfinite(g).all(), f"non-finite {name} on CUDA"
        error = relative_error(g, e)
        assert error < tolerance, f"{name}: {error:.1e} from the CPU's fp32 (allowed {tolerance:.1e})"
