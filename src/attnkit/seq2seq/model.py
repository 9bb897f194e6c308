"""A GRU encoder-decoder, with or without attention.

Encoder: embeddings, then a GRU (bidirectional by default) over the source;
``outputs`` (B, S, 2H) are the keys and values attention reads, ``final`` (B, H) the
summary the decoder starts from (the two directions' last states, projected).

Decoder, one step t (previous token y, previous state s)::

    no attention:  s' = GRU([emb(y); c],   s)   c = the encoder's final summary, fixed
    attention:     c  = attend(s, outputs)      (weights over the source, this step's own)
                   s' = GRU([emb(y); c], s)
    logits = W_out [s'; c]

so the three variants differ only in ``c``: one vector for the whole sentence (the
bottleneck of Sutskever et al. 2014 and Cho et al. 2014), or a fresh weighted average of
the encoder states at every step (Bahdanau et al. 2015), scored additively
(``"additive"``) or multiplicatively (``"general"``: Luong's q^T W k; ``"dot"`` needs a
unidirectional encoder, whose states are as wide as the decoder's).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.additive import AdditiveAttention, LuongAttention
from .task import BOS, EOS, PAD

__all__ = ["Encoder", "Decoder", "Seq2Seq", "ATTENTION_KINDS"]

ATTENTION_KINDS = (None, "additive", "dot", "general")


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, bidirectional: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.rnn = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.out_dim = hidden * (2 if bidirectional else 1)
        self.bridge = nn.Linear(self.out_dim, hidden)

    def forward(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S), lengths (B,) -> (outputs (B, S, out_dim), final (B, hidden)).
        Padding positions are skipped (packed sequences): ``final`` is each sentence's
        own last state, not the state after its padding."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(src), lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                  total_length=src.shape[1])
        final = torch.cat(list(h), -1)  # (B, directions * hidden)
        return out, torch.tanh(self.bridge(final))


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, key_dim: int,
                 attention: str | None):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.kind = attention
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.context_dim = key_dim if attention else hidden
        self.cell = nn.GRUCell(embed_dim + self.context_dim, hidden)
        self.out = nn.Linear(hidden + self.context_dim, vocab_size)
        if attention == "additive":
            self.attention = AdditiveAttention(hidden, key_dim, hidden)
        elif attention in ("dot", "general"):
            self.attention = LuongAttention(hidden, key_dim, attention)
        else:
            self.attention = None

    def step(self, y: Tensor, s: Tensor, memory: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """One step: previous tokens y (B,), state s (B, H) -> (logits (B, V), new state,
        attention weights (B, S) or None)."""
        weights = None
        if self.attention is None:
            c = memory["final"]
        else:
            c, weights = self.attention(s, memory["outputs"], key_padding_mask=memory["pad"],
                                        **memory.get("extra", {}))
        s = self.cell(torch.cat([self.embed(y), c], -1), s)
        return self.out(torch.cat([s, c], -1)), s, weights

    def memory(self, outputs: Tensor, final: Tensor, pad: Tensor) -> dict:
        memory = {"outputs": outputs, "final": final, "pad": pad}
        if isinstance(self.attention, AdditiveAttention):  # W_k k_j once per sentence
            memory["extra"] = {"projected_keys": self.attention.project_keys(outputs)}
        return memory


class Seq2Seq(nn.Module):
    """``Seq2Seq(vocab_size, attention=None | "additive" | "dot" | "general")``."""

    def __init__(self, vocab_size: int, attention: str | None = "additive", *,
                 embed_dim: int = 32, hidden: int = 64, bidirectional: bool = True):
        super().__init__()
        if attention == "dot" and bidirectional:
            raise ValueError("attention='dot' needs keys as wide as the decoder state: pass "
                             "bidirectional=False, or use 'general' (q^T W k)")
        self.attention_kind = attention
        self.encoder = Encoder(vocab_size, embed_dim, hidden, bidirectional)
        self.decoder = Decoder(vocab_size, embed_dim, hidden, self.encoder.out_dim, attention)

    def _start(self, src: Tensor, lengths: Tensor):
        outputs, final = self.encoder(src, lengths)
        pad = torch.arange(src.shape[1], device=src.device)[None] >= lengths.to(src.device)[:, None]
        return self.decoder.memory(outputs, final, pad), final

    def forward(self, src: Tensor, lengths: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: logits (B, T, V) for target tokens tgt (B, T), each step fed
        the previous true token (BOS first)."""
        memory, s = self._start(src, lengths)
        y = torch.full_like(tgt[:, 0], BOS)
        logits = []
        for t in range(tgt.shape[1]):
            out, s, _ = self.decoder.step(y, s, memory)
            logits.append(out)
            y = tgt[:, t]
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, src: Tensor, lengths: Tensor, max_len: int
                 ) -> tuple[Tensor, Tensor | None]:
        """Greedy decoding: (tokens (B, max_len), attention weights (B, max_len, S) or
        None). Tokens after a sentence's EOS are PAD."""
        memory, s = self._start(src, lengths)
        y = torch.full((src.shape[0],), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros_like(y, dtype=torch.bool)
        tokens, weights = [], []
        for _ in range(max_len):
            out, s, w = self.decoder.step(y, s, memory)
            y = out.argmax(-1).masked_fill(done, PAD)
            tokens.append(y)
            weights.append(w)
            done |= y == EOS
        return torch.stack(tokens, 1), (None if weights[0] is None else torch.stack(weights, 1))
