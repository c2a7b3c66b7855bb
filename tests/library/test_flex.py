"""The FlexAttention path of block-granularity sparse attention (attention.kernel=flex): the same
function as the gather kernel (eager forward on CPU; forward and backward compiled on CUDA), the
BlockMask it builds from a selection, and the settings it refuses."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from torch.utils.flop_counter import FlopCounterMode

from adaptive_sparse.attention.flex import selection_block_mask
from adaptive_sparse.attention.sparse import SparseAttention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose

DIM, HEADS = 32, 2  # head dimension 16: the smallest FlexAttention tiles
# (tokens, block_size, top_k, local_window, global_tokens): 4 blocks keeping 2; a short last block;
# 32-token blocks with forced neighbours and the first block
SHAPES = [(64, 16, 32, 0, 0), (72, 16, 48, 0, 0), (160, 32, 128, 32, 1)]


def gather_and_flex(tokens: int, block_size: int, top_k: int, local_window: int, global_tokens: int,
                    dim: int = DIM, heads: int = HEADS) -> tuple[SparseAttention, SparseAttention]:
    """Two block-granularity layers with the same weights, one per kernel."""
    settings = dict(granularity="block", block_size=block_size, top_k=top_k, local_window=local_window,
                    global_tokens=global_tokens)
    torch.manual_seed(0)
    gather = SparseAttention(dim, heads, kernel="gather", **settings)
    flex = SparseAttention(dim, heads, kernel="flex", **settings)
    flex.load_state_dict(gather.state_dict())
    assert -(-top_k // block_size) < -(-tokens // block_size), "the selection must drop blocks"
    return gather, flex


# ------------------------------------------------------------------ CPU: the eager forward
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tokens,block_size,top_k,local_window,global_tokens", SHAPES)
def test_flex_forward_equals_the_gather_kernel(tokens, block_size, top_k, local_window, global_tokens, causal):
    gather, flex = gather_and_flex(tokens, block_size, top_k, local_window, global_tokens)
    x = torch.randn(2, tokens, DIM)
    with torch.no_grad():
        expected = gather.eval()(x, is_causal=causal)
        torch.testing.assert_close(flex.eval()(x, is_causal=causal), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flex.train()(x, is_causal=causal), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the block mask
# 4 query blocks, each keeping 3 key blocks (its own first); causal, the later ones are padding
SELECTION = torch.tensor([[[0, 1, 3], [1, 0, 2], [2, 0, 3], [3, 2, 0]]])  # [B=1, NB=4, KB=3]
BLOCK = 16


def test_the_causal_block_mask_masks_only_the_own_block():
    mask = selection_block_mask(SELECTION, BLOCK, 4 * BLOCK, causal=True)
    expected = {  # partial: the own block; full: the strictly-past kept blocks, then the rest ascending
        "kv_num_blocks": [[[1, 1, 1, 1]]],
        "kv_indices": [[[[0, 1, 2, 3], [1, 0, 2, 3], [2, 0, 1, 3], [3, 0, 1, 2]]]],
        "full_kv_num_blocks": [[[0, 1, 1, 2]]],
        "full_kv_indices": [[[[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 1, 3]]]],
    }
    for name, value in expected.items():
        assert torch.equal(getattr(mask, name), torch.tensor(value, dtype=torch.int32)), name
    assert mask.BLOCK_SIZE == (BLOCK, BLOCK) and mask.seq_lengths == (4 * BLOCK, 4 * BLOCK)


def test_the_bidirectional_block_mask_keeps_every_selected_block_whole():
    mask = selection_block_mask(SELECTION, BLOCK, 4 * BLOCK, causal=False)
    expected = {
        "kv_num_blocks": [[[0, 0, 0, 0]]],
        "kv_indices": [[[[0, 1, 2, 3]] * 4]],
        "full_kv_num_blocks": [[[3, 3, 3, 3]]],
        "full_kv_indices": [[[[0, 1, 3, 2], [0, 1, 2, 3], [0, 2, 3, 1], [0, 2, 3, 1]]]],
    }
    for name, value in expected.items():
        assert torch.equal(getattr(mask, name), torch.tensor(value, dtype=torch.int32)), name


@pytest.mark.parametrize("causal", [True, False])
def test_the_mask_mod_alone_encodes_the_selection(causal):
    """Eager FlexAttention reads only mask_mod: token q sees key s iff s's block is selected for
    q's block (and s <= q when causal)."""
    tokens = 4 * BLOCK - 5  # a short last block
    mask = selection_block_mask(SELECTION, BLOCK, tokens, causal)
    dense = create_mask(mask.mask_mod, 1, 1, tokens, tokens, device="cpu")[0, 0]  # [T, T]
    block = torch.arange(tokens) // BLOCK  # [T]
    kept = torch.zeros(4, 4, dtype=torch.bool).scatter_(-1, SELECTION[0], True)  # [NB, NB]
    expected = kept[block][:, block]  # [T, T]
    if causal:
        expected &= torch.ones(tokens, tokens, dtype=torch.bool).tril()
    assert torch.equal(dense, expected)


