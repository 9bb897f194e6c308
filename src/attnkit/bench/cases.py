"""What is measured: every attention mechanism as a *case*, each with attnkit's way of
computing it and the peers a user would otherwise pick, over a sweep of lengths.

A case at one length is a :class:`Setup` (the inputs, built inside the worker process).
Each :class:`Variant` turns a setup into a zero-argument call. Cases that need a
feature another part of attnkit provides (``attnkit.positional``, layers, the HF
integration) name it in ``needs``: when it cannot be imported the case, or the variant,
is listed in the table as skipped with the reason, never a crash.

Useful work: a forward pass does ``4 * D`` flops for each *allowed* score entry (two
multiply-adds in Q K^T and in P V); a training step (forward + backward) counts three
times that. Allowed entries are counted from the mask's block structure — whole
blocks the mask allows or rules out are counted from their area, and only boundary
blocks are evaluated — so a 32k x 32k mask is never materialised.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import masks as M
from ..bias import alibi
from ..masks import EMPTY, FULL, Grid
from ..masks.grid import as_4d
from . import peers

__all__ = ["Setup", "Variant", "Case", "CASES", "count_allowed", "missing_requirement",
           "H", "D", "FULL_LENGTHS"]

H, D = 8, 64
FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK = (512,)


@dataclass
class Setup:
    """One case at one length: query (B, H, n, D), key/value (B, Hkv, n, D), the mask
    and bias objects, and anything else the case's variants need (``extra``)."""
    n: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: M.Mask | None = None
    is_causal: bool = False
    bias: object = None
    scale: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One way of computing a case.

    ``work``: "dense" when its cost is the full L x S whatever the mask ("causal" when it
    skips the upper triangle), "sparse" when it follows the allowed entries; used with
    ``mem`` (estimated bytes beyond the inputs) to skip sizes that cannot fit the budget.
    """
    label: str
    role: str                                   # "attnkit" or "peer"
    build: Callable[[Setup], Callable]
    needs: tuple = ()                           # "module" or "module:attribute"
    work: str = "sparse"
    mem: Callable[[int], float] = lambda n: 0.0
    max_length: int | None = None               # longest length it is run at
    lengths: tuple | None = None                # full run: only these lengths
    quick: bool = True                          # run in --quick
    compiled: bool = False
    #: imported (or, for "module:function", called) once per worker before the first
    #: measurement, so one-off imports are not counted as setup time and memory
    preload: tuple = ()


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    make: Callable[[int], Setup]
    variants: tuple
    lengths: tuple = FULL_LENGTHS
    quick_lengths: tuple = QUICK
    batch: int = 1
    heads: int = H
    mask: Callable[[int], M.Mask | None] = lambda n: None   # for counting allowed entries
    causal: bool = False
    kind: str = "forward"        # forward | train | decode | layer
    steps: int = 1               # decoding: tokens per call
    needs: tuple = ()
    note: str = ""

    def entries(self, n: int) -> int:
        """Allowed score entries of one call (decoding: of one token)."""
        return _entries(self, n)

    def useful_flops(self, n: int) -> float:
        factor = 12 if self.kind == "train" else 4
        return factor * D * self.entries(n)


@functools.lru_cache(maxsize=None)
def _entries(case: Case, n: int) -> int:
    if case.kind == "decode":
        return case.batch * case.heads * n
    mask = case.mask(n)
    if case.causal:
        mask = M.causal() if mask is None else M.causal() & mask
    return count_allowed(mask, n, n, case.batch, case.heads)


def _count_band(mask, L: int, S: int, heads: int) -> int:
    """Rows of a band (causal, sliding or dilated window) counted in closed form: row p
    sees keys p + t * d for t in [-left, right] that fall inside [0, S)."""
    p = torch.arange(S - L, S, dtype=torch.long).view(1, -1)
    if isinstance(mask, M.CausalMask):
        return heads * int((p + 1).clamp(0, S).sum())
    if isinstance(mask, M.SlidingWindowMask):
        d = torch.ones(1, 1, dtype=torch.long)
    else:
        d = mask.dilation.view(-1, 1)
    t_lo = torch.maximum(torch.full_like(p, -mask.left), -torch.div(p, d, rounding_mode="floor"))
    t_hi = torch.minimum(torch.full_like(p, mask.right),
                         torch.div(S - 1 - p, d, rounding_mode="floor"))
    per_head = (t_hi - t_lo + 1).clamp(min=0).sum(-1)
    return int(per_head.sum()) * (heads // per_head.numel())


def count_allowed(mask: M.Mask | None, L: int, S: int, batch: int, heads: int,
                  block: int | None = None) -> int:
    """Entries (b, h, i, j) the mask allows: bands in closed form, anything else from
    block states (whole blocks by area) plus the exact count of boundary blocks."""
    if mask is None:
        return batch * heads * L * S
    if type(mask) in (M.CausalMask, M.SlidingWindowMask, M.DilatedMask):
        return batch * _count_band(mask, L, S, heads)
    if type(mask) is M.PaddingMask:
        return int(mask.lengths.clamp(0, S).sum()) * (batch // mask.batch_size) * heads * L
    if block is None:  # a block-sparse mask's own blocks are never partial
        bs = mask.tile_hint
        block = bs if bs and 16 <= bs <= 512 else 128
    grid = Grid(L, S)
    off = grid.q_offset
    # row blocks cut where positions cross multiples of the block (the mask's own blocks)
    cuts = (m * block - off for m in range(off // block + 1, (off + L - 1) // block + 1))
    qb = [0] + [r for r in cuts if 0 < r < L] + [L]
    kb = list(range(0, S, block)) + [S]
    q_lo = torch.tensor(qb[:-1]).view(-1, 1)
    q_hi = torch.tensor(qb[1:]).view(-1, 1)
    k_lo = torch.tensor(kb[:-1]).view(1, -1)
    k_hi = torch.tensor(kb[1:]).view(1, -1)
    st = as_4d(mask.block_states(grid, q_lo, q_hi, k_lo, k_hi))
    bm = mask.batch_size or 1
    hm = mask.num_heads or 1
    st = st.expand(bm, hm, len(qb) - 1, len(kb) - 1)
    area = (q_hi - q_lo) * (k_hi - k_lo)
    total = int(((st == FULL).long() * area).sum())
    partial = ((st != FULL) & (st != EMPTY))
    for i, j in partial.any(0).any(0).nonzero().tolist():
        t = as_4d(mask.tile(grid, qb[i], qb[i + 1], kb[j], kb[j + 1]))
        t = t.expand(bm, hm, qb[i + 1] - qb[i], kb[j + 1] - kb[j])
        total += int((t.sum((-1, -2)) * partial[:, :, i, j]).sum())
    return total * (batch // bm) * (heads // hm)


#: requirements that import transformers: checked in the worker, not the parent (slow)
_HEAVY = ("attnkit.integrations",)


def missing_requirement(needs, *, heavy: bool = True) -> str | None:
    """The first requirement that cannot be imported, as a note, or None. With
    ``heavy=False`` modules that import transformers are not imported (only found)."""
    for need in needs:
        module, _, attr = need.partition(":")
        try:
            if module == "transformers" or (not heavy and module.startswith(_HEAVY)):
                if importlib.util.find_spec("transformers") is None:
                    return "transformers not installed (pip install attnkit[hf])"
                continue
            mod = importlib.import_module(module)
        except ImportError as e:
            return f"{module} not available yet ({e.__class__.__name__})"
        if attr and not hasattr(mod, attr):
            return f"{module}.{attr} not available yet"
    return None


# --------------------------------------------------------------------------- attnkit calls

def attnkit_sdpa(backend: str = "auto"):
    """``attnkit.scaled_dot_product_attention`` with the case's mask/bias objects."""
    from ..functional import scaled_dot_product_attention

    def build(s: Setup):
        def call():
            with torch.no_grad():
                return scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=s.mask,
                                                    is_causal=s.is_causal, bias=s.bias,
                                                    scale=s.scale, backend=backend)
        return call
    build.__name__ = f"attnkit_{backend}"
    return build


