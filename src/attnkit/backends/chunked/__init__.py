"""The tiled engine (``backend="chunked"``), split by job:

* :mod:`.plan`      pure tiling: which key blocks each query tile needs (Segment, Gathered)
* :mod:`.additive`  the mask-and-bias term of each tile, one owner for its caches
* :mod:`.kernels`   fused (torch's CPU flash kernel, :mod:`.fused`) and eager kernels
* :mod:`.merge`     merging a tile's parts over disjoint key sets
* :mod:`.forward`, :mod:`.backward`   the autograd loops
* :mod:`.attention` the entry points
"""

from .attention import chunked_attention, chunked_attention_backward, planned_entries
from .plan import BLOCK_K, BLOCK_Q, MERGE_KEYS, Gathered, Segment, Tile, plan_tiles



def not_supported_reasons(problem) -> list[str]:
    """The tiled engine computes every call the contract describes."""
    return []


__all__ = ["not_supported_reasons", "chunked_attention", "chunked_attention_backward",
           "planned_entries", "plan_tiles", "Tile", "Segment", "Gathered", "BLOCK_Q", "BLOCK_K",
           "MERGE_KEYS"]
