"""Attention layers (``nn.Module``s) built on :func:`attnkit.scaled_dot_product_attention`."""

from .multihead import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