def attnkit_train(backend: str = "auto"):
    from ..functional import scaled_dot_product_attention

    def build(s: Setup):
        return peers._train_step(s, lambda q, k, v: scaled_dot_product_attention(
            q, k, v, attn_mask=s.mask, is_causal=s.is_causal, backend=backend))
    return build


def attnkit_decode(s: Setup):
    """``KVCache.update`` then attention for the one new query, ``is_causal=True``
    (bottom-right: the new token sees the whole cache). The cache is rewound after each
    call so every call decodes at the same context length."""
    from ..cache import KVCache
    from ..functional import scaled_dot_product_attention
    x = s.extra
    cache = KVCache()
    cache.update(x["k_context"], x["v_context"])
    n, steps = s.n, x["steps"]

    def call():
        with torch.no_grad():
            for t in range(steps):
                k, v = cache.update(x["k_new"][t], x["v_new"][t])
                out = scaled_dot_product_attention(x["q_new"][t], k, v, is_causal=True)
            call.cache_bytes = cache.nbytes * n // cache.length  # at context length n
            cache.length = n
            return out
    call.cache_bytes = cache.nbytes
    return call


def attnkit_rolling_decode(s: Setup):
    """The rolling sliding-window cache: keeps only the last ``window`` keys."""
    from .. import cache as cache_mod
    from ..functional import scaled_dot_product_attention
    x = s.extra
    cache = cache_mod.SlidingWindowCache(x["window"])
    cache.update(x["k_context"], x["v_context"])
    steps = x["steps"]
    mask = M.sliding_window(x["window"] - 1, 0)

    def call():
        with torch.no_grad():
            for t in range(steps):
                k, v = cache.update(x["k_new"][t], x["v_new"][t])
                out = scaled_dot_product_attention(x["q_new"][t], k, v, attn_mask=mask)
            call.cache_bytes = cache.nbytes
            return out
    call.cache_bytes = cache.nbytes
    return call