# ------------------------------------------------------------------ refusals
def test_flex_refuses_cpu_training_in_one_line():
    _, flex = gather_and_flex(*SHAPES[0])
    with pytest.raises(ValueError, match="attention.kernel='flex' has no backward on cpu") as refusal:
        flex.train()(torch.randn(1, 64, DIM), is_causal=True)
    assert "\n" not in str(refusal.value)


def test_auto_trains_on_cpu_through_the_gather_kernel():
    layer = SparseAttention(DIM, HEADS, granularity="block", block_size=16, top_k=32, local_window=0,
                            global_tokens=0)
    layer(torch.randn(1, 64, DIM), is_causal=True).sum().backward()
    assert layer.qkv.weight.grad is not None


def test_flex_counts_the_gather_kernels_flops_on_the_meta_device():
    """The FLOP meter runs a meta copy of the model forward and backward: flex must not refuse it."""
    counts = []
    for layer in gather_and_flex(*SHAPES[0]):
        with FlopCounterMode(display=False) as counter:
            layer.to("meta")(torch.randn(1, 64, DIM, device="meta"), is_causal=True).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("settings", [dict(granularity="token"),  # token granularity keeps the gather kernel
                                      dict(granularity="block", block_size=8),  # below a 16-wide tile
                                      dict(granularity="block", block_size=48)])  # not a power of 2
def test_flex_is_refused_where_it_cannot_run(settings):
    with pytest.raises(ValueError, match="attention.kernel"):
        SparseAttention(DIM, HEADS, kernel="flex", top_k=32, local_window=0, global_tokens=0, **settings)


# ------------------------------------------------------------------ CUDA: compiled, with gradients
def forward_backward(layer: SparseAttention, x: torch.Tensor, causal: bool) -> list[torch.Tensor]:
    """The output, then the gradients of the input and of the attention's own parameters."""
    x = x.clone().requires_grad_(True)
    out = layer(x, is_causal=causal)
    out.float().square().sum().backward()
    params = [layer.get_parameter(name) for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")]
    return [out.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention trains on CUDA only")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tokens,block_size,top_k", [(256, 64, 128), (200, 64, 128), (128, 16, 48)])
def test_flex_forward_and_backward_equal_the_gather_kernel_on_cuda(tokens, block_size, top_k, causal, dtype,
                                                                   tolerance):
    gather, flex = (layer.to("cuda", dtype).train() for layer in gather_and_flex(
        tokens, block_size, top_k, 0, 0, dim=64, heads=2))
    x = torch.randn(2, tokens, 64, device="cuda", dtype=dtype)
    for got, expected in zip(forward_backward(flex, x, causal), forward_backward(gather, x, causal), strict=True):
        error = (got.float() - expected.float()).norm() / expected.float().norm()
        assert error < tolerance
