"""attnkit.integrations.hf.patch(model): T5, Longformer and BigBird models whose attention
modules were replaced by attnkit's compute what the unpatched model computes, at every
position that is not padding, with the same state_dict, and without running the
transformers attention code they replaced.

Every model is a tiny random one built from its config (no downloads) with a wide
initialisation (T5: initializer_factor=2; others: initializer_range=0.2) so that attention
is far from uniform. Each test compares against a deep copy taken before patching.
"""

import copy
import importlib
import io
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it
from transformers.models.big_bird import modeling_big_bird as hf_bigbird  # noqa: E402
from transformers.models.longformer import modeling_longformer as hf_longformer  # noqa: E402
from transformers.models.t5 import modeling_t5 as hf_t5  # noqa: E402

import attnkit.integrations.hf as ak_hf  # noqa: E402
from conftest import HF_TOL, assert_equal_where_real, padded_ids  # noqa: E402
# the module (the package's `patch` attribute is the function)
ak_patch = importlib.import_module("attnkit.integrations.hf.patch")
from attnkit.integrations.hf import bigbird as akhf_bigbird  # noqa: E402
from attnkit.integrations.hf import longformer as akhf_longformer  # noqa: E402
from attnkit.integrations.hf import t5 as akhf_t5  # noqa: E402
from attnkit.layers import bigbird as ak_bigbird  # noqa: E402
from attnkit.positional.t5 import T5Bias, T5RelativeBias  # noqa: E402

TOL = HF_TOL


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second thread buys nothing and makes a loaded machine slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t5_config(**kw):
    return transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        initializer_factor=2.0, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, **kw)


def longformer_config():
    # a different window per layer; inputs not a multiple of 16 get padded by the model
    return transformers.LongformerConfig(
        vocab_size=100, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=64, attention_window=[8, 16], max_position_embeddings=256,
        initializer_range=0.2, pad_token_id=1)


def bigbird_config(**kw):
    # block-sparse above (5 + 2 * 2) * 8 = 72 tokens
    return transformers.BigBirdConfig(
        vocab_size=100, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=512, block_size=8, num_random_blocks=2,
        initializer_range=0.2, **kw)


MODELS = {
    "t5": lambda: transformers.T5ForConditionalGeneration._from_config(
        t5_config(), attn_implementation="eager"),
    "longformer": lambda: transformers.LongformerModel(longformer_config()),
    "bigbird": lambda: transformers.BigBirdModel(bigbird_config()),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def pair(name: str):
    """(unpatched deep copy, patched model)."""
    model = build(name)
    reference = copy.deepcopy(model)
    assert ak_hf.patch(model) is model
    return reference, model


def padded(batch, length, side, vocab=100, real=(None, None)):
    """ids (B, L) and keep (B, L): rows 0 and 1 padded on ``side``, the last row not."""
    return padded_ids(batch, length, side, vocab, real)


@pytest.fixture
def no_hf_attention():
    """Make every transformers attention routine these models have raise: the patched
    model must not need them. Returns a context manager to arm it around a call (with
    its own MonkeyPatch, so that leaving it keeps the test's other spies)."""
    def boom(*args, **kwargs):
        raise AssertionError("the patched model ran transformers' attention code")

    targets = [(hf_t5.T5Attention, "forward"), (hf_t5.T5Attention, "compute_bias"),
               (hf_t5, "eager_attention_forward"),
               (hf_longformer.LongformerSelfAttention, "forward"),
               (hf_bigbird.BigBirdBlockSparseAttention, "forward"),
               (hf_bigbird.BigBirdSelfAttention, "forward"),
               (T5RelativeBias, "materialize")]

    class Armed:
        def __enter__(self):
            self.monkeypatch = pytest.MonkeyPatch()
            for owner, name in targets:
                self.monkeypatch.setattr(owner, name, boom)

        def __exit__(self, *exc):
            self.monkeypatch.undo()

    return Armed()


# ------------------------------------------------------------------ every family

@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_keys_and_values_are_unchanged_and_parameters_not_copied(name):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    ak_hf.patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
        assert after[key].data_ptr() == pointers[key], key  # the same tensors, taken over
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name", list(MODELS))
def test_a_checkpoint_saved_before_patching_loads_after(name):
    other = build(name, seed=1)  # different weights
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    model = ak_hf.patch(build(name))
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer), strict=True)
    ids = torch.randint(3, 100, (2, 90), generator=torch.Generator().manual_seed(2))
    kwargs = dict(decoder_input_ids=ids[:, :5]) if name == "t5" else {}
    with torch.no_grad():
        want, got = other(ids, **kwargs), model(ids, **kwargs)
    key = "logits" if name == "t5" else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], **TOL)


