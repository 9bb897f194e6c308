"""Attention backends: one formula, four ways to compute it.

* :mod:`.reference` - the textbook formula, materialises the scores;
* :mod:`.chunked`   - tiled online softmax, linear memory, skips masked-out tiles;
* :mod:`.torch_sdpa` - torch's fused SDPA for dense and simple masks;
* :mod:`.flex`      - torch FlexAttention, compiled, opt-in.
"""

from .chunked import chunked_attention
from .reference import reference_attention
from .torch_sdpa import torch_attention

BACKENDS = ("auto", "reference", "chunked", "torch", "flex")

__all__ = ["BACKENDS", "chunked_attention", "reference_attention", "torch_attention"]
