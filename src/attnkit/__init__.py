"""attnkit: every attention mechanism an LLM uses, as readable reference code and as a
fast, memory-lean implementation checked against it.

    import attnkit
    out = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=attnkit.masks.causal())

Where things live:

* ``attnkit.scaled_dot_product_attention``: torch's function (same arguments) plus
  mask objects, biases, softcap, sinks, weights and log-sum-exp; ``attnkit.explain``
  says which backend a call runs on and why;
* ``attnkit.masks``: masks as objects (causal, padding, sliding_window, dilated,
  global_tokens, block_sparse, document, bigbird, ...), combined with ``&`` and ``|``;
* ``attnkit.bias``: additive biases (ALiBi, dense tensors);
* ``attnkit.positional``: positions inside attention: RoPE (``RotaryEmbedding``), T5's
  relative bias, ALiBi, sinusoidal and learned embeddings, Transformer-XL's terms;
* ``attnkit.layers``: modules: ``MultiHeadAttention`` (MHA, GQA, MQA, self- and
  cross-attention, KV cache), ``MultiHeadLatentAttention`` (DeepSeek's MLA),
  ``TransformerXLAttention``, ``LongformerAttention``, ``BigBirdAttention``;
* ``attnkit.KVCache``, ``attnkit.SlidingWindowCache``, ``attnkit.LatentCache``: caches
  for decoding (the last MLA's compressed one);
* ``attnkit.distributed``: ring and Ulysses attention over torch.distributed;
* ``attnkit.integrations.hf``: transformers models on attnkit (``register()``,
  ``patch()``);
* the ``attnkit`` command: ``attnkit tour`` (the concepts with real numbers and
  pictures), ``attnkit plot`` (masks), ``attnkit bench`` (time and memory against
  peers); ``attnkit.bench`` is its library.

Internal, with no compatibility promise (the package contents below list them too):
``attnkit.backends`` (the engines behind the functional call: reference, tiled, torch,
flex), ``attnkit.tour`` and ``attnkit.viz`` (the command's teaching and drawing code),
``attnkit.cli``, ``attnkit.fonts``, and ``attnkit.checks``, ``attnkit.dtypes``,
``attnkit.lang`` (argument checks, the dtype policy, the tour's language).
"""

from . import bias, layers, masks, positional
from .cache import KVCache, LatentCache, PagedKVCache, SinkCache, SlidingWindowCache
from .functional import explain, scaled_dot_product_attention
from .layers import MultiHeadAttention

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "explain", "MultiHeadAttention", "KVCache",
           "SlidingWindowCache", "SinkCache", "PagedKVCache", "LatentCache", "masks", "bias", "positional", "layers", "__version__"]
