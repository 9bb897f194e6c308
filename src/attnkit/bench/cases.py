"""What ``attnkit bench`` measures: every attention mechanism as a *case*, each with
attnkit's way of computing it and the peers a user would otherwise pick, over a sweep of
lengths. The data model (:class:`Case`, :class:`Variant`, allowed-entry counting) is in
:mod:`attnkit.bench.spec`, attnkit's calls and the inputs in :mod:`attnkit.bench.builders`,
the peers in :mod:`attnkit.bench.peers`.

The focused scripts in ``benchmarks/`` build their case lists from these (``Case.pick``,
``dataclasses.replace``) and run them through the same machinery.
"""

from __future__ import annotations

from . import peers
from .builders import (alibi_setup, attnkit_bigbird_layer, attnkit_decode, attnkit_paged_decode,
                       attnkit_longformer_layer, attnkit_patched, attnkit_rolling_decode,
                       attnkit_sdpa, attnkit_train, decode_setup, layer_setup, plain_setup,
                       softcap_setup, t5_setup)
from .. import masks as M
from .spec import (D, FULL_LENGTHS, H, Case, Setup, Variant, count_allowed, mask_bytes,
                   scores_bytes)

__all__ = ["CASES", "SOURCE", "case_by_name", "Case", "Variant", "Setup", "count_allowed",
           "H", "D", "FULL_LENGTHS", "AUTO", "CHUNKED", "SDPA", "SDPA_CAUSAL", "REF",
           "HF", "LONGFORMER", "BIGBIRD", "MISTRAL", "flex_variant", "sdpa_mask_variant",
           "longformer_mask"]

#: where a worker process finds these cases again
SOURCE = "attnkit.bench.cases:CASES"


# --------------------------------------------------------------------------- variants

AUTO = Variant("attnkit", "attnkit", attnkit_sdpa("auto"))
CHUNKED = Variant("attnkit chunked", "attnkit", attnkit_sdpa("chunked"))
SDPA = Variant("torch sdpa", "peer", peers.torch_sdpa, work="dense")
SDPA_CAUSAL = Variant("torch sdpa", "peer", peers.torch_sdpa, work="causal")
#: the textbook reference materialises the scores: kept to the lengths where it is quick
REF = Variant("reference", "peer", peers.reference, work="dense", mem=scores_bytes(3),
              max_length=2048)
REF_B2 = Variant("reference", "peer", peers.reference, work="dense",
                 mem=scores_bytes(3, batch=2), max_length=2048)
#: FlexAttention compiles once for every shape, which takes seconds: a few lengths per case
FLEX_DENSE = (4096,)
FLEX_SPARSE = (16384,)


def sdpa_mask_variant(per_head=False):
    """torch SDPA with the case's mask materialised (bool, or float 0/-inf per head)."""
    return Variant("sdpa+mask", "peer", peers.torch_sdpa_masked, work="dense",
                   mem=mask_bytes(per_head))


def flex_variant(lengths=FLEX_DENSE, quick=False):
    """Compiled FlexAttention with a BlockMask (and a score_mod for a bias)."""
    return Variant("flex", "peer", peers.flex, needs=("torch.nn.attention.flex_attention",),
                   lengths=lengths, quick=quick, compiled=True,
                   preload=("attnkit.bench.peers:preload_flex",))


#: the sparse cases' ``auto`` hands masks up to 4096^2 entries to torch SDPA as a dense
#: mask; the tiled engine is measured beside it at those lengths
SPARSE_CHUNKED = Variant("attnkit chunked", "attnkit", attnkit_sdpa("chunked"),
                         lengths=(1024, 2048, 4096))


HF = ("transformers",)
LONGFORMER_HF = ("transformers.models.longformer.modeling_longformer",)
BIGBIRD_HF = ("transformers.models.big_bird.modeling_big_bird",)
T5_HF = ("transformers.models.t5.modeling_t5",)
MISTRAL_HF = ("transformers.models.mistral.modeling_mistral", "transformers.masking_utils")
#: attnkit's HF integration imports transformers: imported once before measuring
INTEGRATION = ("attnkit.integrations.hf",)
LONGFORMER = dict(d_model=512, heads=H, window=256, num_global=16)
BIGBIRD = dict(d_model=512, heads=H, block=64, random_blocks=3)
MISTRAL = dict(d_model=512, heads=H, kv_heads=2, window=512)


#: --quick lengths of the sparse cases: at 512 a +-256 window or BigBird's 3 + 2 + 3
#: blocks of 64 cover most of the matrix (no sparsity to exploit, only the tiled engine's
#: overhead), at 2048 they cover a quarter or less; both rows show where the gain starts
SPARSE_QUICK = (512, 2048)


