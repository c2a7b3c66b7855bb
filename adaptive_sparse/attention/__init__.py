"""Attention layers: dense, and DeepSeek-style sparse with its lightning indexer."""
from adaptive_sparse.attention.dense import DenseAttention
from adaptive_sparse.attention.sparse import AttentionWarmup, SparseAttention, auxiliary_loss, set_attention_epoch

__all__ = ["AttentionWarmup", "DenseAttention", "SparseAttention", "auxiliary_loss", "set_attention_epoch"]