def _layer_class(name: str):
    """An attnkit layer by name, from ``attnkit.layers`` or its own module."""
    from .. import layers
    if hasattr(layers, name):
        return getattr(layers, name)
    module = importlib.import_module(f"attnkit.layers.{name[:-len('Attention')].lower()}")
    return getattr(module, name)


def attnkit_longformer_layer(s: Setup):
    """``LongformerAttention`` (window 2w, the first ``num_global`` tokens global)."""
    x = s.extra
    torch.manual_seed(0)
    layer = _layer_class("LongformerAttention")(x["d_model"], x["heads"], 2 * x["window"]).eval()
    is_global = torch.zeros(1, s.n, dtype=torch.bool)
    is_global[:, :x["num_global"]] = True

    def call():
        with torch.no_grad():
            return layer(x["hidden"], global_attention_mask=is_global)
    return call


def attnkit_bigbird_layer(s: Setup):
    """``BigBirdAttention`` (block 64, 3 window, 2 global, 3 random blocks)."""
    x = s.extra
    torch.manual_seed(0)
    layer = _layer_class("BigBirdAttention")(x["d_model"], x["heads"], x["block"],
                                             x["random_blocks"]).eval()

    def call():
        with torch.no_grad():
            return layer(x["hidden"])
    return call


def attnkit_patched(model_class: str, config, module_path: str, call_args=None):
    """A one-layer transformers model after ``attnkit.integrations.hf.patch``: the patched
    attention module, called with the arguments the model passes it."""
    def build(s: Setup):
        import transformers
        from ..integrations.hf import patch
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(config(s)).eval()
        patch(model)
        module = model
        for part in module_path.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        kwargs = call_args(s) if call_args else {}

        def call():
            with torch.no_grad():
                return module(s.extra["hidden"], **kwargs)
        return call
    return build


# --------------------------------------------------------------------------- setups

def _qkv(n: int, batch: int = 1, kv_heads: int = H, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H, n, D, generator=g)
    k = torch.randn(batch, kv_heads, n, D, generator=g)
    v = torch.randn(batch, kv_heads, n, D, generator=g)
    return q, k, v


def _plain(mask_fn=None, causal=False, batch=1, kv_heads=H):
    def make(n):
        return Setup(n, *_qkv(n, batch, kv_heads), mask=mask_fn(n) if mask_fn else None,
                     is_causal=causal)
    return make


def _alibi_setup(n):
    return Setup(n, *_qkv(n), is_causal=True, bias=alibi(H))


def _t5_setup(n):
    from ..positional import T5RelativeBias
    torch.manual_seed(0)
    t5 = T5RelativeBias(H)
    with torch.no_grad():
        t5.embedding.weight.normal_(0, 1.0)
    s = Setup(n, *_qkv(n), bias=t5.bias(n, n), scale=1.0)
    s.extra["module"] = t5
    return s


