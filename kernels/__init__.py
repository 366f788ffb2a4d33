"""Attention statistics recomputed from captured queries and keys (Triton on GPU, PyTorch reference twin)."""

from .reference import call_attention, dense_attention

__all__ = ["call_attention", "dense_attention"]