def test_patching_twice_is_harmless():
    reference, model = pair("longformer")
    modules = [type(m) for m in model.modules()]
    assert ak_hf.patch(model) is model
    assert [type(m) for m in model.modules()] == modules


def test_unknown_models_are_refused_with_what_is_supported():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2))
    with pytest.raises(ValueError) as err:
        ak_hf.patch(llama)
    message = str(err.value)
    for word in ("LlamaForCausalLM", "T5", "Longformer", "BigBird", "set_attn_implementation"):
        assert word in message
    with pytest.raises(ValueError, match="supports"):
        ak_hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        ak_hf.patch("t5-small")
    bare = hf_t5.T5Attention(t5_config(), has_relative_attention_bias=True)
    with pytest.raises(ValueError, match="bare T5Attention"):
        ak_hf.patch(bare)


# ------------------------------------------------------------------ T5

@pytest.fixture(scope="module")
def t5_pair():
    return pair("t5")


def test_t5_modules_are_replaced_and_the_bias_table_is_shared(t5_pair):
    _, model = t5_pair
    attention = [m for m in model.modules() if isinstance(m, akhf_t5.AttnkitT5Attention)]
    assert len(attention) == 2 + 2 + 2  # encoder self, decoder self, cross
    assert not any(isinstance(m, hf_t5.T5Attention) for m in model.modules())
    first = model.encoder.block[0].layer[0].SelfAttention
    assert first.position.embedding is first.relative_attention_bias  # not a copy
    assert first.position.bidirectional
    assert not model.decoder.block[0].layer[0].SelfAttention.position.bidirectional
    assert model.config._attn_implementation == "attnkit"  # masks arrive as objects
    clone = copy.deepcopy(model)  # the table stays shared inside a copy
    c = clone.encoder.block[0].layer[0].SelfAttention
    assert c.position.embedding is c.relative_attention_bias
    assert c.relative_attention_bias is not first.relative_attention_bias


@pytest.mark.parametrize("side", ["right", "left"])
def test_t5_outputs_equal_unpatched(t5_pair, side, no_hf_attention, monkeypatch):
    reference, model = t5_pair
    ids, keep = padded(3, 12, side, vocab=128)
    dec, dec_keep = padded(3, 7, side, vocab=128)
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=dec,
                  decoder_attention_mask=dec_keep, output_attentions=True)
    seen = []
    real = akhf_t5.attention_forward

    def spy(module, query, key, value, mask, **kwargs):
        seen.append((module, kwargs["position_bias"], kwargs["scaling"], mask))
        return real(module, query, key, value, mask, **kwargs)

    with torch.no_grad():
        want = reference(**inputs)
        monkeypatch.setattr(akhf_t5, "attention_forward", spy)
        with no_hf_attention:
            got = model(**inputs)
    assert_equal_where_real(want.encoder_last_hidden_state, got.encoder_last_hidden_state, keep)
    assert_equal_where_real(want.logits, got.logits, dec_keep)
    rows = lambda k, w: k.bool()[:, None, :, None].expand_as(w)
    for w_want, w_got in zip(want.encoder_attentions, got.encoder_attentions):
        torch.testing.assert_close(w_got[rows(keep, w_want)], w_want[rows(keep, w_want)], **TOL)
    for w_want, w_got in zip(want.decoder_attentions + want.cross_attentions,
                             got.decoder_attentions + got.cross_attentions):
        torch.testing.assert_close(w_got[rows(dec_keep, w_want)],
                                   w_want[rows(dec_keep, w_want)], **TOL)
    # T5's unscaled scores; one bias object per stack, handed from layer 0 to layer 1;
    # cross-attention without position bias; masks as attnkit objects, not tensors
    assert len(seen) == 6 and {s[2] for s in seen} == {1.0}
    encoder = [s for s in seen if s[0] in list(model.encoder.modules())]
    assert isinstance(encoder[0][1], T5Bias) and encoder[1][1] is encoder[0][1]
    cross = [s for s in seen if not getattr(s[0], "has_relative_attention_bias", True)
             and s[0] in [b.layer[1].EncDecAttention for b in model.decoder.block]]
    assert len(cross) == 2 and all(s[1] is None for s in cross)
    assert not any(isinstance(s[3], torch.Tensor) for s in seen)


