"""What the attnkit modules :func:`~attnkit.integrations.hf.patch` installs share: the
calling conventions of transformers' attention modules that are not model-specific."""

from __future__ import annotations

__all__ = ["the_cache", "wants_probabilities", "no_probabilities"]


def the_cache(cache, past_key_values):
    """The layer's KV cache, under either of the names transformers has passed it by:
    ``cache`` (from 5.24) or ``past_key_values`` (before; deprecated until 5.40)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got two different caches, `cache` and `past_key_values`; "
                         "pass one (transformers 5.24 renamed `past_key_values` to `cache`)")
    return past_key_values if cache is None else cache


def wants_probabilities(module, kwargs, flag=False) -> bool:
    """Whether the caller asks for attention probabilities: ``flag``, else
    ``kwargs["output_attentions"]``, else the module's ``config.output_attentions``."""
    if flag:
        return True
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(flag)


def no_probabilities(module, kwargs, flag=False) -> None:
    """Raise NotImplementedError if the caller asks for attention probabilities."""
    if wants_probabilities(module, kwargs, flag):
        raise NotImplementedError(
            f"{type(module).__name__} (attnkit) does not return attention probabilities "
            f"(output_attentions=True); transformers records them from its own module "
            f"classes. Run the unpatched model to inspect them.")
