"""attnkit: every attention mechanism an LLM uses, as readable reference code and as a
fast, memory-lean implementation checked against it.

    import attnkit
    out = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=attnkit.masks.causal())
"""

from . import bias, layers, masks, positional
from .cache import KVCache, SlidingWindowCache
from .functional import explain, scaled_dot_product_attention
from .layers import MultiHeadAttention

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "explain", "MultiHeadAttention", "KVCache", "SlidingWindowCache",
           "masks", "bias", "positional", "layers", "__version__"]
