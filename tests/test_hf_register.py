"""attnkit.integrations.hf.register(): transformers models switched to "attnkit" compute
what "eager" computes, at every position that is not padding.

Every model is a tiny random one built from its config (no downloads), initialised with
initializer_range=0.2 so attention is far from uniform and a wrong scale, mask, softcap
or sink moves the outputs. The eager and attnkit models share one state dict.
"""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it
from transformers import masking_utils as hf_masks  # noqa: E402

import attnkit.integrations.hf as ak_hf  # noqa: E402
from conftest import HF_TOL, assert_equal_where_real, padded_ids  # noqa: E402
from attnkit.integrations.hf import attention as ak_attention  # noqa: E402
from attnkit.integrations.hf.mask_interface import (  # noqa: E402
    HFMaskFunction, KeyPadding, PreparedMask, Shifted, build_mask, translate_mask_function)
from attnkit.masks import EMPTY, FULL, Grid, sliding_window  # noqa: E402

ak_hf.register()

TOL = HF_TOL
DECODER_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)


def _decoder_configs():
    c = DECODER_COMMON
    configs = {
        "llama": ("LlamaForCausalLM", transformers.LlamaConfig(**c)),
        # window 5 < the 16-token inputs and the 14 + 12 generated tokens
        "mistral": ("MistralForCausalLM", transformers.MistralConfig(**c, sliding_window=5)),
        # layer 0 full attention, layer 1 sliding window
        "qwen2": ("Qwen2ForCausalLM", transformers.Qwen2Config(
            **c, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
        # a small softcap so that it bites; alternating sliding / full layers
        "gemma2": ("Gemma2ForCausalLM", transformers.Gemma2Config(
            **c, head_dim=16, sliding_window=5, attn_logit_softcapping=1.0,
            query_pre_attn_scalar=16)),
    }
    if hasattr(transformers, "GptOssConfig"):
        configs["gpt_oss"] = ("GptOssForCausalLM", transformers.GptOssConfig(
            **c, head_dim=16, sliding_window=5, num_local_experts=4, num_experts_per_tok=2))
    return configs


DECODERS = _decoder_configs()


def t5_config():
    return transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        initializer_factor=2.0, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)


def build_pair(class_name: str, config):
    """(eager model, attnkit model) with the same weights, in eval mode."""
    cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    for module in eager.modules():  # GPT-OSS sinks: well away from 0 so they matter
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            with torch.no_grad():
                module.sinks.normal_(0.0, 2.0)
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="attnkit").eval()
    ours.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert ours.config._attn_implementation == "attnkit"
    return eager, ours


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second thread buys nothing, and on a loaded machine every
    small op waits for it (20 ms per 3 x 64 linear layer was seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch):
    """Record every attnkit.scaled_dot_product_attention call the interface makes."""
    seen = []
    real = ak_attention.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append(dict(query=query.shape, key=key.shape, **kwargs))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(ak_attention, "scaled_dot_product_attention", spy)
    return seen


def padded_batch(side: str, batch=3, length=16, vocab=128):
    """rows 0 and 1 padded on ``side`` (length - 5 and 3 tokens kept), row 2 not."""
    return padded_ids(batch, length, side, vocab, real=(length - 5, 3), last_row_full=False)


def assert_weights_equal_where_real(want, got, keep):
    """(B, H, L, S) weights equal on the query rows of real tokens."""
    rows = keep.bool()[:, None, :, None].expand_as(want)
    torch.testing.assert_close(got[rows], want[rows], **TOL)


# ------------------------------------------------------------------ registration

def test_register_adds_attnkit_to_both_interfaces():
    assert transformers.AttentionInterface()["attnkit"] is ak_hf.attention_forward
    assert hf_masks.AttentionMaskInterface()["attnkit"] is ak_hf.build_mask
    ak_hf.register()  # again: harmless
    assert transformers.AttentionInterface()["attnkit"] is ak_hf.attention_forward


