"""The targets of ``attnkit.integrations.hf.register()`` (``attn_implementation="attnkit"``),
measured in one run.

    python benchmarks/hf_bench.py             # the targets below
    python benchmarks/hf_bench.py --quick     # shorter inputs (2048 / 512 tokens)
    python benchmarks/hf_bench.py --threads 1 # steadier ratios on a loaded machine

* ``mistral``: Mistral with sliding_window=512 at 4096 tokens (float32, B=1, tiny widths:
  hidden 128, 4 query heads and 2 key/value heads of 32, 2 layers, so attention
  dominates): the base model's forward under "attnkit" vs "eager" and "sdpa". Targets:
  >= 2x faster than eager, not slower than sdpa.
* ``t5-self-attention``: the first encoder layer's T5Attention module (relative position
  bias + attention) at 1024 tokens (d_model 128, 4 heads of 32), and ``t5-encoder``: the
  whole 2-layer T5EncoderModel, under "attnkit" vs "sdpa" (and "eager" for reference).
  Target: not slower than sdpa.

Measured by ``attnkit.bench`` (interleaved timing with CPU time beside wall time, peak
RSS growth of one call in a worker process; methods: benchmarks/README.md); options:
``--help``. Needs transformers (otherwise every row is skipped).
"""

from __future__ import annotations

from attnkit import masks as M
from attnkit.bench import peers, script
from attnkit.bench.builders import model_input_setup
from attnkit.bench.spec import Case, Variant, scores_bytes
from attnkit.bench.targets import Target

MISTRAL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
               sliding_window=512, initializer_range=0.2)
T5 = dict(vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
          dropout_rate=0.0)
T5_SELF_ATTENTION = "encoder.block.0.layer.0.SelfAttention"
NEEDS = ("transformers",)
PRELOAD = ("attnkit.integrations.hf",)


def _variants(model_class, config_class, config, module_path=None, call_args=None,
              dense_copies=3):
    """attnkit, eager and sdpa, each the same model under that attn_implementation."""
    def variant(impl):
        label = "attnkit" if impl == "attnkit" else f"hf {impl}"
        return Variant(label, "attnkit" if impl == "attnkit" else "peer",
                       peers.hf_model(model_class, config_class, config, impl, module_path,
                                      call_args),
                       needs=NEEDS, preload=PRELOAD if impl == "attnkit" else (),
                       work="sparse" if impl == "attnkit" else "dense",
                       mem=(lambda n: 0.0) if impl == "attnkit" else scores_bytes(
                           dense_copies, heads=4))
    return tuple(variant(impl) for impl in ("attnkit", "eager", "sdpa"))


CASES = (
    Case("mistral", "MistralModel forward, sliding window 512, GQA 4/2 heads of 32",
         model_input_setup(MISTRAL["vocab_size"], MISTRAL["hidden_size"]), kind="layer",
         heads=4, head_dim=32, layers=2, causal=True, mask=lambda n: M.sliding_window(511, 0),
         lengths=(4096,), quick_lengths=(2048,),
         variants=_variants("MistralModel", "MistralConfig", MISTRAL)),
    Case("t5-self-attention", "T5Attention of encoder layer 0 (relative bias + attention)",
         model_input_setup(T5["vocab_size"], T5["d_model"]), kind="layer", heads=4,
         head_dim=32, lengths=(1024,), quick_lengths=(512,),
         variants=_variants("T5EncoderModel", "T5Config", T5, T5_SELF_ATTENTION,
                            {"mask": None})),
    Case("t5-encoder", "T5EncoderModel forward, 2 layers",
         model_input_setup(T5["vocab_size"], T5["d_model"]), kind="layer", heads=4,
         head_dim=32, layers=2, lengths=(1024,), quick_lengths=(512,),
         variants=_variants("T5EncoderModel", "T5Config", T5)),
)
TARGETS = (
    Target(5, "mistral", 4096, "attnkit", "speedup", 2, "hf eager"),
    Target(5, "mistral", 4096, "attnkit", "within", 1.0, "hf sdpa"),
    Target(5, "t5-self-attention", 1024, "attnkit", "within", 1.0, "hf sdpa"),
    Target(5, "t5-encoder", 1024, "attnkit", "within", 1.0, "hf sdpa"),
)

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__, cpu_time=True))
