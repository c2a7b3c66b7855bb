"""Sparse attention (attention=sparse): exactness when nothing is dropped, zero weight and zero
gradient outside the selection, cost that follows the selection, and the indexer's training."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, compose_config, read_run, run_train
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from adaptive_sparse.attention import kernels
from adaptive_sparse.attention.dense import DenseAttention
from adaptive_sparse.attention.indexer import IndexerFeatures, index_scores, indexer_kl
from adaptive_sparse.attention.kernels import (
    attend_to_selected_blocks,
    attend_to_selected_keys,
    attend_with_key_mask,
    forced_keys,
    select_keys,
)
from adaptive_sparse.attention.sparse import SparseAttention, auxiliary_loss, set_attention_epoch

DIM, HEADS = 24, 3


def sparse_and_dense(**settings) -> tuple[SparseAttention, DenseAttention]:
    """A SparseAttention and a DenseAttention sharing their qkv and proj weights."""
    torch.manual_seed(0)
    sparse = SparseAttention(DIM, HEADS, **settings)
    dense = DenseAttention(DIM, HEADS)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.startswith("indexer.")})
    return sparse, dense


def grads_of(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.square().sum().backward()
    return out.detach(), [x.grad] + [module.get_parameter(n).grad for n in ("qkv.weight", "qkv.bias", "proj.weight")]


# ------------------------------------------------------------------ nothing dropped: equals dense
@pytest.mark.parametrize("granularity,kernel", [("token", "gather"), ("token", "mask"), ("block", "gather")])
@pytest.mark.parametrize("batch,n", [(2, 65), (1, 37), (1, 1), (3, 16)])
@pytest.mark.filterwarnings("ignore:attention.top_k")  # covering every key is the point here
def test_sparse_equals_dense_when_top_k_covers_every_key(granularity, kernel, batch, n):
    sparse, dense = sparse_and_dense(top_k=128, granularity=granularity, block_size=16, kernel=kernel)
    x = torch.randn(batch, n, DIM)
    out_s, grads_s = grads_of(sparse, x)
    out_d, grads_d = grads_of(dense, x)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-6)
    for g_s, g_d in zip(grads_s, grads_d):
        torch.testing.assert_close(g_s, g_d, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the selection, by hand
def test_forced_keys_are_global_tokens_and_the_local_window():
    mask = forced_keys(torch.tensor([0, 4, 7]), num_keys=8, global_keys=1, local_radius=1)
    assert mask.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0],
                                   [1, 0, 0, 1, 1, 1, 0, 0],
                                   [1, 0, 0, 0, 0, 0, 1, 1]]


def test_indexer_score_is_weighted_relu_of_dot_products():
    # two indexer heads of width 1: q = (1, -1), w = (2, 3), key 2 -> 2 * relu(2) + 3 * relu(-2) = 4
    query = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)
    weight = torch.tensor([2.0, 3.0]).view(1, 1, 2)
    key = torch.tensor([2.0, -1.0]).view(1, 2, 1)  # second key: 2 * relu(-1) + 3 * relu(1) = 3
    assert index_scores(query, weight, key).tolist() == [[[4.0, 3.0]]]


def test_select_keys_keeps_forced_keys_then_the_best_scored():
    # one indexer head of width 1 with q = w = 1: the score of key s is relu(k_s)
    key = torch.tensor([0.0, 5.0, 1.0, 2.0, 9.0, 3.0, 0.0, 7.0]).view(1, 8, 1)
    features = IndexerFeatures(torch.ones(1, 8, 1, 1), torch.ones(1, 8, 1), key)
    idx = select_keys(features, top_k=4, global_keys=1, local_radius=0, query_chunk=3)  # [1, 8, 4]
    # query 3: forced {0 (global), 3 (itself)}, then the two best others: 4 (9.0) and 7 (7.0)
    assert sorted(idx[0, 3].tolist()) == [0, 3, 4, 7]
    # query 4 is itself the best key: forced {0, 4}, then 7 (7.0) and 1 (5.0)
    assert sorted(idx[0, 4].tolist()) == [0, 1, 4, 7]


def test_indexer_kl_by_hand():
    # target (1/2, 1/2), indexer softmax(0, ln 3) = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    kl = indexer_kl(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, math.log(3.0)]]))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_block_target_is_the_attention_mass_per_selected_block():
    # 6 tokens in blocks of 4 ({0-3}, {4, 5} + 2 padding); zero queries attend uniformly to the
    # 6 real keys: block 0 holds 4/6 of the mass, block 1 2/6, whichever order they were picked in
    q, k, v = torch.zeros(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    _, mass = attend_to_selected_blocks(q, k, v, torch.tensor([[[0, 1], [1, 0]]]), block_size=4, with_mass=True)
    torch.testing.assert_close(mass, torch.tensor([[[4 / 6, 2 / 6], [2 / 6, 4 / 6]]]))


@pytest.mark.parametrize("blocks_a_chunk", [1, 2])
def test_causal_block_target_counts_only_real_queries_in_every_chunk(blocks_a_chunk, monkeypatch):
    """The same 6 tokens, causal: block 0 sees only itself (mass 1, 0); in block 1, query 4
    spreads over keys 0-4 (4/5 on block 0, 1/5 on its own) and query 5 over 0-5 (4/6, 2/6),
    averaged over those two real queries: the padded queries 6 and 7 count for nothing, also
    when block 1 is a chunk of its own."""
    monkeypatch.setattr(kernels, "CHUNK_SCORES", blocks_a_chunk * 2 * 4 * 8)  # B H bs KB*bs a block
    q, k, v = torch.zeros(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    _, mass = attend_to_selected_blocks(q, k, v, torch.tensor([[[0, 1], [1, 0]]]), block_size=4, causal=True,
                                        with_mass=True)
    own = (1 / 5 + 2 / 6) / 2
    torch.testing.assert_close(mass, torch.tensor([[[1.0, 0.0], [own, 1 - own]]]))


def dense_reference_of_blocks(q, k, v, block_idx, block_size, causal):
    """attend_to_selected_blocks' function written densely: all N x N scores, every key outside
    the query's selected blocks (and, causal, after the query) masked before the softmax."""
    n = q.shape[2]
    block_of = torch.arange(n) // block_size  # [N]
    kept = torch.zeros(q.shape[0], block_idx.shape[1], -(-n // block_size), dtype=torch.bool)
    kept.scatter_(-1, block_idx, True)  # [B, NB, NB]
    keep = kept[:, block_of][:, :, block_of]  # [B, N, N]
    if causal:
        keep &= torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep.unsqueeze(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks_a_chunk", [1, 3])
def test_block_kernel_trains_and_evaluates_the_same_function(causal, blocks_a_chunk, monkeypatch):
    """The explicit scores (with grad), a chunk of query blocks at a time, and the fused call
    (without) both compute the dense reference's outputs, and the explicit one its gradients;
    10 tokens, blocks of 4, one short: chunks of 1 block (the last one short) and of all 3."""
    monkeypatch.setattr(kernels, "CHUNK_SCORES", blocks_a_chunk * 2 * HEADS * 4 * 8)  # B H bs KB*bs a block
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, HEADS, 10, 8, requires_grad=True) for _ in range(3))
    block_idx = torch.tensor([[[0, 1], [1, 0], [2, 0]], [[0, 2], [1, 2], [2, 1]]])  # [2, 3 query blocks, 2]
    reference = dense_reference_of_blocks(q, k, v, block_idx, 4, causal)
    trained, _ = attend_to_selected_blocks(q, k, v, block_idx, 4, causal)
    with torch.no_grad():
        evaluated, _ = attend_to_selected_blocks(q, k, v, block_idx, 4, causal)
    torch.testing.assert_close(trained, reference)
    torch.testing.assert_close(evaluated, reference)
    grads = torch.autograd.grad(trained.square().sum(), (q, k, v))
    for grad, expected in zip(grads, torch.autograd.grad(reference.square().sum(), (q, k, v))):
        torch.testing.assert_close(grad, expected)


def test_top_k_below_the_always_kept_keys_is_refused():
    with pytest.raises(ValueError, match="attention.top_k=5"):
        SparseAttention(DIM, HEADS, top_k=5, local_window=4, global_tokens=1)  # even causal: 1 + 4 + 1 keys


def test_top_k_that_holds_only_the_causal_window_serves_a_decoder_but_not_an_encoder():
    """1 global + 4 keys before the query + itself = 6 fit a causal call; called both ways
    the window's other 4 keys make 10, so the first bidirectional call is refused."""
    layer = SparseAttention(DIM, HEADS, top_k=6, local_window=4, global_tokens=1)
    x = torch.randn(1, 12, DIM)
    assert torch.isfinite(layer(x, is_causal=True)).all()
    with pytest.raises(ValueError, match=r"attention.top_k=6 .* at least the 10 always-kept keys"):
        layer(x)


# ------------------------------------------------------------------ outside the selection: nothing
def test_unselected_keys_get_exactly_zero_weight():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, 10, 8) for _ in range(3))
    idx = torch.stack([torch.randperm(10)[:3] for _ in range(10)]).unsqueeze(0)  # [1, 10, 3]
    out, weights = attend_to_selected_keys(q, k, v, idx)
    assert weights.shape == (1, HEADS, 10, 3)
    t = 5
    unselected = [s for s in range(10) if s not in idx[0, t].tolist()]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, unselected] = 1e3 * torch.randn(1, HEADS, len(unselected), 8)
    v2[:, :, unselected] = 1e3 * torch.randn(1, HEADS, len(unselected), 8)
    assert torch.equal(attend_to_selected_keys(q, k2, v2, idx)[0][:, :, t], out[:, :, t])