def test_from_config_and_set_attn_implementation_route_through_attnkit(calls):
    config = transformers.LlamaConfig(**DECODER_COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attnkit")
    assert model.config._attn_implementation == "attnkit"
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        ours = model(ids).logits
    assert len(calls) == config.num_hidden_layers
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
    assert len(calls) == config.num_hidden_layers  # eager no longer calls attnkit
    model.set_attn_implementation("attnkit")
    assert model.config._attn_implementation == "attnkit"
    torch.testing.assert_close(ours, eager, **TOL)


# ------------------------------------------------------------------ decoder-only models

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_outputs_equal_eager(name, side, calls):
    eager, ours = build_pair(*DECODERS[name])
    ids, keep = padded_batch(side)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=keep, output_hidden_states=True)
        got = ours(input_ids=ids, attention_mask=keep, output_hidden_states=True)
    assert len(calls) == eager.config.num_hidden_layers
    for h_want, h_got in zip(want.hidden_states, got.hidden_states):
        assert_equal_where_real(h_want, h_got, keep)
    assert_equal_where_real(want.logits, got.logits, keep)


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_attention_weights_equal_eager(name):
    eager, ours = build_pair(*DECODERS[name])
    ids, keep = padded_batch("left")
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=keep, output_attentions=True)
        got = ours(input_ids=ids, attention_mask=keep, output_attentions=True)
    assert len(got.attentions) == eager.config.num_hidden_layers
    for w_want, w_got in zip(want.attentions, got.attentions):
        assert w_got is not None and w_got.shape == w_want.shape
        assert_weights_equal_where_real(w_want, w_got, keep)
    assert_equal_where_real(want.logits, got.logits, keep)


@pytest.mark.parametrize("name", list(DECODERS))
def test_greedy_generation_equals_eager(name, calls):
    eager, ours = build_pair(*DECODERS[name])
    ids, keep = padded_batch("left", length=14)
    kwargs = dict(attention_mask=keep, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    want = eager.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_want, step_got in zip(want.logits, got.logits):
        torch.testing.assert_close(step_got, step_want, **TOL)
    decode = [c for c in calls if c["query"][2] == 1]
    assert len(decode) == 11 * eager.config.num_hidden_layers  # one query per new token


def test_a_long_sliding_window_input_runs_on_the_tiled_engine_and_equals_eager(calls,
                                                                               monkeypatch):
    """600 tokens, window 64: the window and the padding reach attnkit as mask objects,
    which rule out most tiles, so attention runs on the tiled engine (cost and memory
    follow the window), not on a dense mask."""
    import attnkit.functional

    tiled = []
    real = attnkit.functional.chunked_attention
    monkeypatch.setattr(attnkit.functional, "chunked_attention",
                        lambda *a, **k: tiled.append(1) or real(*a, **k))
    config = copy.deepcopy(DECODERS["mistral"][1])
    config.sliding_window = 64
    eager, ours = build_pair("MistralForCausalLM", config)
    ids, keep = padded_batch("left", batch=2, length=600)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=keep).logits
        got = ours(input_ids=ids, attention_mask=keep).logits
    assert len(calls) == len(tiled) == config.num_hidden_layers
    for c in calls:
        assert leaf_types(c["attn_mask"]) == {"SlidingWindowMask", "KeyPaddingMask"}
    assert_equal_where_real(want, got, keep)


def test_generation_with_a_static_cache_equals_eager():
    """A static cache hands attention all its slots (S = capacity), so query positions no
    longer sit at i + (S - L): the mask must be shifted, not bottom-right aligned."""
    eager, ours = build_pair(*DECODERS["llama"])
    ids, keep = padded_batch("left", length=14)
    kwargs = dict(attention_mask=keep, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  cache_implementation="static", output_logits=True,
                  return_dict_in_generate=True)
    want = eager.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_want, step_got in zip(want.logits, got.logits):
        torch.testing.assert_close(step_got, step_want, **TOL)


def test_grouped_query_attention_reaches_attnkit_without_repeated_kv(calls):
    config = DECODERS["llama"][1]
    _, ours = build_pair(*DECODERS["llama"])
    with torch.no_grad():
        ours(torch.randint(3, 128, (2, 7)))
    assert calls
    for c in calls:
        assert c["query"][1] == config.num_attention_heads
        assert c["key"][1] == config.num_key_value_heads


def test_what_models_pass_reaches_attnkit(calls):
    """scaling, softcap, sinks and dropout (training only) are handed on unchanged."""
    _, gemma = build_pair(*DECODERS["gemma2"])
    with torch.no_grad():
        gemma(torch.randint(3, 128, (1, 6)))
    assert {c["softcap"] for c in calls} == {1.0}
    assert {c["scale"] for c in calls} == {16 ** -0.5}
    assert {c["dropout_p"] for c in calls} == {0.0}
    calls.clear()
    config = copy.deepcopy(DECODERS["llama"][1])
    config.attention_dropout = 0.25
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="attnkit")
    ids = torch.randint(3, 128, (1, 6))
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    model(ids)
    assert [c["dropout_p"] for c in calls] == [0.0, 0.0, 0.25, 0.25]
    if "gpt_oss" in DECODERS:
        calls.clear()
        _, oss = build_pair(*DECODERS["gpt_oss"])
        with torch.no_grad():
            oss(torch.randint(3, 128, (1, 6)))
        sinks = [m.sinks for m in oss.modules() if hasattr(m, "sinks")]
        assert [c["sinks"] for c in calls] == sinks


