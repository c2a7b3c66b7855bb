"""DeepSeek-style sparse attention: a lightning indexer picks, per query, the keys (or key blocks)
it attends to; dense warm-up epochs train the indexer alone."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention.dense import DenseAttention
from adaptive_sparse.attention.flex import attend_with_flex, flex_fits
from adaptive_sparse.attention.indexer import (
    IndexerFeatures,
    LightningIndexer,
    index_scores,
    index_scores_at,
    indexer_kl,
)
from adaptive_sparse.attention.kernels import (
    attend_to_selected_blocks,
    attend_to_selected_keys,
    attend_with_key_mask,
    later_than,
    pool_blocks,
    select_keys,
    selected_future,
)


class SparseAttention(DenseAttention):
    """Multi-head attention whose softmax runs over each query's top_k keys only (DSA-style).

    A lightning indexer on the detached input picks the keys, one selection shared by all
    heads; the `global_tokens` first tokens and a local window of `local_window` positions on
    either side of the query (in sequence order) are always kept and count against the `top_k`
    budget.

    granularity="token" is DSA's per-query selection. granularity="block" selects for query
    blocks of `block_size`: the indexer scores block-pooled queries against block-pooled keys
    and each query block keeps its top_k / block_size key blocks, gathered contiguously (the
    form that turns sparsity into wall-clock on a CPU; see docs/sparse-attention.md). There
    the always-kept keys are the blocks holding the global tokens, the query's own block and
    local_window // block_size whole blocks on either side.

    `kernel` picks how the selected keys are attended. Token granularity: "gather" (cost
    follows top_k; also what "auto" picks) or "mask" (the same function computed densely,
    faster at short lengths; see `attend_with_key_mask`); it has no FlexAttention path, whose
    masks are made of blocks. Block granularity: "gather" (the kept blocks gathered, then the
    fused SDPA kernel), "flex" (FlexAttention over a BlockMask of the same selection,
    compiled, on CUDA; on CPU only an eager forward without gradients, as FlexAttention has
    no CPU backward) or "auto": flex on CUDA when the blocks and heads tile (see
    `flex_fits`), gather elsewhere. Both compute the same function.

    In training with grad enabled, each forward leaves `indexer_loss`: the KL divergence from
    the main attention's (detached, head-averaged) distribution over the selected keys to the
    indexer's. The indexer sees x.detach(), so the main loss never reaches it and this loss
    reaches nothing else. `dense_warmup` (set by `set_attention_epoch`) swaps in dense attention
    and fits the indexer to the full distribution.

    Called with `is_causal=True` (the GPT), nothing in the future is selected, attended or used
    as a target: future keys score -inf, the local window is one-sided, the warm-up target is
    the causal attention distribution, and in block granularity a query block's indexer query
    is made from the block's first token (a mean over the block would let its earlier queries'
    selection depend on later tokens).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, top_k: int = 32,
                 local_window: int = 4, global_tokens: int = 1, indexer_heads: int = 4,
                 indexer_dim: int = 16, granularity: str = "token", block_size: int = 16,
                 query_chunk: int = 1024, indexer_loss_weight: float = 1.0, warmup_epochs: int = 0,
                 kernel: str = "auto", rope: bool = False):
        super().__init__(dim, num_heads, qkv_bias, rope)
        check_sparse_settings(top_k=top_k, local_window=local_window, global_tokens=global_tokens,
                              indexer_heads=indexer_heads, indexer_dim=indexer_dim, granularity=granularity,
                              block_size=block_size, query_chunk=query_chunk,
                              indexer_loss_weight=indexer_loss_weight, warmup_epochs=warmup_epochs,
                              kernel=kernel)
        if kernel == "flex" and not flex_fits(block_size, self.head_dim):
            raise ValueError(f"attention.kernel='flex' is not allowed with block_size={block_size} and head "
                             f"dimension {self.head_dim}: FlexAttention needs a block_size that is a power of 2 "
                             ">= 16, heads >= 16")
        self.kernel = kernel
        self.attend_to_keys = attend_with_key_mask if kernel == "mask" else attend_to_selected_keys
        self.top_k, self.local_window, self.global_tokens = top_k, local_window, global_tokens
        self.granularity, self.block_size, self.query_chunk = granularity, block_size, query_chunk
        self.indexer_loss_weight, self.warmup_epochs = indexer_loss_weight, warmup_epochs
        self.indexer = LightningIndexer(dim, indexer_heads, indexer_dim, rope)
        self.dense_warmup = False
        self.indexer_loss: torch.Tensor | None = None

    def _warn_if_dense(self, num_tokens: int) -> None:
        """Once per module: top_k at or above the sequence keeps every key, so this is dense
        attention (with an indexer's cost on top) under the name sparse."""
        if self.top_k >= num_tokens and not getattr(self, "warned_dense", False):
            self.warned_dense = True
            warnings.warn(f"attention.top_k={self.top_k} >= the {num_tokens} tokens of a sequence: every query "
                          "keeps every key, so sparse attention computes dense attention here; lower attention.top_k")

    # ------------------------------------------------------------------ selection
    def indexer_features(self, x: torch.Tensor, causal: bool = False) -> IndexerFeatures:
        """Indexer features of tokens (token granularity) or of blocks (block granularity: keys
        from block means; queries from block means, or causally from each block's first token)."""
        x = x.detach()  # DSA: the main loss must not train the indexer
        if self.granularity == "token":
            return self.indexer(x)
        keys = self.indexer(pool_blocks(x, self.block_size))
        if not causal:
            return keys
        queries = self.indexer(x[:, ::self.block_size])  # [B, NB, C]: each block's first token
        return IndexerFeatures(queries.query, queries.weight, keys.key)

    def select(self, x: torch.Tensor, features: IndexerFeatures | None = None, causal: bool = False) -> torch.Tensor:
        """Selected keys [B, N, K] (token) or key blocks [B, NB, KB] (block) for input x [B, N, C]."""
        features = self.indexer_features(x, causal) if features is None else features
        if self.granularity == "token":
            return select_keys(features, self.top_k, self.global_tokens, self.local_window, self.query_chunk,
                               causal)
        # in blocks: the blocks holding the global tokens, the query's own block and the
        # local_window // block_size whole blocks on either side of it (causal: before it)
        bs = self.block_size
        return select_keys(features, -(-self.top_k // bs), -(-self.global_tokens // bs),
                           self.local_window // bs, self.query_chunk, causal)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("SparseAttention takes no attn_mask (is_causal=True for a decoder)")
        if not is_causal and not getattr(self, "checked_two_sided", False):
            check_top_k_holds_forced_keys(self.top_k, self.local_window, self.global_tokens, self.granularity,
                                          self.block_size, causal=False)
            self.checked_two_sided = True
        q, k, v = self.split_heads(x)  # 3 x [B, H, N, D]
        self._warn_if_dense(x.shape[1])
        features = self.indexer_features(x, is_causal)
        train_indexer = self.training and torch.is_grad_enabled() and self.indexer_loss_weight > 0
        if self.dense_warmup:
            out, target, logits = self._dense_warmup(q, k, v, features, train_indexer, is_causal)
        elif self.granularity == "token":
            idx = self.select(x, features, is_causal)  # [B, N, K]
            out, weights = self.attend_to_keys(q, k, v, idx, is_causal)
            if train_indexer:  # target: head-averaged weights (DSA sums over heads, then normalises)
                target, logits = weights.detach().mean(1), index_scores_at(features, idx)  # [B, N, K] each
                if is_causal:
                    logits = logits.masked_fill(selected_future(idx), float("-inf"))
        else:
            idx = self.select(x, features, is_causal)  # [B, NB, KB]
            out, target = self._attend_to_blocks(q, k, v, idx, is_causal, train_indexer)  # target: [B, NB, KB]
            if train_indexer:
                logits = index_scores_at(features, idx)
                if is_causal:
                    logits = logits.masked_fill(selected_future(idx), float("-inf"))
        self.indexer_loss = indexer_kl(target, logits) if train_indexer else None
        return self.merge_heads(out)

    def uses_flex(self, device: torch.device) -> bool:
        """Whether block granularity runs FlexAttention on this device ("auto": on CUDA, if it
        tiles). On the meta device, where FLOPs are counted from shapes, the gather kernel stands
        in: it attends to the same key blocks, and FlexAttention does not run there."""
        if device.type == "meta":
            return False
        if self.kernel == "auto":
            return device.type == "cuda" and flex_fits(self.block_size, self.head_dim)
        return self.kernel == "flex"

    def _attend_to_blocks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                          causal: bool, with_mass: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block granularity through the kernel `kernel` picks for q's device: the output and,
        `with_mass`, the indexer's target (see `attend_to_selected_blocks`)."""
        if not self.uses_flex(q.device):
            return attend_to_selected_blocks(q, k, v, idx, self.block_size, causal, with_mass)
        if q.device.type != "cuda" and q.requires_grad:
            raise ValueError(f"attention.kernel='flex' has no backward on {q.device.type} (FlexAttention, torch "
                             f"{torch.__version__}): use attention.kernel=auto or gather, or run under torch.no_grad()")
        out = attend_with_flex(q, k, v, idx, self.block_size, causal)
        if not with_mass:
            return out, None
        with torch.no_grad():  # FlexAttention returns no weights: the target costs a second, explicit forward
            return out, attend_to_selected_blocks(q, k, v, idx, self.block_size, causal, with_mass=True)[1]

    def _dense_warmup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: IndexerFeatures,
                      train_indexer: bool, causal: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """DSA's warm-up: dense attention, and the indexer fitted to the full (causal) distribution (O(N^2))."""
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if not train_indexer:
            return out, None, None
        n = q.shape[2]
        with torch.no_grad():
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, N, N]
            if causal:
                scores = scores.masked_fill(later_than(n, q.device), float("-inf"))
            target = scores.softmax(-1).mean(1)
            if self.granularity == "block":
                bs, nb = self.block_size, -(-n // self.block_size)
                target = pool_blocks(target, bs)  # [B, NB, N]: mean over each block's queries
                target = F.pad(target, (0, nb * bs - n)).view(*target.shape[:2], nb, bs).sum(-1)  # [B, NB, NB]
        logits = index_scores(features.query, features.weight, features.key)  # [B, N or NB, N or NB]
        if causal:  # future tokens, or future blocks (j > i): never a target, never a logit
            logits = logits.masked_fill(later_than(logits.shape[1], q.device), float("-inf"))
        return out, target, logits


def check_sparse_settings(*, top_k: int, local_window: int, global_tokens: int, indexer_heads: int,
                          indexer_dim: int, granularity: str, block_size: int, query_chunk: int,
                          indexer_loss_weight: float, warmup_epochs: int, kernel: str = "auto") -> None:
    """Refuse settings that cannot work, naming the config key (attention.KEY)."""
    def require(ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            raise ValueError(f"attention.{key}={value!r} is not allowed: {allowed}")

    for key, value in (("top_k", top_k), ("indexer_heads", indexer_heads), ("indexer_dim", indexer_dim),
                       ("block_size", block_size), ("query_chunk", query_chunk)):
        require(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
    for key, value in (("local_window", local_window), ("global_tokens", global_tokens),
                       ("warmup_epochs", warmup_epochs)):
        require(isinstance(value, int) and value >= 0, key, value, "an integer >= 0")
    require(granularity in ("token", "block"), "granularity", granularity, "token or block")
    require(kernel in ("auto", "gather", "mask", "flex"), "kernel", kernel, "auto, gather, mask or flex")
    require(kernel != "mask" or granularity == "token", "kernel", kernel,
            "mask only with granularity=token (block granularity has its own fused kernel)")
    require(kernel != "flex" or granularity == "block", "kernel", kernel,
            "flex only with granularity=block (token granularity keeps the gather kernel)")
    require(indexer_loss_weight >= 0, "indexer_loss_weight", indexer_loss_weight, "a number >= 0")
    require(warmup_epochs == 0 or indexer_loss_weight > 0, "warmup_epochs", warmup_epochs,
            "0 unless indexer_loss_weight > 0 (the warm-up trains only the indexer)")
    check_top_k_holds_forced_keys(top_k, local_window, global_tokens, granularity, block_size, causal=True)


def check_top_k_holds_forced_keys(top_k: int, local_window: int, global_tokens: int, granularity: str,
                                  block_size: int, causal: bool) -> None:
    """Refuse a top_k below the always-kept keys: the global tokens, the local window (one side
    when causal, both sides otherwise) and the query's own token or block. Built, a layer is
    held to the causal count, the smaller (it does not yet know how it will be called); its
    first bidirectional call checks the other."""
    unit = 1 if granularity == "token" else block_size
    sides = 1 if causal else 2
    forced = -(-global_tokens // unit) + sides * (local_window // unit) + 1
    if forced > -(-top_k // unit):
        window = "the keys before the query in local_window" if causal else "both sides of local_window"
        raise ValueError(f"attention.top_k={top_k!r} is not allowed: at least the {forced * unit} always-kept "
                         f"keys (global_tokens + {window} + the query's own {'token' if unit == 1 else 'block'})")


class IndexerLoss(NamedTuple):
    weighted: torch.Tensor  # sum over layers of indexer_loss_weight * KL: add it to the training loss
    mean_kl: torch.Tensor   # the layers' mean KL, detached: what gets logged as indexer_loss


def auxiliary_loss(model: nn.Module) -> IndexerLoss | None:
    """Collect (and clear) the indexer losses the last forward left; None if there were none.

    Clearing means no graph outlives its step, and a loss is never counted twice.
    """
    losses = []
    for module in model.modules():
        if isinstance(module, SparseAttention) and module.indexer_loss is not None:
            losses.append((module.indexer_loss_weight, module.indexer_loss))
            module.indexer_loss = None
    if not losses:
        return None
    weighted = sum(weight * loss for weight, loss in losses)
    return IndexerLoss(weighted, torch.stack([loss.detach() for _, loss in losses]).mean())


def set_attention_epoch(model: nn.Module, epoch: int) -> None:
    """Start epoch `epoch` (1-based): epochs 1..warmup_epochs of a sparse attention are dense warm-up.

    While any layer warms up, every parameter outside the indexers is frozen (requires_grad
    False), so only the indexers train, and the frozen weights cost no backward pass and get no
    optimiser update (Adam skips parameters without a gradient; zeroing their gradients instead
    would still let weight decay and momentum move them). Afterwards each parameter trains
    again as it did before the warm-up: one frozen on purpose (FastNet's whitening filters, a
    frozen embedding) stays frozen. A model without SparseAttention is left untouched.
    """
    sparse = [m for m in model.modules() if isinstance(m, SparseAttention)]
    if not sparse:
        return
    for module in sparse:
        module.dense_warmup = epoch <= module.warmup_epochs
    warming_up = any(m.dense_warmup for m in sparse)
    indexer_params = {id(p) for m in sparse for p in m.indexer.parameters()}
    for param in model.parameters():
        if id(param) in indexer_params:
            continue
        if warming_up:
            if not hasattr(param, "trains_after_warmup"):  # its own setting, kept once
                param.trains_after_warmup = param.requires_grad
            param.requires_grad_(False)
        else:
            param.requires_grad_(getattr(param, "trains_after_warmup", param.requires_grad))


class AttentionWarmup:
    """A model's sparse attention layers as one per-epoch part (`start_epoch`, as a gate's):
    `set_attention_epoch` for the epoch."""

    def __init__(self, model: nn.Module):
        self.model = model

    def start_epoch(self, epoch: int) -> None:
        set_attention_epoch(self.model, epoch)