def test_unselected_key_blocks_get_exactly_zero_weight():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, HEADS, 10, 8) for _ in range(3))  # blocks of 4: {0-3}, {4-7}, {8, 9}
    block_idx = torch.tensor([[[0, 2], [1, 0], [2, 1]]])  # [1, 3 query blocks, 2 key blocks]
    out, _ = attend_to_selected_blocks(q, k, v, block_idx, block_size=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:8] += 100.0  # key block 1: not selected by query block 0 (tokens 0-3)
    v2[:, :, 4:8] += 100.0
    out2, _ = attend_to_selected_blocks(q, k2, v2, block_idx, block_size=4)
    assert torch.equal(out2[:, :, :4], out[:, :, :4])
    assert not torch.allclose(out2[:, :, 4:8], out[:, :, 4:8])  # block 1 itself sees the change


@pytest.mark.parametrize("granularity,top_k,kernel", [("token", 8, "gather"), ("token", 8, "mask"),
                                                     ("block", 12, "gather")])
def test_unselected_keys_get_exactly_zero_gradient_from_a_query(granularity, top_k, kernel):
    # block: 3 key blocks of 4 for each query block, the class token's block, its own, one picked
    sparse, _ = sparse_and_dense(top_k=top_k, local_window=1, global_tokens=1, granularity=granularity,
                                 block_size=4, kernel=kernel)
    x = torch.randn(1, 29, DIM, requires_grad=True)
    t = 17
    idx = sparse.select(x)[0]  # [N, K] or [NB, KB]
    if granularity == "token":
        selected = set(idx[t].tolist())
    else:
        selected = {blk * 4 + i for blk in idx[t // 4].tolist() for i in range(4)}
    assert len(selected) == top_k
    sparse(x)[0, t].sum().backward()  # x_s reaches query t only through key s and value s
    touched = {s for s in range(29) if x.grad[0, s].abs().sum() > 0}
    assert touched == selected | {t}


def test_mask_kernel_computes_what_the_gather_kernel_does():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, HEADS, 12, 8, requires_grad=True) for _ in range(3))
    idx = torch.stack([torch.randperm(12)[:5] for _ in range(24)]).view(2, 12, 5)  # [B, N, K]
    results = []
    for attend in (attend_to_selected_keys, attend_with_key_mask):
        out, weights = attend(q, k, v, idx)
        grads = torch.autograd.grad(out.square().sum() + weights.sum(), (q, k, v))
        results.append((out, weights, *grads))
    for gathered, masked in zip(*results):
        torch.testing.assert_close(masked, gathered, rtol=1e-5, atol=1e-6)