def test_gradients_equal_eager():
    eager, ours = build_pair(*DECODERS["mistral"])
    eager.train()
    ours.train()
    ids, keep = padded_batch("left")
    probe = torch.randn(*ids.shape, eager.config.vocab_size)
    for model in (eager, ours):  # a loss that reads only the logits of real tokens
        logits = model(input_ids=ids, attention_mask=keep).logits
        (logits * probe)[keep.bool()].sum().backward()
    for (name, p_want), p_got in zip(eager.named_parameters(), ours.parameters()):
        assert p_got.grad is not None, name
        torch.testing.assert_close(p_got.grad, p_want.grad, atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------------ T5 (encoder-decoder)

@pytest.fixture(scope="module")
def t5_pair():
    return build_pair("T5ForConditionalGeneration", t5_config())


@pytest.mark.parametrize("side", ["right", "left"])
def test_t5_outputs_equal_eager(t5_pair, side, calls):
    eager, ours = t5_pair
    ids, keep = padded_batch(side, length=12)
    dec, dec_keep = padded_batch(side, length=7)
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=dec,
                  decoder_attention_mask=dec_keep, output_attentions=True)
    with torch.no_grad():
        want, got = eager(**inputs), ours(**inputs)
    # 2 encoder self, 2 decoder self, 2 cross attentions; all with T5's unscaled scores
    assert len(calls) == 6 and {c["scale"] for c in calls} == {1.0}
    assert all(c["bias"] is not None for c in calls)  # position_bias reached attnkit
    assert_equal_where_real(want.encoder_last_hidden_state, got.encoder_last_hidden_state, keep)
    assert_equal_where_real(want.logits, got.logits, dec_keep)
    for w_want, w_got in zip(want.encoder_attentions, got.encoder_attentions):
        assert_weights_equal_where_real(w_want, w_got, keep)
    for w_want, w_got in zip(want.decoder_attentions + want.cross_attentions,
                             got.decoder_attentions + got.cross_attentions):
        assert_weights_equal_where_real(w_want, w_got, dec_keep)


@pytest.mark.parametrize("side", ["right", "left"])
def test_t5_greedy_generation_with_cache_equals_eager(t5_pair, side, calls):
    eager, ours = t5_pair
    ids, keep = padded_batch(side, length=12)
    kwargs = dict(attention_mask=keep, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  use_cache=True, output_logits=True, return_dict_in_generate=True)
    want = eager.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_want, step_got in zip(want.logits, got.logits):
        torch.testing.assert_close(step_got, step_want, **TOL)
    cached_self = [c for c in calls if c["query"][2] == 1 and c["key"][2] > 1
                   and c["key"][2] != ids.shape[1]]
    assert cached_self  # decoder self-attention read keys from the cache


# ------------------------------------------------------------------ the mask interface

def hf_dense(**kw):
    """transformers' own drawing of a mask: (B, 1, L, S) bool."""
    return hf_masks.sdpa_mask(allow_is_causal_skip=False, **kw)


def ours_dense(prepared: PreparedMask, batch: int):
    L, S = prepared.q_length, prepared.kv_length
    if prepared.mask is None:
        return torch.ones(batch, 1, L, S, dtype=torch.bool)
    m = prepared.mask.materialize(L, S)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.expand(batch, 1, L, S)


def leaf_types(mask) -> set:
    """Class names of the masks a composed mask is made of."""
    for parts in (("a", "b"), ("inner",)):
        if all(hasattr(mask, p) for p in parts):
            return set().union(*(leaf_types(getattr(mask, p)) for p in parts))
    return {type(mask).__name__}


