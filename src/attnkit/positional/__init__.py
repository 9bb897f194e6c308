"""Positional schemes: how attention learns order.

* absolute, added to the embeddings: :func:`sinusoidal_encoding`,
  :class:`SinusoidalPositionalEncoding` (Vaswani et al.), :class:`LearnedPositionalEmbedding`;
* a Q/K transform: :class:`RotaryEmbedding` (RoPE; rotate-half and interleaved layouts);
* biases added to the scores tile by tile: :class:`T5RelativeBias` (T5's bucketed
  relative bias, :func:`relative_position_bucket`), ALiBi (:func:`attnkit.bias.alibi`),
  and Transformer-XL's position term (:class:`TransformerXLPositionTerm`,
  :func:`relative_sinusoidal_encoding`), used by
  :class:`attnkit.layers.TransformerXLAttention`.
"""

from ..bias import ALiBi, alibi, alibi_slopes
from .absolute import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_encoding
from .relative import TransformerXLPositionTerm, relative_sinusoidal_encoding
from .rotary import RotaryEmbedding
from .t5 import T5Bias, T5RelativeBias, relative_position_bucket

__all__ = [
    "sinusoidal_encoding", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "relative_position_bucket", "T5RelativeBias", "T5Bias",
    "alibi", "alibi_slopes", "ALiBi",
    "relative_sinusoidal_encoding", "TransformerXLPositionTerm",
]
