"""Attention layers (``nn.Module``s) built on :func:`attnkit.scaled_dot_product_attention`.

* :class:`AdditiveAttention`, :class:`LuongAttention` - the score functions of RNN
  encoder-decoders (Bahdanau's additive; Luong's dot, general, concat);
* :class:`MultiHeadAttention` - MHA / GQA / MQA, self and cross, KV cache;
* :class:`MultiHeadLatentAttention` - DeepSeek's MLA: low-rank latent K/V, compressed
  cache, absorbed decoding;
* :class:`DeepSeekSparseAttention` - MLA whose queries attend to the top-k keys a
  lightning indexer picks (DeepSeek-V3.2's DSA);
* :class:`NativeSparseAttention` - NSA's gated compressed, selected and sliding branches;
* :class:`TransformerXLAttention` - relative attention with segment-level memory;
* :class:`LongformerAttention` - sliding window + global tokens (Longformer);
* :class:`BigBirdAttention` - block-sparse window + global + random blocks (BigBird).

Nothing here imports transformers: adapters to its modules (building these layers from
them, their call conventions) live in :mod:`attnkit.integrations.hf`.
"""

from .additive import AdditiveAttention, LuongAttention
from .bigbird import BigBirdAttention
from .longformer import LongformerAttention
from .latent import MultiHeadLatentAttention
from .multihead import MultiHeadAttention
from .native_sparse import NativeSparseAttention
from .sparse import DeepSeekSparseAttention, LightningIndexer
from .transformer_xl import TransformerXLAttention

__all__ = ["AdditiveAttention", "LuongAttention", "MultiHeadAttention", "MultiHeadLatentAttention", "TransformerXLAttention", "LongformerAttention",
           "BigBirdAttention", "DeepSeekSparseAttention", "LightningIndexer",
           "NativeSparseAttention"]