PATTERNS = {
    "causal": (hf_masks.causal_mask_function, "CausalMask"),
    "bidirectional": (hf_masks.bidirectional_mask_function, None),
    "sliding_causal": (hf_masks.sliding_window_causal_mask_function(4), "SlidingWindowMask"),
    "sliding_bidirectional": (hf_masks.sliding_window_bidirectional_mask_function(3),
                              "SlidingWindowMask"),
    "chunked": (hf_masks.chunked_causal_mask_function(3, torch.tensor([0, 2])),
                "HFMaskFunction"),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("q_length,kv_length,q_offset,kv_offset", [
    (9, 9, 0, 0),      # prefill
    (1, 10, 9, 0),     # decoding with a growing cache
    (3, 12, 9, 0),     # a chunk after a cache
    (1, 5, 9, 5),      # a sliding cache that dropped its first keys
    (2, 16, 6, 0),     # a static cache: S is the capacity, not past + L
])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_masks_equal_what_transformers_draws(pattern, q_length, kv_length, q_offset, kv_offset,
                                             padding):
    fn, kind = PATTERNS[pattern]
    total = kv_offset + kv_length
    attention_mask = torch.ones(2, total, dtype=torch.bool)
    if padding == "left":
        attention_mask[1, :3] = False
    elif padding == "right":
        attention_mask[0, total - 2:] = False
    kw = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
              kv_offset=kv_offset, mask_function=fn, attention_mask=attention_mask)
    prepared = build_mask(**kw)
    assert isinstance(prepared, PreparedMask)
    torch.testing.assert_close(ours_dense(prepared, 2), hf_dense(**kw))
    if kind is None and padding == "none":
        assert prepared.mask is None
    elif kind is not None:  # read back as attnkit's own mask, not drawn
        assert kind in leaf_types(prepared.mask)


def test_sliding_window_reads_back_as_attnkits_window():
    """transformers' sliding_window=W is attnkit's sliding_window(W - 1, 0)."""
    m = translate_mask_function(hf_masks.sliding_window_causal_mask_function(512))
    assert type(m) is type(sliding_window(511, 0)) and (m.left, m.right) == (511, 0)


def packed_mask(implementation: str, position_ids, sliding_window=None):
    """The mask transformers' public ``create_causal_mask`` (or its sliding-window sibling)
    builds for a packed batch (no padding mask, position ids restarting per document)
    under ``implementation``. Arguments by position: the cache's keyword is
    ``past_key_values`` before transformers 5.24 and ``cache`` after."""
    config = transformers.MistralConfig(**DECODER_COMMON, sliding_window=sliding_window)
    config._attn_implementation = implementation
    embeds = torch.zeros(position_ids.shape[0], position_ids.shape[1], 4)
    create = (hf_masks.create_causal_mask if sliding_window is None
              else hf_masks.create_sliding_window_causal_mask)
    return create(config, embeds, None, None, position_ids)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_sequences_read_back_as_documents(window):
    """Packing as transformers detects it (position ids restart) reads back as attnkit's
    document mask and the translation-invariant pattern inside each document."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2],
                                 [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])
    prepared = packed_mask("attnkit", position_ids, window)
    want = packed_mask("sdpa", position_ids, window)
    assert isinstance(prepared, PreparedMask) and isinstance(want, torch.Tensor)
    inner = "CausalMask" if window is None else "SlidingWindowMask"
    assert leaf_types(prepared.mask) == {"DocumentMask", inner}
    torch.testing.assert_close(ours_dense(prepared, 2), want.expand(2, 1, 11, 11))


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_sequences_equal_eager(name, calls):
    """A packed batch (no attention_mask; position_ids restart at each document; no cache,
    as in training, which is when transformers detects packing) through a whole model:
    every token equals eager, and documents do not see each other."""
    eager, ours = build_pair(*DECODERS[name])
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                                 [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    ids = torch.randint(3, 128, position_ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = eager(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        got = ours(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        alone = eager(input_ids=ids[:1, 7:], position_ids=position_ids[:1, 7:],
                      use_cache=False).logits
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got[:1, 7:], alone, **TOL)  # the second document alone
    assert all("DocumentMask" in leaf_types(c["attn_mask"]) for c in calls)


def test_a_misread_mask_falls_back_to_transformers_function(monkeypatch):
    """If what a factory's closure is read back as disagrees with what the function
    computes (a transformers release that changed its meaning), the mask is evaluated
    from transformers' own function instead: exact, with a warning."""
    fn = hf_masks.sliding_window_causal_mask_function(4)
    from attnkit.integrations.hf import mask_interface
    mask_interface.translate_mask_function(fn)  # learn the factories' closures
    readers = dict(mask_interface._READERS)
    code = hf_masks.sliding_window_overlay(4).__code__
    readers[code] = lambda values: sliding_window(5, 0)  # an off-by-two misreading
    monkeypatch.setattr(mask_interface, "_READERS", readers)
    kw = dict(batch_size=1, q_length=12, kv_length=12, mask_function=fn)
    with pytest.warns(RuntimeWarning, match="disagree"):
        prepared = build_mask(**kw)
    assert isinstance(prepared.mask, HFMaskFunction)
    torch.testing.assert_close(ours_dense(prepared, 1), hf_dense(**kw))