def test_mask_kernel_is_refused_outside_token_granularity():
    with pytest.raises(ValueError, match="attention.kernel"):
        SparseAttention(DIM, HEADS, granularity="block", kernel="mask")
    with pytest.raises(ValueError, match="attention.kernel"):
        SparseAttention(DIM, HEADS, kernel="dense")


# ------------------------------------------------------------------ cost follows the selection
@pytest.mark.parametrize("kernel", ["gather", "mask"])
def test_flops_count_the_keys_each_kernel_attends(kernel):
    n, k, hi, di = 256, 16, 4, 16
    sparse = SparseAttention(DIM, HEADS, top_k=k, indexer_heads=hi, indexer_dim=di, kernel=kernel).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sparse(torch.empty(2, n, DIM, device="meta"))
    attended = k if kernel == "gather" else n  # the mask kernel scores every key, then masks
    per_sample = (2 * n * DIM * 3 * DIM + 2 * n * DIM * DIM            # qkv, proj
                  + 2 * n * DIM * (hi * di + di + hi)                  # indexer projections
                  + 2 * n * n * hi * di + 2 * n * n * hi               # indexer scores, head weighting
                  + 2 * 2 * n * attended * DIM)                        # QK^T and AV
    assert counter.get_total_flops() == 2 * per_sample


