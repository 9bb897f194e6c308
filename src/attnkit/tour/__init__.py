"""``attnkit tour``: attention step by step, every number computed at run time.

Seven sections, each a function ``section_*(tour)`` that computes with attnkit's own code
(``scaled_dot_product_attention(..., return_weights=True)``, ``MultiHeadAttention``,
``KVCache``, the mask and bias objects, ``attnkit.positional``, the Transformer-XL
layer), prints small rounded tensors and writes pictures to the output folder.

    attnkit tour [--lang zh|en] [--out DIR] [--seed N]

Modules: :mod:`~attnkit.tour.driver` runs the sections in order; one module per section
(``why``, ``qkv``, ``cross``, ``heads``, ``padding``, ``positions``, ``long``, with the
memory measurement in ``memory``); :mod:`~attnkit.tour.session` holds one run's state;
:mod:`~attnkit.tour.terminal` prints tables; the texts are in ``text_en`` and ``text_zh``.
Pictures are drawn with :mod:`attnkit.viz`.
"""

from ..lang import default_lang
from .driver import PICTURES, SECTIONS, run
from .session import picture_name
from .heads import (LATENT_MODELS, REAL_MODELS, attention_params, kv_cache_bytes_per_token,
                    latent_attention_params, latent_cache_bytes_per_token)
from .memory import MEMORY_LENGTHS, MemoryProbe, peak_allocated
from .positions import T5_OFFSETS
from .qkv import qkv_example, scaling_measurements
from .session import TEXT, Tour
from .text_en import EN
from .text_zh import ZH
from .why import why_measurements

__all__ = ["run", "default_lang", "PICTURES", "SECTIONS", "picture_name", "qkv_example", "REAL_MODELS",
           "LATENT_MODELS"]
