"""The fast CIFAR recipe's parts: FastNet's whitening layer and its bias, label smoothing, the
optimiser's bias groups, the triangular schedule, lookahead, alternating flips, reflected crops,
whole batches only, and mirror(+translate) test-time augmentation, with numbers by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.models.fastnet import FastNet
from adaptive_sparse.training.data import BatchLoader, DatasetError, Split
from adaptive_sparse.training.optim import Lookahead, sgd_with_scaled_biases, triangular_schedule
from adaptive_sparse.training.step import evaluation_sums, evaluation_sums_by_level
from adaptive_sparse.training.tasks import ClassificationTask, tta_logits_by_level


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
    tta, correct, _ = evaluation_sums(LeftColumn(), loader, views=ClassificationTask(eval_flip_tta=True).views(last=True))
    assert plain == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)  # CE of logits [4, 0], label 0 (fp32)
    assert tta == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)  # of their mean with [-2, 0]: [1, 0]
    assert correct == 1


def test_preset_turns_the_papers_decoupled_values_into_the_same_steps():
    cfg = compose_config(["+experiment=fastnet"], with_hydra=True)
    opt = cfg.training.optimizer
    # the paper: torch lr 11.5 / K and decay wd = 0.0153 * 1024 / K per step on a summed loss,
    # K = 1024 * (1 + 1 / (1 - 0.85)) = 7850.67; a mean loss over 1024 multiplies lr by 1024
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    assert opt.lr == pytest.approx(11.5 / kilostep * 1024, rel=1e-3)          # 1.5
    assert opt.lr * opt.weight_decay == pytest.approx(0.0153 * 1024 / kilostep, rel=2e-3)  # 0.0019957
    assert (opt.momentum, cfg.model.bn_momentum) == (0.85, pytest.approx(1 - 0.6))


def test_translate_tta_weighs_the_mirrored_pair_half_and_each_shift_a_quarter():
    class TopLeft(torch.nn.Module):  # logit [x, 0] from the image's top-left pixel
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], torch.zeros(len(x))], 1)

    image = torch.arange(9.0).view(1, 1, 3, 3)  # rows 0 1 2 / 3 4 5 / 6 7 8
    # views' top-left pixels: the image 0, its mirror 2; shifted up-left (reflect pad 1): 4 (the
    # pixel at (1, 1)) and mirrored 4; shifted down-right: 4 and mirrored 4 (reflected back in)
    # every level from one set of forwards: 0 the image (0), 1 with its mirror (1), 2 six views:
    # 0.5 * (0 + 2) / 2 + 0.25 * (4 + 4) / 2 + 0.25 * (4 + 4) / 2 = 2.5
    assert [level[0, 0].item() for level in tta_logits_by_level(TopLeft(), image, 2)] == pytest.approx([0, 1, 2.5])
    assert [level[0, 0].item() for level in tta_logits_by_level(TopLeft(), image, 1)] == pytest.approx([0, 1])
    six_views = ClassificationTask(eval_flip_tta=True, eval_translate_tta=True).views(last=True)
    loader = [(image - 0.5, torch.tensor([1]), torch.tensor([0]))]  # logits [v - 0.5, 0], label 1: right at level 0 only
    assert [correct for _, correct, _ in evaluation_sums_by_level(TopLeft(), loader, views=six_views)] == [1, 0, 0]


def test_lookahead_pulls_the_weights_to_a_slow_copy_on_its_schedule_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ahead = Lookahead(model, total_steps=10, every_steps=5, decay=0.5, exponent=1.0)
    with torch.no_grad():
        model.weight.fill_(4.0)  # training moved the weight from 0 to 4
    ahead.step(4)  # not a multiple of 5: nothing
    assert model.weight.item() == 4.0
    ahead.step(5)  # decay 0.5 * (5 / 10) = 0.25: slow 0 -> 0.25 * 0 + 0.75 * 4 = 3, and the weight with it
    assert model.weight.item() == pytest.approx(3.0) and ahead.slow["weight"].item() == pytest.approx(3.0)
    with torch.no_grad():
        model.weight.fill_(5.0)
    ahead.step(10)  # decay 0.5: slow 0.5 * 3 + 0.5 * 5 = 4
    assert model.weight.item() == pytest.approx(4.0)
    with torch.no_grad():
        model.weight.fill_(9.0)
    ahead.finish()  # the run ends on the slow copy
    assert model.weight.item() == pytest.approx(4.0)


def test_lookahead_averages_float_state_and_leaves_integer_counters():
    model = torch.nn.BatchNorm1d(2)
    ahead = Lookahead(model, total_steps=5)
    assert "running_mean" in ahead.slow and "num_batches_tracked" not in ahead.slow


def augmenting_loader(images: torch.Tensor, **kwargs) -> BatchLoader:
    split = Split(images, torch.zeros(len(images), dtype=torch.long))
    return BatchLoader(split, len(images), torch.device("cpu"), shuffle=False, augment=True, **kwargs)


def test_alternating_flips_show_each_image_both_ways_every_two_epochs():
    images = torch.arange(2, dtype=torch.uint8).repeat(16, 3, 1, 1) + torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1) * 2
    loader = augmenting_loader(images.view(16, 3, 1, 2), crop_padding=0, flip="alternate")  # [16, 3, 1, 2]
    epochs = [next(iter(loader))[0] for _ in range(3)]  # normalised, in dataset order
    mirrored = [(e[:, 0, 0, 0] > e[:, 0, 0, 1]) for e in epochs]  # left > right: this image is mirrored
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])
    assert 0 < int(mirrored[0].sum()) < 16  # one coin per image, not one for the batch


def test_reflected_crop_padding_never_shows_a_zero():
    images = torch.full((8, 3, 4, 4), 7, dtype=torch.uint8)
    images[:, :, 0, 0] = 9  # reflection copies image pixels into the border, zeros never appear
    reflected = augmenting_loader(images, crop_padding=2, padding_mode="reflect", seed=3)
    zeroed = augmenting_loader(images, crop_padding=2, seed=3)
    pixel = lambda loader: next(iter(loader))[0] * loader.std + loader.mean  # back to 0-255
    assert set(pixel(reflected).round().unique().tolist()) <= {7.0, 9.0}
    assert 0.0 in pixel(zeroed).round().unique().tolist()


def test_drop_last_serves_only_full_batches():
    split = Split(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    loader = BatchLoader(split, 4, torch.device("cpu"), shuffle=True, drop_last=True)
    assert len(loader) == 2 and [len(idx) for _, _, idx, _ in loader] == [4, 4]
    assert len(BatchLoader(split, 4, torch.device("cpu"), shuffle=True)) == 3
    with pytest.raises(DatasetError, match="10 samples make no batch of training.batch_size=16"):
        BatchLoader(split, 16, torch.device("cpu"), shuffle=True, drop_last=True)


def test_whitening_bias_trains_at_the_base_rate_for_its_epochs_then_freezes():
    net = FastNet(whiten_bias_epochs=3)
    optimizer = sgd_with_scaled_biases(net.parameters(), lr=1.5, bias_lr_scale=64.0)
    base, scaled = optimizer.param_groups
    assert any(p is net.whiten.bias for p in base["params"]) and base["lr"] == 1.5
    assert not any(p is net.whiten.bias for p in scaled["params"])
    for epoch, trains in ((1, True), (3, True), (4, False)):
        net.start_epoch(epoch)
        assert net.whiten.bias.requires_grad is trains
    assert FastNet().whiten.bias is None  # whiten_bias_epochs 0: no bias at all


@pytest.mark.slow  # two short runs: the full suite's
def test_tta_at_the_end_only_evaluates_earlier_epochs_on_the_plain_image(tmp_path):
    """eval_tta_every_epoch=false (the fast preset's): epoch 1's val_acc is its accuracy without
    TTA, recorded as val_acc_tta0 too, with no other level; the last epoch has all three and its
    val_acc is the six views'."""
    from conftest import TINY, read_run, train_directly

    train_directly(tmp_path / "run", *TINY, "training.epochs=2", "task.eval_flip_tta=true",
                   "task.eval_translate_tta=true", "task.eval_tta_every_epoch=false")
    first, last = read_run(tmp_path / "run")[0]
    assert first["val_acc"] == first["val_acc_tta0"] and "val_acc_tta1" not in first
    assert last["val_acc"] == last["val_acc_tta2"] and {"val_acc_tta0", "val_acc_tta1"} <= set(last)