# ------------------------------------------------------------------ training the indexer
@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("warmup", [False, True])
def test_main_loss_gives_the_indexer_no_gradient_and_its_kl_loss_trains_only_it(granularity, warmup):
    sparse, _ = sparse_and_dense(top_k=8, local_window=1, granularity=granularity, block_size=4)
    sparse.dense_warmup = warmup
    out = sparse(torch.randn(2, 23, DIM))
    kl = sparse.indexer_loss
    out.square().sum().backward(retain_graph=True)
    assert all(p.grad is None for p in sparse.indexer.parameters())
    assert sparse.qkv.weight.grad is not None
    sparse.zero_grad(set_to_none=True)
    kl.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sparse.indexer.parameters())
    assert all(p.grad is None for name, p in sparse.named_parameters() if not name.startswith("indexer."))


def test_indexer_loss_only_in_training_forwards_and_collected_once():
    sparse, _ = sparse_and_dense(top_k=8, local_window=1, indexer_loss_weight=0.5)
    model = torch.nn.Sequential(sparse)
    x = torch.randn(2, 23, DIM)
    model(x)
    aux = auxiliary_loss(model)
    assert aux.weighted.item() == pytest.approx(0.5 * aux.mean_kl.item()) and aux.mean_kl.item() > 0
    assert auxiliary_loss(model) is None  # collected and cleared
    with torch.inference_mode():  # a gate's scoring forward
        model(x)
    assert auxiliary_loss(model) is None
    model.eval()
    model(x)
    assert auxiliary_loss(model) is None


def test_warmup_epochs_run_dense_attention_and_train_only_the_indexer():
    sparse, dense = sparse_and_dense(top_k=8, local_window=1, warmup_epochs=1)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), sparse)
    x = torch.randn(2, 23, DIM)
    set_attention_epoch(model, 1)
    assert sparse.dense_warmup
    torch.testing.assert_close(sparse(x), dense(x))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"1.indexer.{name}" for name, _ in sparse.indexer.named_parameters()}
    set_attention_epoch(model, 2)
    assert not sparse.dense_warmup and all(p.requires_grad for p in model.parameters())
    assert not torch.allclose(sparse(x), dense(x))  # 8 of 23 keys: no longer dense


def test_a_parameter_frozen_on_purpose_stays_frozen_after_the_warmup():
    sparse, _ = sparse_and_dense(top_k=8, local_window=1, warmup_epochs=1)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM), sparse)
    model[0].weight.requires_grad_(False)  # e.g. a frozen embedding or FastNet's whitening filters
    for epoch in (1, 2, 3):
        set_attention_epoch(model, epoch)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"0.weight"}


# ------------------------------------------------------------------ through train.py
def test_vit_with_sparse_attention_composes_from_config():
    cfg = compose_config(["model=vit", "attention=sparse", "attention.top_k=24"])
    model = instantiate(cfg.model, num_classes=10)
    attns = [block.attn for block in model.blocks]
    assert all(isinstance(a, SparseAttention) for a in attns) and len(attns) == 6
    assert attns[0].top_k == 24 and attns[0].granularity == "token"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_vit_with_sparse_attention_trains_and_logs_the_indexer_loss(tmp_path):
    result = run_train(tmp_path, *TINY, "model=vit", "attention=sparse", "gate=none",
                       "training.limit_train_batches=3", "training.batch_size=32", "dataset.num_test=64",
                       env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path)
    assert summary["attention"] == "sparse" and summary["samples_trained"] == 96
    assert 0 < records[0]["indexer_loss"] < 10 and math.isfinite(records[0]["train_loss"])


def test_block_granularity_runs_with_the_groups_own_defaults():
    """`attention=sparse attention.granularity=block` at the ViT's 65 tokens: the group's
    top_k and block_size must fit together (the issue found block_size 64 refused)."""
    from conftest import compose_config
    from hydra.utils import instantiate

    cfg = compose_config(["model=vit", "attention=sparse", "attention.granularity=block"])
    layer = instantiate(cfg.attention)(dim=192, num_heads=3, qkv_bias=True)
    out = layer(torch.randn(2, 65, 192))
    assert out.shape == (2, 65, 192) and layer.block_size * 2 == layer.top_k


