"""``patch(model)``: attnkit modules in place of T5's, Longformer's, BigBird's and
DeepSeek-V3's attention.

:func:`register` reaches every layer that calls transformers' ``AttentionInterface``. Four
families need more than that; each has a module here that knows its transformers classes
and how to replace them (:func:`patch` only finds them and dispatches):

* **T5 / mT5** (:mod:`.t5`) route through the interface, but hand it a dense
  ``(1, H, L, S)`` relative position bias that the first layer computes and every later
  layer reuses; here the bias is an attnkit object evaluated tile by tile.
* **Longformer** (:mod:`.longformer`) and **BigBird** (:mod:`.bigbird`) compute attention
  in their own modules (``set_attn_implementation`` does nothing for them).
* **DeepSeek-V3** (:mod:`.deepseek`) routes through the interface, but its module rebuilds
  every cached token's keys and values from the compressed cache at each step; here
  decoding attends to the latents themselves (MLA's absorbed form).

=====================================  ==============================================
transformers module                    replaced by (same parameter names)
=====================================  ==============================================
``T5Attention``, ``MT5Attention``      :class:`~.t5.AttnkitT5Attention`
``LongformerSelfAttention``            :class:`~.longformer.AttnkitLongformerSelfAttention`
                                       (:class:`attnkit.layers.LongformerAttention`)
``BigBirdBlockSparseAttention``        :class:`~.bigbird.AttnkitBigBirdBlockSparseAttention`
                                       (:class:`attnkit.layers.BigBirdAttention`,
                                       ``pattern="hf"``: HF's layout and eval plan)
``BigBirdSelfAttention`` (full)        :class:`~.bigbird.AttnkitBigBirdSelfAttention`
``DeepseekV3Attention``                :class:`~.deepseek.AttnkitDeepseekV3Attention`
                                       (:class:`attnkit.layers.MultiHeadLatentAttention`)
=====================================  ==============================================

The replacements take over the very ``nn.Linear`` / ``nn.Embedding`` modules of the ones
they replace (no copy), so ``state_dict`` keys and values are unchanged and checkpoints
load either way. BigBird's wrappers become :class:`~.bigbird.BigBirdAttentionSwitch`,
which follows the model's switches between full and block-sparse attention (see
:mod:`.bigbird`).
"""

from __future__ import annotations

from torch import nn

from . import bigbird, deepseek, deepseek_sparse, longformer, t5
# the classes by their former home, so that models pickled with them still load
from .bigbird import (AttnkitBigBirdBlockSparseAttention, AttnkitBigBirdSelfAttention,
                      BigBirdAttentionSwitch)
from .deepseek import AttnkitDeepseekV3Attention
from .longformer import AttnkitLongformerSelfAttention
from .t5 import AttnkitT5Attention

__all__ = ["patch", "SUPPORTED", "FAMILIES", "AttnkitT5Attention",
           "AttnkitLongformerSelfAttention", "AttnkitBigBirdBlockSparseAttention",
           "AttnkitBigBirdSelfAttention", "BigBirdAttentionSwitch", "AttnkitDeepseekV3Attention"]

#: what :func:`patch` replaces, for error messages and the docs
SUPPORTED = ("T5 and mT5 (T5Attention / MT5Attention: encoder and decoder self-attention "
             "with the shared relative position bias, cross-attention, KV caches)",
             "Longformer (LongformerSelfAttention: sliding window + global tokens)",
             "BigBird (BigBirdAttention: block-sparse, and the full-attention fallback)",
             "DeepSeek-V3 (DeepseekV3Attention: MLA, absorbed decoding from the compressed "
             "cache)",
             "DeepSeek-V3.2 (DeepseekV32Attention: DSA, attention over the indexer's top-k "
             "keys only)")

#: one module per model family, each with ``hf_classes()`` (the transformers classes it
#: replaces), ``replace(parent, name, child)``, ``MODULES`` (its attnkit modules) and
#: ``USES_MASK_INTERFACE`` (whether the model must switch to the "attnkit" masks)
FAMILIES = (t5, longformer, bigbird, deepseek, deepseek_sparse)

ATTNKIT_MODULES = tuple(m for family in FAMILIES for m in family.MODULES)


def _hf_classes() -> dict:
    """The transformers classes patch() recognises -> their family module."""
    return {cls: family for family in FAMILIES for cls in family.hf_classes()}


def _unsupported(model: nn.Module) -> ValueError:
    lines = "\n".join(f"  - {s}" for s in SUPPORTED)
    return ValueError(
        f"patch() found no attention module it can replace in {type(model).__name__}. "
        f"It supports:\n{lines}\n"
        f"Models whose attention goes through transformers' AttentionInterface (Llama, "
        f"Mistral, Qwen2, Gemma 2, GPT-OSS, ...) need no patch: call "
        f"attnkit.integrations.hf.register() and then model.set_attn_implementation('attnkit').")


def patch(model: nn.Module) -> nn.Module:
    """Replace, in place, the attention modules of T5 / mT5, Longformer, BigBird and
    DeepSeek-V3 models by attnkit modules holding the same parameters under the same
    ``state_dict`` keys; returns ``model``.

    T5: every ``T5Attention`` becomes :class:`AttnkitT5Attention` (relative position bias
    evaluated tile by tile, shared across layers as an attnkit bias object), and the model
    is switched to the "attnkit" attention implementation (:func:`register`) so that its
    padding and causal masks reach the layers as attnkit mask objects, not (B, 1, L, S)
    tensors. Longformer: every ``LongformerSelfAttention`` becomes
    :class:`AttnkitLongformerSelfAttention`. BigBird: see the module docstring.
    DeepSeek-V3: every ``DeepseekV3Attention`` becomes :class:`AttnkitDeepseekV3Attention`
    (MLA; absorbed decoding from transformers' compressed cache).

    Calling it again is harmless. Raises TypeError if ``model`` is not an ``nn.Module``,
    ValueError (listing what is supported) if it holds none of these modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")
    classes = _hf_classes()
    if type(model) in classes:
        raise ValueError(f"patch() replaces modules inside a model; got a bare "
                         f"{type(model).__name__}. Pass the model that holds it, or build "
                         f"the attnkit module with its from_hf classmethod.")
    found = [(parent, name, child, classes[type(child)])
             for parent in model.modules() for name, child in parent.named_children()
             if type(child) in classes]
    if not found and not any(isinstance(m, ATTNKIT_MODULES) for m in model.modules()):
        raise _unsupported(model)
    for parent, name, child, family in found:
        family.replace(parent, name, child)
    if any(family.USES_MASK_INTERFACE for *_, family in found) and hasattr(
            model, "set_attn_implementation"):
        _use_attnkit_masks(model)
    return model


def _use_attnkit_masks(model: nn.Module) -> None:
    """Switch ``model`` to the "attnkit" implementation, so that its masks arrive as attnkit
    mask objects. T5's encoder and decoder stacks hold configs of their own, which some
    transformers releases (5.15, 5.16) do not switch along with the model's: switch each."""
    from . import NAME, register
    register()
    model.set_attn_implementation(NAME)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", NAME) != NAME and hasattr(
                module, "set_attn_implementation"):
            module.set_attn_implementation(NAME)
