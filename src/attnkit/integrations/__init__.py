"""Bridges from attnkit to other libraries' models.

Each bridge lives in its own submodule and imports its library only when imported, so
``import attnkit`` never needs them:

* :mod:`attnkit.integrations.hf` - HuggingFace transformers v5 (``pip install attnkit[hf]``).
"""
