"""attnkit inside HuggingFace transformers (v5) models.

    import attnkit.integrations.hf as ak_hf
    ak_hf.register()
    model.set_attn_implementation("attnkit")
    # or: AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnkit")

:func:`register` adds the name ``"attnkit"`` to transformers' ``AttentionInterface``
(the attention of every layer that routes through it: Llama, Mistral, Qwen2, Gemma 2,
GPT-OSS, T5, ...) and to its ``AttentionMaskInterface`` (the masks those models build:
causal, sliding window, padding, packed sequences), so masks arrive as attnkit mask
objects instead of dense (B, 1, L, S) tensors. Outputs equal "eager" at every position
that is not padding.

Needs ``transformers>=5.15,<6`` (from a checkout: ``pip install -e ".[hf]"``).
"""

from __future__ import annotations

try:
    import transformers as _transformers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("attnkit.integrations.hf needs transformers>=5.15,<6: from a checkout "
                      "of attnkit, pip install -e '.[hf]'") from err

if tuple(int(x) for x in _transformers.__version__.split(".")[:2]) < (5, 15):  # pragma: no cover
    raise ImportError(f"attnkit.integrations.hf needs transformers>=5.15,<6, found "
                      f"{_transformers.__version__}")

from .attention import attention_forward
from .mask_interface import PreparedMask, build_mask

__all__ = ["NAME", "register", "attention_forward", "build_mask", "PreparedMask"]

#: the ``attn_implementation`` name :func:`register` adds
NAME = "attnkit"


def register() -> None:
    """Register ``"attnkit"`` with transformers' attention and attention-mask interfaces.

    Afterwards ``model.set_attn_implementation("attnkit")`` and
    ``from_config(config, attn_implementation="attnkit")`` route every layer that goes
    through ``AttentionInterface`` to :func:`attention_forward`, and the masks those
    models build to :func:`build_mask`. Calling it again is harmless.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, build_mask)


# --------------------------------------------------------------------------------------
# patch(model) replaces, in place, the attention modules the interface cannot reach or
# cannot make linear in memory - T5 (relative bias computed tile by tile, shared across
# layers), Longformer (local + global) and BigBird (block-sparse, and its full-attention
# fallback) - with attnkit modules holding the same weights under the same state_dict
# keys. patch.py finds them; t5.py, longformer.py, bigbird.py and deepseek.py replace them.
# --------------------------------------------------------------------------------------
from .patch import SUPPORTED, patch  # noqa: E402

__all__ += ["patch", "SUPPORTED"]