@pytest.mark.parametrize("side,cache", [("right", "dynamic"), ("left", "dynamic"),
                                        ("right", "static"), ("left", "static")])
def test_t5_greedy_generation_with_cache_equals_unpatched(t5_pair, side, cache,
                                                          no_hf_attention, monkeypatch):
    reference, model = t5_pair
    ids, keep = padded(3, 12, side, vocab=128)
    kwargs = dict(attention_mask=keep, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                  use_cache=True, output_logits=True, return_dict_in_generate=True)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    offsets = []
    real = T5RelativeBias.bias

    def spy(self, q_len, k_len, offset=None):
        offsets.append((self.bidirectional, q_len, k_len, offset))
        return real(self, q_len, k_len, offset)

    want = reference.generate(ids, **kwargs)
    monkeypatch.setattr(T5RelativeBias, "bias", spy)
    with no_hf_attention:
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_want, step_got in zip(want.logits, got.logits):
        torch.testing.assert_close(step_got, step_want, **TOL)
    # decoding one token at a time: the decoder's causal bias for query position t
    decoder = [o for o in offsets if not o[0]]
    assert [o[3] for o in decoder] == list(range(10))
    assert all(o[1] == 1 for o in decoder)
    if cache == "dynamic":
        assert [o[2] for o in decoder] == list(range(1, 11))  # keys: the cache so far


def test_patched_modules_take_the_cache_under_either_name(t5_pair):
    """transformers 5.24 renamed the attention modules' ``past_key_values`` keyword to
    ``cache`` (the old name deprecated until 5.40): a patched module reads its past under
    both names, so it decodes the same whichever release calls it."""
    from transformers.cache_utils import DynamicCache
    _, model = t5_pair
    layer = model.decoder.block[0].layer[0].SelfAttention
    x = torch.randn(2, 5, 64)

    def decode(name):
        cache = DynamicCache()
        with torch.no_grad():
            layer(x[:, :4], **{name: cache})
            return layer(x[:, 4:], **{name: cache})[0], cache.get_seq_length(0)

    (new, n_new), (old, n_old) = decode("cache"), decode("past_key_values")
    assert n_new == n_old == 5  # both appended to the cache they were given
    torch.testing.assert_close(new, old, atol=0, rtol=0)
    with torch.no_grad():  # the last token, decoded with its past, equals a full pass
        full = layer(x, mask=None)[0][:, 4:]
    torch.testing.assert_close(new, full, **TOL)
    with pytest.raises(ValueError, match="cache.*past_key_values"):
        layer(x, cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_t5_takes_the_dense_masks_other_implementations_build(implementation):
    reference, model = pair("t5")
    model.set_attn_implementation(implementation)  # masks: additive float / bool tensors
    ids, keep = padded(2, 10, "left", vocab=128)
    dec, dec_keep = padded(2, 6, "right", vocab=128)
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=dec,
                  decoder_attention_mask=dec_keep)
    with torch.no_grad():
        want, got = reference(**inputs), model(**inputs)
    assert_equal_where_real(want.logits, got.logits, dec_keep)