def longformer_mask(n):
    """Longformer's pattern: window +-256 or one of the first 16 (global) tokens."""
    return M.sliding_window(256) | M.global_tokens(list(range(16)))


def _decode_case(name, title, kv_heads):
    return Case(name, title, decode_setup(kv_heads), kind="decode", steps=8,
                quick_lengths=(1024,),
                variants=(Variant("attnkit", "attnkit", attnkit_decode),
                          Variant("attnkit paged", "attnkit", attnkit_paged_decode(256)),
                          Variant("torch.cat+sdpa", "peer", peers.torch_cat_decode)))


def _sdpa_bias():
    return Variant("sdpa+bias", "peer", peers.torch_sdpa_biased, work="dense",
                   mem=scores_bytes(1.05))


DILATIONS = [1, 1, 2, 2, 4, 4, 8, 8]

CASES: tuple[Case, ...] = (
    Case("dense", "dense, no mask", plain_setup(), lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, SDPA, REF, flex_variant())),
    Case("causal", "causal", plain_setup(causal=True), lengths=FULL_LENGTHS[:5], causal=True,
         variants=(AUTO, CHUNKED, SDPA_CAUSAL, REF, flex_variant())),
    Case("causal_train", "causal, forward + backward", plain_setup(causal=True), kind="train",
         lengths=FULL_LENGTHS[:4], causal=True,
         variants=(Variant("attnkit", "attnkit", attnkit_train("auto")),
                   Variant("attnkit chunked", "attnkit", attnkit_train("chunked")),
                   Variant("torch sdpa", "peer", peers.torch_sdpa_train, work="causal"),
                   Variant("reference", "peer", peers.reference_train, work="dense",
                           mem=scores_bytes(5), max_length=2048)),
         note="useful flops = 3 x forward"),
    Case("padding", "key padding, B=2, lengths n and n/2",
         plain_setup(lambda n: M.padding([n, n // 2]), batch=2), batch=2,
         mask=lambda n: M.padding([n, n // 2]), lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, Variant("sdpa+mask", "peer", peers.torch_sdpa_masked,
                                          work="dense"), REF_B2)),
    Case("gqa", "grouped-query, 8 query / 2 kv heads, causal",
         plain_setup(causal=True, kv_heads=2), causal=True, lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, Variant("sdpa gqa", "peer", peers.torch_sdpa, work="causal"),
                   Variant("sdpa repeat_kv", "peer", peers.torch_sdpa_repeat_kv, work="causal"),
                   flex_variant())),
    Case("mqa", "multi-query, 8 query / 1 kv head, causal",
         plain_setup(causal=True, kv_heads=1), causal=True, lengths=FULL_LENGTHS[:4],
         variants=(AUTO, CHUNKED, Variant("sdpa gqa", "peer", peers.torch_sdpa, work="causal"),
                   Variant("sdpa repeat_kv", "peer", peers.torch_sdpa_repeat_kv, work="causal"))),
    Case("softcap", "causal with logit softcap 30 (Gemma 2)", softcap_setup(30.0), causal=True,
         lengths=FULL_LENGTHS[:4],
         variants=(AUTO, Variant("torch sdpa, no softcap", "peer", peers.torch_sdpa,
                                 work="causal"),
                   Variant("eager softcap", "peer", peers.softcap_eager, work="dense",
                           mem=scores_bytes(3), max_length=8192))),
    Case("alibi", "ALiBi bias, causal", alibi_setup(causal=True), causal=True,
         lengths=FULL_LENGTHS[:5], quick_lengths=SPARSE_QUICK, variants=(AUTO, _sdpa_bias(), REF, flex_variant())),
    Case("t5", "T5 relative bias, bidirectional (scale 1)", t5_setup,
         lengths=FULL_LENGTHS[:5], variants=(AUTO, _sdpa_bias(), REF, flex_variant())),
    Case("sliding_window", "sliding window +-256", plain_setup(lambda n: M.sliding_window(256)),
         mask=lambda n: M.sliding_window(256), quick_lengths=SPARSE_QUICK,
         variants=(AUTO, SPARSE_CHUNKED, sdpa_mask_variant(), REF,
                   flex_variant(lengths=(2048, 8192, 16384, 32768)))),
    Case("dilated", "dilated window +-128, dilation 1,1,2,2,4,4,8,8 per head",
         plain_setup(lambda n: M.dilated(128, 128, DILATIONS)),
         mask=lambda n: M.dilated(128, 128, DILATIONS), quick_lengths=SPARSE_QUICK,
         variants=(AUTO, SPARSE_CHUNKED, sdpa_mask_variant(per_head=True), REF,
                   flex_variant(FLEX_SPARSE))),
    Case("longformer", "Longformer mask: window +-256 | 16 global tokens",
         plain_setup(longformer_mask), mask=longformer_mask, quick_lengths=SPARSE_QUICK,
         variants=(AUTO, SPARSE_CHUNKED, sdpa_mask_variant(), REF, flex_variant(FLEX_SPARSE))),
    Case("bigbird", "BigBird mask: block 64, 3 window + 2 global + 3 random blocks",
         plain_setup(lambda n: M.bigbird(64)), mask=lambda n: M.bigbird(64),
         quick_lengths=SPARSE_QUICK,
         variants=(AUTO, SPARSE_CHUNKED, sdpa_mask_variant(), REF, flex_variant(FLEX_SPARSE))),
    _decode_case("decode_mha", "decoding with a KV cache, MHA (8 kv heads)", H),
    _decode_case("decode_gqa", "decoding with a KV cache, GQA (2 kv heads)", 2),
    _decode_case("decode_mqa", "decoding with a KV cache, MQA (1 kv head)", 1),
    Case("decode_window", "decoding, rolling sliding-window cache (window 4096, MHA)",
         decode_setup(H, window=4096), kind="decode", steps=8, quick_lengths=(1024,),
         variants=(Variant("attnkit rolling", "attnkit", attnkit_rolling_decode),
                   Variant("torch.cat window", "peer", peers.torch_cat_window_decode))),
    Case("longformer_layer", "Longformer self-attention layer, d_model 512, window 512, "
         "16 global", layer_setup(**LONGFORMER), kind="layer", mask=longformer_mask,
         lengths=FULL_LENGTHS[2:], quick_lengths=(512,),
         variants=(Variant("attnkit layer", "attnkit", attnkit_longformer_layer),
                   Variant("attnkit patched", "attnkit",
                           attnkit_patched("LongformerModel", peers.longformer_config,
                                           "encoder.layer.0.attention.self",
                                           peers.longformer_call_args),
                           needs=HF, preload=LONGFORMER_HF + INTEGRATION),
                   Variant("hf Longformer", "peer", peers.hf_longformer, needs=HF,
                           preload=LONGFORMER_HF, max_length=16384))),
    Case("bigbird_layer", "BigBird block-sparse layer, d_model 512, block 64",
         layer_setup(**BIGBIRD), kind="layer", mask=lambda n: M.bigbird(64),
         lengths=FULL_LENGTHS[2:], quick_lengths=(1024,),
         variants=(Variant("attnkit layer", "attnkit", attnkit_bigbird_layer("bigbird")),
                   Variant("attnkit patched", "attnkit",
                           attnkit_patched("BigBirdModel", peers.bigbird_config,
                                           "encoder.layer.0.attention.self",
                                           peers.bigbird_call_args),
                           needs=HF, preload=BIGBIRD_HF + INTEGRATION),
                   Variant("hf BigBird", "peer", peers.hf_bigbird, needs=HF, preload=BIGBIRD_HF,
                           mem=scores_bytes(1.2)))),
    Case("t5_layer", "T5 encoder self-attention with relative bias, d_model 512",
         layer_setup(d_model=512, heads=H), kind="layer", lengths=(1024, 2048, 4096),
         quick_lengths=(512,),
         variants=(Variant("attnkit patched", "attnkit",
                           attnkit_patched("T5EncoderModel", peers.t5_config,
                                           "encoder.block.0.layer.0.SelfAttention"),
                           needs=HF, preload=T5_HF + INTEGRATION),
                   Variant("hf t5 eager", "peer", peers.hf_t5("eager"), needs=HF, preload=T5_HF,
                           work="dense", mem=scores_bytes(3)),
                   Variant("hf t5 sdpa", "peer", peers.hf_t5("sdpa"), needs=HF, preload=T5_HF,
                           work="dense", mem=scores_bytes(2)))),
    Case("mistral_layer", "Mistral attention (GQA 8/2, RoPE, sliding window 512), d_model 512",
         layer_setup(**MISTRAL), kind="layer", causal=True,
         mask=lambda n: M.sliding_window(511, 0), lengths=(1024, 4096, 16384),
         quick_lengths=(512,),
         variants=(Variant("attnkit", "attnkit", peers.hf_mistral("attnkit"), needs=HF,
                           preload=MISTRAL_HF + INTEGRATION),
                   Variant("hf mistral eager", "peer", peers.hf_mistral("eager"), needs=HF,
                           preload=MISTRAL_HF, work="dense", mem=scores_bytes(3)),
                   Variant("hf mistral sdpa", "peer", peers.hf_mistral("sdpa"), needs=HF,
                           preload=MISTRAL_HF, work="dense", mem=mask_bytes()))),
)


def case_by_name(name: str, cases=CASES) -> Case:
    for c in cases:
        if c.name == name:
            return c
    raise KeyError(name)
