"""Key/value caches for incremental decoding.

A decoder that generates token t needs the keys and values of tokens 0..t-1 again;
caching them turns each step from O(t^2) into O(t) work. Keys and values are stored as
(B, Hkv, S, D): with grouped-query attention the cache holds Hkv heads, not Hq, which is
the whole memory saving of GQA/MQA at inference.

* :mod:`.growing`: :class:`KVCache`, grows with the sequence; ragged batches;
* :mod:`.rolling`: :class:`SlidingWindowCache`, constant memory for windowed attention;
* :mod:`.sink`: :class:`SinkCache`, StreamingLLM's sinks + window, positions in the cache;
* :mod:`.paged`: :class:`PagedKVCache`, a block pool and block tables, shared prefixes;
* :mod:`.latent`: :class:`LatentCache`, MLA's compressed latents.
"""

from .growing import KVCache
from .latent import LatentCache
from .paged import PagedKVCache
from .rolling import SlidingWindowCache
from .sink import SinkCache

__all__ = ["KVCache", "SlidingWindowCache", "SinkCache", "PagedKVCache", "LatentCache"]