def test_t5_gradients_equal_unpatched_and_reach_the_bias_table():
    reference, model = pair("t5")
    ids, keep = padded(2, 10, "right", vocab=128)
    labels = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    for m in (reference, model):
        m(input_ids=ids, attention_mask=keep, labels=labels).loss.backward()
    grads = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-3, rtol=1e-4)
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_t5_follows_dtype_conversions_and_mt5_is_supported():
    reference, model = pair("t5")
    reference.double()
    model.double()  # the bias table converts with the module that registers it
    ids, keep = padded(2, 10, "right", vocab=128)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=keep, decoder_input_ids=ids[:, :4])
        got = model(input_ids=ids, attention_mask=keep, decoder_input_ids=ids[:, :4])
    assert got.logits.dtype == torch.float64
    torch.testing.assert_close(got.logits, want.logits, atol=1e-9, rtol=1e-9)

    torch.manual_seed(0)
    mt5 = transformers.MT5EncoderModel._from_config(
        transformers.MT5Config(**t5_config().to_dict()), attn_implementation="eager").eval()
    mt5_reference = copy.deepcopy(mt5)
    ak_hf.patch(mt5)
    assert sum(isinstance(m, akhf_t5.AttnkitT5Attention) for m in mt5.modules()) == 2
    with torch.no_grad():
        want = mt5_reference(input_ids=ids, attention_mask=keep).last_hidden_state
        got = mt5(input_ids=ids, attention_mask=keep).last_hidden_state
    assert_equal_where_real(want, got, keep)


# ------------------------------------------------------------------ Longformer

@pytest.mark.parametrize("side", ["right", "left"])
def test_longformer_with_global_tokens_and_padding_equals_unpatched(side, no_hf_attention):
    reference, model = pair("longformer")
    assert all(isinstance(layer.attention.self, akhf_longformer.AttnkitLongformerSelfAttention)
               for layer in model.encoder.layer)
    ids, keep = padded(3, 37, side, real=(29, 20))  # 37: the model pads to 48
    is_global = torch.zeros(3, 37, dtype=torch.long)
    first_real = keep.argmax(1)
    is_global[torch.arange(3), first_real] = 1  # a [CLS]-like token per row
    is_global[0, first_real[0] + 5] = 1  # and a different number of them per row
    is_global[2, [3, 17, 30]] = 1
    inputs = dict(input_ids=ids, attention_mask=keep, global_attention_mask=is_global)
    with torch.no_grad():
        want = reference(**inputs).last_hidden_state
        with no_hf_attention:
            got = model(**inputs).last_hidden_state
    assert_equal_where_real(want, got, keep)
    with torch.no_grad():  # and without global tokens
        want = reference(ids, attention_mask=keep).last_hidden_state
        got = model(ids, attention_mask=keep).last_hidden_state
    assert_equal_where_real(want, got, keep)


@pytest.mark.parametrize("name,length", [("longformer", 16), ("bigbird", 100), ("bigbird", 16)])
def test_longformer_and_bigbird_refuse_to_return_attention_probabilities(name, length):
    _, model = pair(name)  # transformers records them from its own classes: refuse, loudly
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(torch.randint(3, 100, (1, length)), output_attentions=True)


# ------------------------------------------------------------------ BigBird

@pytest.fixture
def sparse_calls(monkeypatch):
    """The block counts of every block-sparse call attnkit makes."""
    seen = []
    real = ak_bigbird.block_sparse_attention

    def spy(query, key, value, counts, *args, **kwargs):
        seen.append(counts)
        return real(query, key, value, counts, *args, **kwargs)

    monkeypatch.setattr(ak_bigbird, "block_sparse_attention", spy)
    return seen


