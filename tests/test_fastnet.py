"""The fast CIFAR recipe's parts: FastNet's whitening layer, label smoothing, the optimiser's
bias groups, the triangular schedule and flip test-time augmentation, with numbers by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from adaptive_sparse.models import FastNet
from adaptive_sparse.optim import sgd_with_scaled_biases, triangular_schedule
from adaptive_sparse.significance import BatchScores
from adaptive_sparse.step import evaluation_sums
from conftest import compose_with_hydra


def test_whitening_layer_decorrelates_the_patches_it_was_fitted_to():
    torch.manual_seed(0)
    mixing = torch.randn(3, 3)
    images = torch.einsum("ij,bjhw->bihw", mixing, torch.randn(256, 3, 32, 32))  # correlated channels
    net = FastNet()
    net.fit_to_data(images)
    out = net.whiten(images)[:, :12]  # [B, 12, 31, 31]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(flat.T)
    torch.testing.assert_close(covariance, torch.eye(12), atol=0.02, rtol=0)
    assert not net.whiten.weight.requires_grad and net(images[:2]).shape == (2, 10)


def test_label_smoothing_matches_torch_by_hand():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    log_p = F.log_softmax(logits, 1)
    expected = 0.8 * -log_p[0, 0] + 0.2 * -log_p[0].mean()  # (1 - s) CE(label) + s mean CE
    got = BatchScores.from_logits(logits, labels, label_smoothing=0.2).loss
    assert got.item() == pytest.approx(expected.item())
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.2).item())


def test_biases_get_the_scaled_rate_and_the_same_decay_per_step():
    net = FastNet()
    optimizer = sgd_with_scaled_biases(net.parameters(), lr=1.5, weight_decay=0.00133, bias_lr_scale=64.0)
    weights, biases = optimizer.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert (weights["lr"], biases["lr"]) == (1.5, 96.0)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable  # frozen left out


def test_triangular_schedule_by_hand():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = triangular_schedule(optimizer, total_steps=100, start=0.2, peak_at=0.25, end=0.1)
    factors = []
    for _ in range(101):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # up from 0.2 to 1 over 25 steps, then down to 0.1 at step 100
    assert factors[0] == pytest.approx(0.2) and factors[25] == pytest.approx(1.0)
    assert factors[50] == pytest.approx(1.0 - 0.9 * 25 / 75) and factors[100] == pytest.approx(0.1)


def test_flip_tta_averages_the_logits_of_an_image_and_its_mirror():
    class LeftColumn(torch.nn.Module):  # logits [x, 0] from the image's leftmost column
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], torch.zeros(len(x))], 1)

    images = torch.zeros(1, 1, 1, 2)
    images[0, 0, 0] = torch.tensor([4.0, -2.0])  # left 4, right -2: plain logits [4, 0]; mirrored [-2, 0]
    loader = [(images, torch.tensor([0]), torch.tensor([0]))]
    plain, _, _ = evaluation_sums(LeftColumn(), loader)
    tta, correct, _ = evaluation_sums(LeftColumn(), loader, flip_tta=True)
    assert plain == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)  # CE of logits [4, 0], label 0 (fp32)
    assert tta == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)  # of their mean with [-2, 0]: [1, 0]
    assert correct == 1


def test_preset_turns_the_papers_decoupled_values_into_the_same_steps():
    cfg = compose_with_hydra(["+experiment=fastnet"])
    opt = cfg.training.optimizer
    # the paper: torch lr 11.5 / K and decay wd = 0.0153 * 1024 / K per step on a summed loss,
    # K = 1024 * (1 + 1 / (1 - 0.85)) = 7850.67; a mean loss over 1024 multiplies lr by 1024
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    assert opt.lr == pytest.approx(11.5 / kilostep * 1024, rel=1e-3)          # 1.5
    assert opt.lr * opt.weight_decay == pytest.approx(0.0153 * 1024 / kilostep, rel=2e-3)  # 0.0019957
    assert (opt.momentum, cfg.model.bn_momentum) == (0.85, pytest.approx(1 - 0.6))