def _padding_lengths(n):
    return [n, n // 2]


def _decode_setup(kv_heads, window=None, steps=8):
    def make(n):
        g = torch.Generator().manual_seed(0)
        x = {"k_context": torch.randn(1, kv_heads, n, D, generator=g),
             "v_context": torch.randn(1, kv_heads, n, D, generator=g),
             "q_new": torch.randn(steps, 1, H, 1, D, generator=g),
             "k_new": torch.randn(steps, 1, kv_heads, 1, D, generator=g),
             "v_new": torch.randn(steps, 1, kv_heads, 1, D, generator=g),
             "steps": steps, "window": window}
        s = Setup(n, x["q_new"][0], x["k_context"], x["v_context"], extra=x)
        return s
    return make


def _layer_setup(**cfg):
    def make(n):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, n, cfg["d_model"], generator=g)
        s = Setup(n, hidden, hidden, hidden, extra=dict(cfg, hidden=hidden))
        return s
    return make


# --------------------------------------------------------------------------- memory estimates



def _scores(copies: float, batch: int = 1, heads: int = H):
    """A dense implementation holding ``copies`` float32 (B, H, n, n) tensors."""
    return lambda n: copies * 4 * batch * heads * n * n


def _mask_bytes(per_head: bool = False):
    """A materialised mask (1 byte) that torch converts to float (4 bytes) per call."""
    return lambda n: (H if per_head else 1) * n * n * (4 + (4 if per_head else 5))


# --------------------------------------------------------------------------- variants

AUTO = Variant("attnkit", "attnkit", attnkit_sdpa("auto"))
CHUNKED = Variant("attnkit chunked", "attnkit", attnkit_sdpa("chunked"))
SDPA = Variant("torch sdpa", "peer", peers.torch_sdpa, work="dense")
SDPA_CAUSAL = Variant("torch sdpa", "peer", peers.torch_sdpa, work="causal")
#: the textbook reference materialises the scores: kept to the lengths where it is quick
REF = Variant("reference", "peer", peers.reference, work="dense", mem=_scores(3),
              max_length=2048)
REF_B2 = Variant("reference", "peer", peers.reference, work="dense", mem=_scores(3, batch=2),
                 max_length=2048)
#: FlexAttention compiles for every shape (5-20 s each here): a few lengths per case
FLEX_DENSE = (4096,)
FLEX_SPARSE = (16384,)


def _sdpa_mask(per_head=False):
    return Variant("sdpa+mask", "peer", peers.torch_sdpa_masked, work="dense",
                   mem=_mask_bytes(per_head))


def _flex(lengths=FLEX_DENSE, quick=False):
    return Variant("flex", "peer", peers.flex, needs=("torch.nn.attention.flex_attention",),
                   lengths=lengths, quick=quick, compiled=True,
                   preload=("attnkit.bench.peers:preload_flex",))


#: the sparse cases' ``auto`` hands masks up to 4096^2 entries to torch SDPA as a dense
#: mask; the tiled engine is measured beside it at those lengths
SPARSE_CHUNKED = Variant("attnkit chunked", "attnkit", attnkit_sdpa("chunked"),
                         lengths=(1024, 2048, 4096))


T5_NEEDS = ("attnkit.positional:T5RelativeBias",)
HF = ("transformers",)
LONGFORMER_HF = ("transformers.models.longformer.modeling_longformer",)
BIGBIRD_HF = ("transformers.models.big_bird.modeling_big_bird",)
T5_HF = ("transformers.models.t5.modeling_t5",)
MISTRAL_HF = ("transformers.models.mistral.modeling_mistral", "transformers.masking_utils")
LONGFORMER = dict(d_model=512, heads=H, window=256, num_global=16)
BIGBIRD = dict(d_model=512, heads=H, block=64, random_blocks=3)
MISTRAL = dict(d_model=512, heads=H, kv_heads=2, window=512)


def _longformer_mask(n):
    return M.sliding_window(256) | M.global_tokens(list(range(16)))


def _decode_case(name, title, kv_heads):
    return Case(name, title, _decode_setup(kv_heads), kind="decode", steps=8,
                quick_lengths=(1024,),
                variants=(Variant("attnkit", "attnkit", attnkit_decode),
                          Variant("torch.cat+sdpa", "peer", peers.torch_cat_decode)))