@pytest.mark.parametrize("side", ["right", "left"])
def test_bigbird_block_sparse_and_its_full_fallback_equal_unpatched(side, sparse_calls,
                                                                    no_hf_attention):
    reference, model = pair("bigbird")
    ids, keep = padded(2, 150, side, real=(131, None))  # 150: the model pads to 152
    n_blocks = 152 // 8

    def compare(ids, keep):
        with torch.no_grad():
            want = reference(ids, attention_mask=keep).last_hidden_state
            with no_hf_attention:
                got = model(ids, attention_mask=keep).last_hidden_state
        assert_equal_where_real(want, got, keep)
        assert model.attention_type == reference.attention_type

    # long: block-sparse, really (sparse layout, eval plan: block 0 in every random slot)
    compare(ids, keep)
    assert model.attention_type == "block_sparse"
    assert all(isinstance(layer.attention.self, akhf_bigbird.AttnkitBigBirdBlockSparseAttention)
               for layer in model.encoder.layer)
    assert len(sparse_calls) == 2
    for counts in sparse_calls:
        assert counts.shape[-1] == n_blocks
        seen = (counts > 0).float().mean()
        assert seen < 0.5  # most key blocks of most rows are skipped
        assert (counts[:, 2:-2, 0] == 1 + 2).all()  # the eval-mode quirk, counted
    # short: transformers falls back to full attention, and the attnkit module follows
    sparse_calls.clear()
    ids_short, keep_short = padded(2, 40, side, real=(33, None))
    compare(ids_short, keep_short)
    assert model.attention_type == "original_full" and not sparse_calls
    assert all(isinstance(layer.attention.self, akhf_bigbird.AttnkitBigBirdSelfAttention)
               for layer in model.encoder.layer)
    # transformers stays on full attention for later long inputs; so does the patch
    compare(ids, keep)
    assert not sparse_calls
    # until told otherwise: back to block-sparse, on the same projections
    reference.set_attention_type("block_sparse")
    model.set_attention_type("block_sparse")
    compare(ids, keep)
    assert len(sparse_calls) == 2
    layer = model.encoder.layer[0].attention.self
    assert isinstance(layer, akhf_bigbird.AttnkitBigBirdBlockSparseAttention)
    assert layer.query is model.encoder.layer[0].attention.self.query
    assert list(model.state_dict()) == list(reference.state_dict())


def test_bigbird_training_plan_and_decoder_generation_equal_unpatched():
    # training mode: transformers' numpy random plan (no dropout, so outputs compare)
    torch.manual_seed(0)
    model = transformers.BigBirdModel(bigbird_config(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    reference = copy.deepcopy(model)
    ak_hf.patch(model)
    ids, _ = padded(2, 150, "right")
    torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state,
                               **TOL)
    # a BigBird decoder (full attention, causal mask, KV cache)
    torch.manual_seed(0)
    model = transformers.BigBirdForCausalLM(bigbird_config(
        is_decoder=True, attention_type="original_full")).eval()
    reference = copy.deepcopy(model)
    ak_hf.patch(model)
    ids, keep = padded(2, 10, "left")
    kwargs = dict(attention_mask=keep, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    want, got = reference.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_want, step_got in zip(want.logits, got.logits):
        torch.testing.assert_close(step_got, step_want, **TOL)


def test_patched_bigbird_survives_pickling():
    _, model = pair("bigbird")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.encoder.layer[0].attention) is akhf_bigbird.BigBirdAttentionSwitch
    # models pickled when the classes lived in patch.py still find them there
    assert ak_patch.BigBirdAttentionSwitch is akhf_bigbird.BigBirdAttentionSwitch
    assert ak_patch.AttnkitT5Attention is akhf_t5.AttnkitT5Attention
    ids, _ = padded(1, 100, "right")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_layers_hold_no_transformers_code():
    """Everything that knows transformers' modules lives in integrations.hf: the layers
    import nothing of it and keep no adapters to its call conventions."""
    import pathlib
    import re

    import attnkit.layers
    root = pathlib.Path(attnkit.layers.__file__).parent
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+transformers\b", text, re.MULTILINE), path
    for cls in (attnkit.layers.LongformerAttention, attnkit.layers.BigBirdAttention):
        assert not any(hasattr(cls, name) for name in ("from_hf", "forward_hf")), cls
