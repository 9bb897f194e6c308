"""The reversal task: read ``x_1 .. x_n`` and write ``x_n .. x_1``.

Every output token depends on one input token, and the first output on the last input,
so a decoder that sees only the encoder's final state must carry the whole sequence in
one vector. Tokens: 0 is padding, 1 begins the output (BOS), 2 ends it (EOS), 3.. are the
``symbols`` letters of the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReverseTask", "PAD", "BOS", "EOS"]

PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class ReverseTask:
    """Sequences of ``min_len`` .. ``max_len`` tokens over ``symbols`` letters."""
    symbols: int = 10
    min_len: int = 3
    max_len: int = 16

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.symbols < 1:
            raise ValueError(f"symbols must be >= 1, got {self.symbols}")

    @property
    def vocab_size(self) -> int:
        return self.symbols + 3

    def batch(self, size: int, g: torch.Generator, lengths: tuple[int, int] | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """(source (B, n_max), source lengths (B,), target (B, n_max + 1)): sources
        right-padded with PAD, targets the reversed source then EOS, then PAD. Lengths
        uniform in ``lengths`` (default: the task's range), both ends included."""
        lo, hi = lengths or (self.min_len, self.max_len)
        n = torch.randint(lo, hi + 1, (size,), generator=g)
        width = int(n.max())
        letters = torch.randint(3, 3 + self.symbols, (size, width), generator=g)
        src = letters.masked_fill(torch.arange(width)[None] >= n[:, None], PAD)
        return src, n, self.targets(src, n)

    @staticmethod
    def targets(src: Tensor, n: Tensor) -> Tensor:
        """The reversed sources then EOS, PAD after: (B, width + 1)."""
        size, width = src.shape
        pos = torch.arange(width)
        real = pos[None] < n[:, None]
        idx = (n[:, None] - 1 - pos[None]).clamp(min=0)  # target t holds source n - 1 - t
        tgt = torch.full((size, width + 1), PAD, dtype=torch.long)
        tgt[:, :width] = torch.where(real, src.gather(1, idx), PAD)
        tgt[torch.arange(size), n] = EOS
        return tgt

    @staticmethod
    def exact_match(predicted: Tensor, target: Tensor) -> Tensor:
        """(B,) bool: every token up to and including EOS right."""
        real = target != PAD
        same = (predicted[:, :target.shape[1]] == target) | ~real
        return same.all(1)
