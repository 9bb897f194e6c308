"""One run of the tour (:class:`Tour`), its texts by language, and the tensor helpers
every section uses."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from .. import scaled_dot_product_attention, viz
from .memory import MemoryProbe
from .text_en import EN
from .text_zh import ZH

#: the tour's texts by language code
TEXT = {"en": EN, "zh": ZH}


def picture_name(name: str, lang: str) -> str:
    """The file a picture is written to: ``name`` in English, ``01_x.zh.png`` in another
    language, so that runs in two languages into one folder keep both sets."""
    return name if lang == "en" else name.replace(".png", f".{lang}.png")


class Tour:
    """Shared state of one run: language, output folder, seed, pictures written."""

    def __init__(self, lang: str, out: Path, seed: int):
        self.lang, self.out, self.seed = lang, out, seed
        self.T = TEXT[lang]
        self.pictures: list[Path] = []
        self.memory: MemoryProbe | None = None
        self.t0 = time.perf_counter()

    def t(self, key: str, **kw) -> str:
        """The text ``key`` in the run's language, with ``kw`` filled in."""
        return self.T[key].format(**kw)

    def say(self, key: str, **kw) -> None:
        """Print the text ``key``, indented by two spaces."""
        print("\n".join("  " + line if line else "" for line in self.t(key, **kw).split("\n")))

    def show(self, text: str) -> None:
        """Print ``text`` as it is (a table or a matrix)."""
        print(text)

    def gen(self, offset: int) -> torch.Generator:
        """A generator seeded by (seed, section offset): sections do not disturb each other."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def picture(self, fig, name: str) -> None:
        """Save ``fig`` as ``name`` in the output folder and say where it went."""
        path = viz.save(fig, self.out / picture_name(name, self.lang))
        self.pictures.append(path)
        print(f"  -> {self.t('picture', path=path)}", flush=True)


def randn(g, *shape) -> Tensor:
    """A standard normal tensor of ``shape`` drawn from the generator ``g``."""
    return torch.randn(*shape, generator=g)


def attend(q, k, v, **kw):
    """attnkit's attention on (L, d) / (H, L, d) tensors, with the weights."""
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    return out, w