@pytest.mark.slow
def test_init_from_a_dense_run_then_warm_up_evaluates_as_the_dense_model(tmp_path, tiny):
    """DeepSeek's recipe in two runs: a sparse ViT initialised from a dense run's weights
    (indexers missing, allowed), whose warm-up epoch runs dense with the backbone frozen, must
    evaluate exactly as the dense model did; that epoch is counted at what it ran (no backbone
    backward), far below a sparse epoch's FLOPs."""
    from conftest import read_run, run_train

    vit = [*tiny, "model=vit", "gate=none", "dataset.num_train=256", "dataset.num_test=128",
           "model.depth=2"]  # shallow: the recipe's mechanics are the point
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    assert run_train(dense, *vit, "attention=dense").returncode == 0
    result = run_train(sparse, *vit, "attention=sparse", f"init_from={dense}/checkpoints/last.pt",
                       "attention.warmup_epochs=1", "training.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (dense_record,), _ = read_run(dense)
    warmup, sparse_epoch = read_run(sparse)[0]
    assert warmup["val_acc"] == dense_record["val_acc"]
    assert warmup["flops_training"] < 0.5 * sparse_epoch["flops_training"]
    refused = run_train(tmp_path / "cnn", *tiny, "model=cnn", f"init_from={dense}/checkpoints/last.pt")
    assert refused.returncode == 1 and "does not fit this model" in refused.stdout


# ------------------------------------------------------------------ causal: never a later token
KERNELS = [("token", "gather"), ("token", "mask"), ("block", "gather")]



# ------------------------------------------------------------------ causal sparse attention
@pytest.mark.parametrize("granularity,kernel", KERNELS)
@pytest.mark.parametrize("n", [64, 37, 1])
@pytest.mark.filterwarnings("ignore:attention.top_k")  # covering every key is the point here
def test_causal_sparse_equals_dense_causal_when_top_k_covers_every_key(granularity, kernel, n):
    sparse, dense = sparse_and_dense(top_k=128, granularity=granularity, block_size=8, kernel=kernel)
    x = torch.randn(2, n, DIM)
    outs, grads = [], []
    for module in (sparse, dense):
        leaf = x.clone().requires_grad_(True)
        out = module(leaf, is_causal=True)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([leaf.grad, module.qkv.weight.grad, module.proj.weight.grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for g_sparse, g_dense in zip(*grads):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity,kernel", KERNELS)
@pytest.mark.parametrize("warmup", [False, True])
def test_no_output_depends_on_a_later_token(granularity, kernel, warmup):
    """Change every token after position t: the outputs at positions <= t, and the indexer's
    choice for them, stay the same, with top_k well below the length (keys are dropped)."""
    sparse, _ = sparse_and_dense(top_k=16, local_window=0, global_tokens=1, granularity=granularity, block_size=8,
                            kernel=kernel)
    sparse.dense_warmup = warmup
    x = torch.randn(2, 48, DIM)
    for t in (0, 7, 8, 20, 46):
        later = x.clone()
        later[:, t + 1:] = torch.randn_like(later[:, t + 1:])
        torch.testing.assert_close(sparse(later, is_causal=True)[:, :t + 1], sparse(x, is_causal=True)[:, :t + 1],
                                   rtol=1e-5, atol=1e-6)


def test_causal_selection_scores_no_future_key():
    """Token granularity, by hand: 6 keys, top_k 3, the indexer preferring the last keys. Query 0
    has one past key: its other picks are padding (future) and the kernels mask them."""
    key_score = torch.arange(6.0).view(1, 6, 1)  # key s scores s for every query
    features = IndexerFeatures(torch.ones(1, 6, 1, 1), torch.ones(1, 6, 1), key_score)
    idx = select_keys(features, top_k=3, global_keys=0, local_radius=0, query_chunk=4, causal=True)  # [1, 6, 3]
    for t in range(6):
        past = sorted(s for s in idx[0, t].tolist() if s <= t)
        best = sorted(range(t + 1), reverse=True)[:3]  # itself (forced) and its highest-scoring past keys
        assert past == sorted(best)


def test_indexer_loss_is_finite_with_future_padding():
    sparse, _ = sparse_and_dense(top_k=16, local_window=0, granularity="token")
    sparse.train()
    sparse(torch.randn(2, 32, DIM), is_causal=True)  # queries 0..14 have fewer than 16 past keys
    assert torch.isfinite(sparse.indexer_loss) and sparse.indexer_loss >= 0