CASES: tuple[Case, ...] = (
    Case("dense", "dense, no mask", _plain(), lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, SDPA, REF, _flex())),
    Case("causal", "causal", _plain(causal=True), lengths=FULL_LENGTHS[:5], causal=True,
         variants=(AUTO, CHUNKED, SDPA_CAUSAL, REF, _flex())),
    Case("causal_train", "causal, forward + backward", _plain(causal=True), kind="train",
         lengths=FULL_LENGTHS[:4], causal=True,
         variants=(Variant("attnkit", "attnkit", attnkit_train("auto")),
                   Variant("attnkit chunked", "attnkit", attnkit_train("chunked")),
                   Variant("torch sdpa", "peer", peers.torch_sdpa_train, work="causal"),
                   Variant("reference", "peer", peers.reference_train, work="dense",
                           mem=_scores(5), max_length=2048)),
         note="useful flops = 3 x forward"),
    Case("padding", "key padding, B=2, lengths n and n/2",
         _plain(lambda n: M.padding(_padding_lengths(n)), batch=2), batch=2,
         mask=lambda n: M.padding(_padding_lengths(n)), lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, Variant("sdpa+mask", "peer", peers.torch_sdpa_masked,
                                          work="dense"), REF_B2)),
    Case("gqa", "grouped-query, 8 query / 2 kv heads, causal",
         _plain(causal=True, kv_heads=2), causal=True, lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, Variant("sdpa gqa", "peer", peers.torch_sdpa, work="causal"),
                   Variant("sdpa repeat_kv", "peer", peers.torch_sdpa_repeat_kv, work="causal"),
                   _flex())),
    Case("mqa", "multi-query, 8 query / 1 kv head, causal",
         _plain(causal=True, kv_heads=1), causal=True, lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, Variant("sdpa gqa", "peer", peers.torch_sdpa, work="causal"),
                   Variant("sdpa repeat_kv", "peer", peers.torch_sdpa_repeat_kv, work="causal"))),
    Case("alibi", "ALiBi bias, causal", _alibi_setup, causal=True, lengths=FULL_LENGTHS[:5],
         variants=(AUTO,
                   Variant("sdpa+bias", "peer", peers.torch_sdpa_biased, work="dense",
                           mem=_scores(1.05)),
                   REF, _flex())),
    Case("t5", "T5 relative bias, bidirectional (scale 1)", _t5_setup,
         lengths=FULL_LENGTHS[:5], needs=T5_NEEDS,
         variants=(AUTO,
                   Variant("sdpa+bias", "peer", peers.torch_sdpa_biased, work="dense",
                           mem=_scores(1.05)),
                   REF, _flex())),
    Case("sliding_window", "sliding window +-256", _plain(lambda n: M.sliding_window(256)),
         mask=lambda n: M.sliding_window(256),
         variants=(AUTO, SPARSE_CHUNKED, _sdpa_mask(), REF,
                   _flex(lengths=(2048, 8192, 16384, 32768)))),
    Case("dilated", "dilated window +-128, dilation 1,1,2,2,4,4,8,8 per head",
         _plain(lambda n: M.dilated(128, 128, [1, 1, 2, 2, 4, 4, 8, 8])),
         mask=lambda n: M.dilated(128, 128, [1, 1, 2, 2, 4, 4, 8, 8]),
         variants=(AUTO, SPARSE_CHUNKED, _sdpa_mask(per_head=True), REF, _flex(FLEX_SPARSE))),
    Case("longformer", "Longformer mask: window +-256 | 16 global tokens",
         _plain(_longformer_mask), mask=_longformer_mask,
         variants=(AUTO, SPARSE_CHUNKED, _sdpa_mask(), REF, _flex(FLEX_SPARSE))),
    Case("bigbird", "BigBird mask: block 64, 3 window + 2 global + 3 random blocks",
         _plain(lambda n: M.bigbird(64)), mask=lambda n: M.bigbird(64),
         variants=(AUTO, SPARSE_CHUNKED, _sdpa_mask(), REF, _flex(FLEX_SPARSE))),
    _decode_case("decode_mha", "decoding with a KV cache, MHA (8 kv heads)", H),
    _decode_case("decode_gqa", "decoding with a KV cache, GQA (2 kv heads)", 2),
    _decode_case("decode_mqa", "decoding with a KV cache, MQA (1 kv head)", 1),
    Case("decode_window", "decoding, rolling sliding-window cache (window 4096, MHA)",
         _decode_setup(H, window=4096), kind="decode", steps=8, quick_lengths=(1024,),
         needs=("attnkit.cache:SlidingWindowCache",),
         variants=(Variant("attnkit rolling", "attnkit", attnkit_rolling_decode),
                   Variant("torch.cat window", "peer", peers.torch_cat_window_decode))),
    Case("longformer_layer", "Longformer self-attention layer, d_model 512, window 512, "
         "16 global", _layer_setup(**LONGFORMER), kind="layer", mask=_longformer_mask,
         lengths=FULL_LENGTHS[2:], quick_lengths=(512,),
         variants=(Variant("attnkit layer", "attnkit", attnkit_longformer_layer,
                           needs=("attnkit.layers.longformer:LongformerAttention",),
                           preload=("attnkit.layers.longformer",)),
                   Variant("attnkit patched", "attnkit",
                           attnkit_patched("LongformerModel", peers.longformer_config,
                                           "encoder.layer.0.attention.self",
                                           peers.longformer_call_args),
                           needs=HF + ("attnkit.integrations.hf:patch",),
                           preload=LONGFORMER_HF + ("attnkit.integrations.hf",)),
                   Variant("hf Longformer", "peer", peers.hf_longformer, needs=HF,
                           preload=LONGFORMER_HF,
                           max_length=16384))),
    Case("bigbird_layer", "BigBird block-sparse layer, d_model 512, block 64",
         _layer_setup(**BIGBIRD), kind="layer", mask=lambda n: M.bigbird(64),
         lengths=FULL_LENGTHS[2:], quick_lengths=(1024,),
         variants=(Variant("attnkit layer", "attnkit", attnkit_bigbird_layer,
                           needs=("attnkit.layers.bigbird:BigBirdAttention",),
                           preload=("attnkit.layers.bigbird",)),
                   Variant("attnkit patched", "attnkit",
                           attnkit_patched("BigBirdModel", peers.bigbird_config,
                                           "encoder.layer.0.attention.self",
                                           peers.bigbird_call_args),
                           needs=HF + ("attnkit.integrations.hf:patch",),
                           preload=BIGBIRD_HF + ("attnkit.integrations.hf",)),
                   Variant("hf BigBird", "peer", peers.hf_bigbird, needs=HF, preload=BIGBIRD_HF,
                           mem=_scores(1.2)))),
    Case("t5_layer", "T5 encoder self-attention with relative bias, d_model 512",
         _layer_setup(d_model=512, heads=H), kind="layer", lengths=(1024, 2048, 4096),
         quick_lengths=(512,),
         variants=(Variant("attnkit patched", "attnkit",
                           attnkit_patched("T5EncoderModel", peers.t5_config,
                                           "encoder.block.0.layer.0.SelfAttention"),
                           needs=HF + ("attnkit.integrations.hf:patch",),
                           preload=T5_HF + ("attnkit.integrations.hf",)),
                   Variant("hf t5 eager", "peer", peers.hf_t5("eager"), needs=HF, preload=T5_HF,
                           work="dense", mem=_scores(3)),
                   Variant("hf t5 sdpa", "peer", peers.hf_t5("sdpa"), needs=HF, preload=T5_HF,
                           work="dense", mem=_scores(2)))),
    Case("mistral_layer", "Mistral attention (GQA 8/2, RoPE, sliding window 512), d_model 512",
         _layer_setup(**MISTRAL), kind="layer", causal=True,
         mask=lambda n: M.sliding_window(511, 0), lengths=(1024, 4096, 16384),
         quick_lengths=(512,),
         variants=(Variant("attnkit", "attnkit", peers.hf_mistral("attnkit"),
                           needs=HF + ("attnkit.integrations.hf:register",),
                           preload=MISTRAL_HF + ("attnkit.integrations.hf",)),
                   Variant("hf mistral eager", "peer", peers.hf_mistral("eager"), needs=HF,
                           preload=MISTRAL_HF,
                           work="dense", mem=_scores(3)),
                   Variant("hf mistral sdpa", "peer", peers.hf_mistral("sdpa"), needs=HF,
                           preload=MISTRAL_HF,
                           work="dense", mem=_mask_bytes()))),
)


def case_by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)