def test_custom_vmap_patterns_are_drawn_by_transformers():
    image = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0])

    def image_tokens_see_each_other(b, h, q, k):
        return (image[q] == 1) & (image[k] == 1)

    fn = hf_masks.or_masks(hf_masks.causal_mask_function, image_tokens_see_each_other)
    kw = dict(batch_size=1, q_length=8, kv_length=8, mask_function=fn)
    prepared = build_mask(use_vmap=True, **kw)
    assert isinstance(prepared.mask, torch.Tensor)
    torch.testing.assert_close(prepared.mask, hf_dense(use_vmap=True, **kw))
    # the same function, index-based, runs tile by tile instead
    tiled = build_mask(**kw)
    assert isinstance(tiled.mask, HFMaskFunction)
    torch.testing.assert_close(ours_dense(tiled, 1), hf_dense(**kw))


def _check_block_states(mask, L, S, block):
    """Every FULL block is all True and every EMPTY block all False."""
    grid = Grid(L, S)
    edges_q = list(range(0, L, block)) + [L]  # blocks of query rows
    edges_k = list(range(0, S, block)) + [S]
    q_lo = torch.tensor(edges_q[:-1]).view(-1, 1)
    q_hi = torch.tensor(edges_q[1:]).view(-1, 1)
    k_lo = torch.tensor(edges_k[:-1]).view(1, -1)
    k_hi = torch.tensor(edges_k[1:]).view(1, -1)
    states = mask.block_states(grid, q_lo, q_hi, k_lo, k_hi)
    while states.dim() < 4:
        states = states.unsqueeze(0)
    dense = mask.materialize(L, S)
    while dense.dim() < 4:
        dense = dense.unsqueeze(0)
    seen = set()
    for i in range(q_lo.shape[0]):
        for j in range(k_lo.shape[1]):
            block = dense[..., q_lo[i, 0]:q_hi[i, 0], k_lo[0, j]:k_hi[0, j]]
            st = states[..., i, j].expand(block.shape[:2])
            for b in range(block.shape[0]):
                s = int(st[b, 0])
                seen.add(s)
                if s == FULL:
                    assert block[b].all()
                if s == EMPTY:
                    assert not block[b].any()
    return seen


def test_key_padding_and_shifted_blocks_are_exact():
    keep = torch.ones(3, 40, dtype=torch.bool)
    keep[0, :13] = False   # left padding
    keep[1, 29:] = False   # right padding
    keep[2, 8:11] = False  # a hole
    seen = _check_block_states(KeyPadding(keep), 40, 40, 8)
    assert {FULL, EMPTY} <= seen
    seen = _check_block_states(Shifted(sliding_window(6, 0), -5) & KeyPadding(keep), 40, 40, 4)
    assert {FULL, EMPTY} <= seen


def test_padding_masks_skip_blocks_and_stay_exact_through_the_engine():
    """A long left-padded batch through the tiled engine equals the dense reference."""
    import attnkit

    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[0, :170] = False
    q, k, v = (torch.randn(2, 4, 300, 8), torch.randn(2, 2, 300, 8), torch.randn(2, 2, 300, 8))
    mask = sliding_window(63, 0) & KeyPadding(keep)
    got = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="chunked")
    want = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=mask.materialize(300, 300),
                                                backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ errors

def test_a_mask_built_for_other_lengths_is_refused():
    prepared = build_mask(batch_size=1, q_length=4, kv_length=4)
    q = k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\(4, 4\).*length 5"):
        ak_hf.attention_forward(torch.nn.Module(), q, k, v, prepared)


def test_an_unknown_mask_type_is_refused():
    q = k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="attention_mask"):
        ak_hf.attention_forward(torch.nn.Module(), q, k, v, [[1, 1]])


def test_per_token_sinks_are_refused_not_ignored():
    q = k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="sinks"):
        ak_hf.attention_forward(torch.nn.Module(), q, k, v, None, sinks=torch.zeros(1, 2, 5, 1))


def test_a_module_called_without_a_mask_follows_its_is_causal():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    layer = torch.nn.Module()
    layer.is_causal = True
    out, weights = ak_hf.attention_forward(layer, q, k, v, None, scaling=0.5)
    kk, vv = k.expand(1, 2, 5, 8), v.expand(1, 2, 5, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=0.5)
    assert weights is None
    torch.testing.assert_close(out, want.transpose(1, 2))
    layer.is_causal = False
    out, _ = ak_hf.attention_forward(layer, q, k, v, None, scaling=0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, scale=0.5)
    torch.testing.assert_close(out, want.transpose(1, 2))
